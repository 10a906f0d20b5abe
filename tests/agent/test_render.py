"""Golden tests of the M2 renderer against shared/reference/m2-format.md (byte for byte)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from m2rl.agent.format import (
    RenderError,
    generation_prompt,
    render,
    render_completion,
    render_ids,
    render_tool_suffix,
    render_user_suffix,
)
from m2rl.model.tokenizer import M2Tokenizer


@pytest.fixture(scope="module")
def tiny_tokenizer() -> M2Tokenizer:
    return M2Tokenizer.tiny()


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["location"],
        },
    },
}
HEADER = "]~!b[]~b]system\nYou are a helpful assistant.[e~[\n"

# The example of m2-format.md, verbatim.
REFERENCE_EXAMPLE = (
    ']~b]user\nWeather in Paris?[e~[\n]~b]ai\n<think>\nNeed to call the tool.\n</think>\n\n\n<minimax:tool_call>\n'
    '<invoke name="get_weather">\n<parameter name="location">Paris</parameter>\n<parameter name="days">2</parameter>\n'
    '</invoke>\n</minimax:tool_call>[e~[\n]~b]tool\n<response>{"temp": 21}</response>[e~[\n]~b]ai\n<think>\n'
    'Got it.\n</think>\n\nIt is 21C.[e~[\n'
)
EXAMPLE_MESSAGES = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "reasoning_content": "Need to call the tool.", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                       "arguments": {"location": "Paris", "days": 2}}}]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "assistant", "reasoning_content": "Got it.", "content": "It is 21C."},
]


def test_reference_example_byte_for_byte():
    assert render(EXAMPLE_MESSAGES) == HEADER + REFERENCE_EXAMPLE


def test_reference_example_with_content_think_and_json_string_arguments():
    # Reasoning carried inside content (`<think>..</think>`) and OpenAI JSON-string arguments render identically.
    msgs = json.loads(json.dumps(EXAMPLE_MESSAGES))
    msgs[1] = {"role": "assistant", "content": "<think>\nNeed to call the tool.\n</think>\n\n",
               "tool_calls": [{"id": "c1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"location": "Paris", "days": 2}'}}]}
    msgs[3] = {"role": "assistant", "content": "<think>Got it.</think>\n\nIt is 21C.\n"}
    assert render(msgs) == HEADER + REFERENCE_EXAMPLE


def test_simplified_tool_call_shape():
    msgs = json.loads(json.dumps(EXAMPLE_MESSAGES))
    msgs[1]["tool_calls"] = [{"name": "get_weather", "arguments": {"location": "Paris", "days": 2}}]
    assert render(msgs) == HEADER + REFERENCE_EXAMPLE


def test_tools_section_exact():
    out = render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], tools=[WEATHER_TOOL])
    fn = ('{"name": "get_weather", "description": "Get the weather", "parameters": {"type": "object", "properties": '
          '{"location": {"type": "string"}, "days": {"type": "integer"}}, "required": ["location"]}}')
    expected = (
        "]~!b[]~b]system\nBe brief."
        "\n\n# Tools\nYou may call one or more tools to assist with the user query.\n"
        "Here are the tools available in JSONSchema format:\n\n<tools>\n"
        f"<tool>{fn}</tool>\n"
        "</tools>\n\nWhen making tool calls, use XML format to invoke tools and pass parameters:\n\n"
        '<minimax:tool_call>\n<invoke name="tool-name-1">\n<parameter name="param-key-1">param-value-1</parameter>\n'
        '<parameter name="param-key-2">param-value-2</parameter>\n...\n</invoke>\n</minimax:tool_call>'
        "[e~[\n]~b]user\nhi[e~[\n"
    )
    assert out == expected


def test_empty_tools_and_empty_system_use_defaults():
    assert render([{"role": "system", "content": ""}, {"role": "user", "content": "x"}], tools=[]) == (
        HEADER + "]~b]user\nx[e~[\n")


def test_system_and_user_from_list_of_parts():
    msgs = [
        {"role": "system", "content": [{"type": "text", "text": "You are "}, {"type": "text", "text": "terse."}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}, "b"]},
    ]
    assert render(msgs) == "]~!b[]~b]system\nYou are terse.[e~[\n]~b]user\nab[e~[\n"


def test_generation_prompt_thinking_on_and_off():
    msgs = [{"role": "user", "content": "hi"}]
    assert render(msgs, add_generation_prompt=True) == HEADER + "]~b]user\nhi[e~[\n]~b]ai\n<think>\n"
    assert render(msgs, add_generation_prompt=True, enable_thinking=False) == HEADER + "]~b]user\nhi[e~[\n]~b]ai\n"
    assert generation_prompt(False) == "]~b]ai\n"


def test_reasoning_dropped_for_turns_before_last_user_message():
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "reasoning_content": "old thought", "content": "",
         "tool_calls": [{"name": "get_weather", "arguments": {"location": "Rome"}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "reasoning_content": "old answer thought", "content": "Sunny."},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "<think>new thought</think>Cloudy."},
    ]
    out = render(msgs)
    assert "old thought" not in out and "old answer thought" not in out
    assert out == HEADER + (
        "]~b]user\nq1[e~[\n"
        ']~b]ai\n\n<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="location">Rome</parameter>\n'
        "</invoke>\n</minimax:tool_call>[e~[\n"
        "]~b]tool\n<response>sunny</response>[e~[\n"
        "]~b]ai\nSunny.[e~[\n"
        "]~b]user\nq2[e~[\n"
        "]~b]ai\n<think>\nnew thought\n</think>\n\nCloudy.[e~[\n"
    )
    kept = render(msgs, keep_all_reasoning=True)
    assert "<think>\nold thought\n</think>\n\n" in kept and "<think>\nold answer thought\n</think>\n\n" in kept


def test_no_user_message_keeps_all_reasoning():
    msgs = [{"role": "assistant", "reasoning_content": "r", "content": "c"}]
    assert render(msgs) == HEADER + "]~b]ai\n<think>\nr\n</think>\n\nc[e~[\n"


def test_parallel_calls_and_results_share_one_tool_header():
    msgs = [
        {"role": "user", "content": "Paris and Rome?"},
        {"role": "assistant", "reasoning_content": "Two calls.", "content": "Checking both.",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}},
                        {"type": "function", "function": {"name": "get_weather",
                                                          "arguments": {"location": "Rome", "days": 3}}}]},
        {"role": "tool", "content": "21"},
        {"role": "tool", "content": "25"},
    ]
    assert render(msgs, add_generation_prompt=True) == HEADER + (
        "]~b]user\nParis and Rome?[e~[\n"
        "]~b]ai\n<think>\nTwo calls.\n</think>\n\nChecking both.\n<minimax:tool_call>\n"
        '<invoke name="get_weather">\n<parameter name="location">Paris</parameter>\n</invoke>\n'
        '<invoke name="get_weather">\n<parameter name="location">Rome</parameter>\n<parameter name="days">3</parameter>\n'
        "</invoke>\n</minimax:tool_call>[e~[\n"
        "]~b]tool\n<response>21</response>\n<response>25</response>[e~[\n"
        "]~b]ai\n<think>\n"
    )


def test_non_ascii_kept_in_tools_and_values():
    tool = {"type": "function", "function": {"name": "météo", "description": "天气预报",
                                             "parameters": {"type": "object", "properties": {}}}}
    msgs = [
        {"role": "user", "content": "Zürich 天气?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"name": "météo", "arguments": {"ville": "Zürich", "opts": {"langue": "français", "n": 1.5},
                                                         "ok": True, "none": None, "list": ["é", 2]}}]},
    ]
    out = render(msgs, tools=[tool])
    assert '<tool>{"name": "météo", "description": "天气预报", "parameters": {"type": "object", "properties": {}}}</tool>' in out
    assert ('<parameter name="ville">Zürich</parameter>\n'
            '<parameter name="opts">{"langue": "français", "n": 1.5}</parameter>\n'
            '<parameter name="ok">true</parameter>\n<parameter name="none">null</parameter>\n'
            '<parameter name="list">["é", 2]</parameter>\n') in out


def test_tool_content_as_list_follows_official_template():
    msgs = [{"role": "user", "content": "u"},
            {"role": "assistant", "content": "", "tool_calls": [{"name": "a", "arguments": {}}]},
            {"role": "tool", "content": [{"type": "text", "text": "one"}, {"output": "two"}]}]
    assert render(msgs).endswith("]~b]tool\n<response>one\n</response>\n<response>two\n</response>[e~[\n")


@pytest.mark.parametrize("messages, fragment", [
    ([{"role": "tool", "content": "x"}], "tool message must follow"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "late"}], "only allowed as the first"),
    ([{"role": "robot", "content": "x"}], "unknown role"),
    ([{"content": "x"}], "string 'role'"),
    ([{"role": "assistant", "tool_calls": [{"name": "a", "arguments": "{not json"}]}], "not valid JSON"),
    ([{"role": "assistant", "tool_calls": [{"name": "a", "arguments": "[1]"}]}], "must be an object"),
    ("hello", "list of dicts"),
])
def test_bad_messages_raise_clear_render_error(messages, fragment):
    with pytest.raises(RenderError, match=fragment):
        render(messages)


def test_suffix_validation():
    with pytest.raises(RenderError):
        render_tool_suffix([])
    with pytest.raises(RenderError):
        render_tool_suffix([1])  # type: ignore[list-item]
    with pytest.raises(RenderError):
        render_user_suffix(None)  # type: ignore[arg-type]


# ---- the continuation invariant that token-in/token-out rollouts rely on ----

def _call(name: str, args: dict) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": args}}


@pytest.mark.parametrize("thinking", [True, False])
def test_tool_suffix_continues_transcript_exactly(thinking):
    history = [{"role": "user", "content": "Weather in Paris?"}]
    reasoning = "Need to call the tool." if thinking else ""
    assistant = {"role": "assistant", "reasoning_content": reasoning, "content": "",
                 "tool_calls": [_call("get_weather", {"location": "Paris", "days": 2}), _call("get_weather", {"location": "Nice"})]}
    results = ['{"temp": 21}', '{"temp": 24}']
    full = history + [assistant] + [{"role": "tool", "content": r} for r in results]
    prefix = render(history, [WEATHER_TOOL], add_generation_prompt=True, enable_thinking=thinking)
    completion = render_completion(assistant, enable_thinking=thinking)
    assert completion.endswith("[e~[")
    assert (render(full, [WEATHER_TOOL], add_generation_prompt=True, enable_thinking=thinking)
            == prefix + completion + render_tool_suffix(results, enable_thinking=thinking))


def test_reference_example_is_prefix_completion_suffix():
    prefix = render(EXAMPLE_MESSAGES[:1], add_generation_prompt=True)
    text = (prefix + render_completion(EXAMPLE_MESSAGES[1]) + render_tool_suffix(['{"temp": 21}'])
            + render_completion(EXAMPLE_MESSAGES[3]))
    assert text + "\n" == HEADER + REFERENCE_EXAMPLE


def test_user_suffix_continues_only_with_kept_reasoning():
    history = [{"role": "user", "content": "hi"}]
    assistant = {"role": "assistant", "reasoning_content": "greet", "content": "Hello!"}
    appended = render(history, add_generation_prompt=True) + render_completion(assistant) + render_user_suffix("bye")
    full = history + [assistant, {"role": "user", "content": "bye"}]
    # The official rule drops the old reasoning after a new user message; an append-only rollout keeps it.
    assert render(full, add_generation_prompt=True) != appended
    assert render(full, add_generation_prompt=True, keep_all_reasoning=True) == appended


SAFE_TEXT = st.text(st.characters(blacklist_characters="<>[]~\r", blacklist_categories=("Cs",)), max_size=30)


@settings(max_examples=60, deadline=None)
@given(reasoning=SAFE_TEXT.filter(lambda s: s.strip("\n") == s and s != ""), content=SAFE_TEXT,
       values=st.lists(st.one_of(SAFE_TEXT, st.integers(), st.booleans(), st.none(),
                                 st.lists(st.integers(), max_size=3)), min_size=0, max_size=3),
       n_results=st.integers(1, 3), thinking=st.booleans())
def test_continuation_invariant_property(reasoning, content, values, n_results, thinking):
    history = [{"role": "system", "content": "sys"}, {"role": "user", "content": "go"}]
    args = {f"k{i}": v for i, v in enumerate(values)}
    calls = [_call("get_weather", args) for _ in range(n_results)]
    assistant = {"role": "assistant", "reasoning_content": reasoning, "content": content, "tool_calls": calls}
    results = [f"result {i}" for i in range(n_results)]
    full = history + [assistant] + [{"role": "tool", "content": r} for r in results]
    expected = render(full, [WEATHER_TOOL], add_generation_prompt=True, enable_thinking=thinking)
    got = (render(history, [WEATHER_TOOL], add_generation_prompt=True, enable_thinking=thinking)
           + render_completion(assistant, thinking) + render_tool_suffix(results, thinking))
    assert got == expected


def test_render_ids_markers_are_single_tokens(tiny_tokenizer):
    ids = render_ids(tiny_tokenizer, EXAMPLE_MESSAGES, [WEATHER_TOOL], add_generation_prompt=True)
    assert ids[0] == tiny_tokenizer.bos_id
    assert ids == tiny_tokenizer.encode(render(EXAMPLE_MESSAGES, [WEATHER_TOOL], add_generation_prompt=True))
    assert tiny_tokenizer.decode(ids) == render(EXAMPLE_MESSAGES, [WEATHER_TOOL], add_generation_prompt=True)
    eos = tiny_tokenizer.eos_id
    assert ids.count(eos) == render(EXAMPLE_MESSAGES).count("[e~[")


def test_system_current_date_and_location():
    msgs = [{"role": "system", "content": "S", "current_date": "2025-10-27", "current_location": "Shanghai"}]
    assert render(msgs) == "]~!b[]~b]system\nS\nCurrent date: 2025-10-27\nCurrent location: Shanghai[e~[\n"


# ----------------------------------------------------------------------------- env text never reads as structure

SHIPPED_TOKENIZERS = ["model/assets/tiny_tokenizer.json", "model/assets/tiny-python-sft/tokenizer.json"]


def _special_ids(tok: M2Tokenizer) -> set[int]:
    from m2rl.agent.format import control_tokens

    return {tok.token_to_id(t) for t in control_tokens(tok)}


@pytest.mark.parametrize("path", SHIPPED_TOKENIZERS)
def test_structure_markers_cover_the_shipped_tokenizers(path):
    from pathlib import Path

    from m2rl.agent.format import STRUCTURE_MARKERS, control_tokens

    tok = M2Tokenizer.from_file(Path(__file__).resolve().parents[2] / path)
    assert set(control_tokens(tok)) <= set(STRUCTURE_MARKERS)
    assert set(control_tokens(tok)) >= {"]~!b[", "]~b]", "[e~[", "<think>", "</minimax:tool_call>"}


MARKER_PIECES = st.sampled_from(
    ["]~!b[", "]~b]", "[e~[", "<think>", "</think>", "<minimax:tool_call>", "</minimax:tool_call>", "<invoke",
     "</invoke>", "<parameter", "</parameter>", "<response>", "</response>", "\u200b", "]", "[", "~", "<", "/", ">",
     "b", "e", "think", "\n"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(MARKER_PIECES, st.text(max_size=4)), max_size=30).map("".join))
def test_neutralized_text_encodes_without_control_ids(tiny_tokenizer, text):
    from m2rl.agent.format import STRUCTURE_MARKERS, ZERO_WIDTH_SPACE, neutralize_markers

    out = neutralize_markers(text)
    assert not any(m in out for m in STRUCTURE_MARKERS)
    assert not set(tiny_tokenizer.encode(out)) & _special_ids(tiny_tokenizer)
    assert out.replace(ZERO_WIDTH_SPACE, "") == text.replace(ZERO_WIDTH_SPACE, "")  # only ZWSPs added
    assert neutralize_markers(out) == out
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(out)) == out  # the ids round-trip to the text
    # In a tool response the only control ids are the ones the template itself places.
    suffix_ids = tiny_tokenizer.encode(render_tool_suffix([out]))
    template_ids = tiny_tokenizer.encode(render_tool_suffix(["x"]))
    specials = _special_ids(tiny_tokenizer)
    assert [i for i in suffix_ids if i in specials] == [i for i in template_ids if i in specials]


def test_neutralize_extra_tokens_of_a_bigger_tokenizer():
    from m2rl.agent.format import neutralize_markers

    assert neutralize_markers("a <fim_prefix> b", extra=["<fim_prefix>"]) == "a <\u200bfim_prefix> b"
    assert neutralize_markers("a § b", extra=["§"]) == "a \ufffd b"  # one character cannot be split
    assert neutralize_markers("plain <b>html</b>") == "plain <b>html</b>"


def test_special_token_markers_are_the_tokenizers() -> None:
    """One definition of each marker: the format uses the tokenizer's special tokens, and each of them is a
    structure marker that environment text may not contain."""
    from m2rl.agent import format as m2_format
    from m2rl.envs import tool_env
    from m2rl.model import tokenizer

    for name in ("BOS", "MESSAGE_OPEN", "EOS", "THINK_OPEN", "THINK_CLOSE", "TOOL_CALL_OPEN", "TOOL_CALL_CLOSE"):
        assert getattr(m2_format, name) is getattr(tokenizer, name), name
    assert tool_env.EOS is tokenizer.EOS
    assert set(tokenizer.MARKERS) <= set(m2_format.STRUCTURE_MARKERS)
