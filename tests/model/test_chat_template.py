"""The saved chat template (model/chat_template.jinja) renders exactly what `render()` renders.

The oracle is `m2rl.agent.format.render`, itself pinned byte for byte by tests/agent/test_render.py; its golden
inputs are re-used here (module constants imported, inline cases repeated), and hypothesis generates further
conversations with arbitrary text. Everything goes through the public path a user takes:
`M2Tokenizer.save_pretrained(dir)` then `transformers.AutoTokenizer.from_pretrained(dir).apply_chat_template`.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib.util
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from m2rl.agent.format import RenderError, render
from m2rl.model.tokenizer import CHAT_TEMPLATE_FILE, M2Tokenizer, chat_template

transformers = pytest.importorskip("transformers")
jinja2 = pytest.importorskip("jinja2")

ASSET_DIR = Path(__file__).parents[2] / "model" / "assets" / "tiny-python-sft"


def _load_render_tests() -> Any:
    path = Path(__file__).parents[1] / "agent" / "test_render.py"
    spec = importlib.util.spec_from_file_location("m2rl_test_render_cases", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


R = _load_render_tests()
WEATHER_TOOL, EXAMPLE_MESSAGES = R.WEATHER_TOOL, R.EXAMPLE_MESSAGES


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    M2Tokenizer.tiny().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def hf(saved_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(saved_dir)


def decode_arguments(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI JSON-string tool-call arguments as mappings: what vLLM does before it renders a chat template
    (Jinja cannot decode JSON, and transformers' templates expect mappings)."""
    out = copy.deepcopy(messages)
    for m in out:
        for call in m.get("tool_calls") or []:
            fn = call["function"] if isinstance(call.get("function"), dict) else call
            if isinstance(fn.get("arguments"), str):
                fn["arguments"] = json.loads(fn["arguments"]) if fn["arguments"].strip() else {}
    return out


def apply(hf: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
          add_generation_prompt: bool = False, enable_thinking: bool = True, **kwargs: Any) -> str:
    return hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt,
                                  enable_thinking=enable_thinking, **kwargs)


# ---- golden cases of tests/agent/test_render.py ----

def _call(name: str, args: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": args}}


CONTENT_THINK = copy.deepcopy(EXAMPLE_MESSAGES)
CONTENT_THINK[1] = {"role": "assistant", "content": "<think>\nNeed to call the tool.\n</think>\n\n",
                    "tool_calls": [{"id": "c1", "type": "function", "function": {
                        "name": "get_weather", "arguments": '{"location": "Paris", "days": 2}'}}]}
CONTENT_THINK[3] = {"role": "assistant", "content": "<think>Got it.</think>\n\nIt is 21C.\n"}
SIMPLIFIED_CALLS = copy.deepcopy(EXAMPLE_MESSAGES)
SIMPLIFIED_CALLS[1]["tool_calls"] = [{"name": "get_weather", "arguments": {"location": "Paris", "days": 2}}]
TWO_TURNS = [
    {"role": "user", "content": "q1"},
    {"role": "assistant", "reasoning_content": "old thought", "content": "",
     "tool_calls": [{"name": "get_weather", "arguments": {"location": "Rome"}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "assistant", "reasoning_content": "old answer thought", "content": "Sunny."},
    {"role": "user", "content": "q2"},
    {"role": "assistant", "content": "<think>new thought</think>Cloudy."},
]
PARALLEL = [
    {"role": "user", "content": "Paris and Rome?"},
    {"role": "assistant", "reasoning_content": "Two calls.", "content": "Checking both.",
     "tool_calls": [_call("get_weather", '{"location": "Paris"}'), _call("get_weather", {"location": "Rome", "days": 3})]},
    {"role": "tool", "content": "21"},
    {"role": "tool", "content": "25"},
]
NON_ASCII_TOOL = {"type": "function", "function": {"name": "météo", "description": "天气预报",
                                                   "parameters": {"type": "object", "properties": {}}}}
NON_ASCII = [
    {"role": "user", "content": "Zürich 天气?"},
    {"role": "assistant", "content": "",
     "tool_calls": [{"name": "météo", "arguments": {"ville": "Zürich", "opts": {"langue": "français", "n": 1.5},
                                                     "ok": True, "none": None, "list": ["é", 2]}}]},
]
GOLDEN: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = {
    "reference_example": (EXAMPLE_MESSAGES, None),
    "reference_example_with_tools": (EXAMPLE_MESSAGES, [WEATHER_TOOL]),
    "content_think_and_json_string_arguments": (CONTENT_THINK, None),
    "simplified_tool_call_shape": (SIMPLIFIED_CALLS, None),
    "tools_section": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], [WEATHER_TOOL]),
    "empty_tools_and_empty_system": ([{"role": "system", "content": ""}, {"role": "user", "content": "x"}], []),
    "parts_lists": ([
        {"role": "system", "content": [{"type": "text", "text": "You are "}, {"type": "text", "text": "terse."}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}, "b"]},
    ], None),
    "one_user_message": ([{"role": "user", "content": "hi"}], None),
    "reasoning_dropped_before_last_user": (TWO_TURNS, None),
    "no_user_message_keeps_reasoning": ([{"role": "assistant", "reasoning_content": "r", "content": "c"}], None),
    "parallel_calls_shared_tool_header": (PARALLEL, None),
    "non_ascii_tools_and_values": (NON_ASCII, [NON_ASCII_TOOL]),
    "tool_content_as_list": ([
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "a", "arguments": {}}]},
        {"role": "tool", "content": [{"type": "text", "text": "one"}, {"output": "two"}]},
    ], None),
    "system_current_date_and_location": (
        [{"role": "system", "content": "S", "current_date": "2025-10-27", "current_location": "Shanghai"}], None),
}


@pytest.mark.parametrize("name", list(GOLDEN))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("enable_thinking", [True, False])
def test_golden_cases_equal_render(hf, name, add_generation_prompt, enable_thinking):
    messages, tools = GOLDEN[name]
    expected = render(messages, tools, add_generation_prompt, enable_thinking)
    assert apply(hf, decode_arguments(messages), tools, add_generation_prompt, enable_thinking) == expected


def test_reference_example_byte_for_byte(hf):
    # The same golden string test_render pins render() to, without going through render().
    assert apply(hf, EXAMPLE_MESSAGES) == R.HEADER + R.REFERENCE_EXAMPLE
    assert apply(hf, EXAMPLE_MESSAGES[:1], add_generation_prompt=True) == (
        R.HEADER + "]~b]user\nWeather in Paris?[e~[\n]~b]ai\n<think>\n")
    assert apply(hf, EXAMPLE_MESSAGES[:1], add_generation_prompt=True, enable_thinking=False) == (
        R.HEADER + "]~b]user\nWeather in Paris?[e~[\n]~b]ai\n")


def test_thinking_is_on_unless_disabled(hf):
    msgs = [{"role": "user", "content": "hi"}]
    default = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert default == render(msgs, add_generation_prompt=True) and default.endswith("]~b]ai\n<think>\n")


def test_keep_all_reasoning(hf):
    kept = render(TWO_TURNS, keep_all_reasoning=True)
    assert "old thought" in kept
    assert apply(hf, TWO_TURNS, keep_all_reasoning=True) == kept
    assert apply(hf, TWO_TURNS, keep_all_reasoning=False) == render(TWO_TURNS)


def test_tokenized_template_equals_encoded_render(hf):
    # tokenize=True must add no BOS of its own and keep every marker a single id.
    ids = hf.apply_chat_template(EXAMPLE_MESSAGES, tools=[WEATHER_TOOL], add_generation_prompt=True,
                                 tokenize=True, return_dict=False)
    expected = M2Tokenizer.tiny().encode(render(EXAMPLE_MESSAGES, [WEATHER_TOOL], add_generation_prompt=True))
    assert list(ids) == expected


def test_missing_content_keys_render_empty(hf):
    msgs = [{"role": "user"}, {"role": "assistant", "tool_calls": [{"name": "a", "arguments": {"x": 1}}]},
            {"role": "tool"}, {"role": "assistant", "reasoning_content": "r"}]
    assert apply(hf, msgs) == render(msgs)


def test_vllm_sees_a_template_of_openai_parts():
    # vLLM flattens list contents (joined by newlines) for templates it judges to take strings; render()
    # concatenates text parts, so the template must be judged to take OpenAI lists of parts.
    pytest.importorskip("vllm")
    from vllm.renderers.hf import _detect_content_format

    assert _detect_content_format(chat_template(), default="string") == "openai"


# ---- errors: where render() raises, the template raises too ----

@pytest.mark.parametrize("messages, fragment, template_fragment", [
    ([{"role": "tool", "content": "x"}], "tool message must follow", None),
    ([{"role": "user", "content": "u"}, {"role": "tool", "content": "x"}], "tool message must follow", None),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "late"}], "only allowed as the first", None),
    ([{"role": "robot", "content": "x"}], "unknown role", None),
    ([{"content": "x"}], "string 'role'", None),
    # render() decodes the JSON string first; the template cannot, and says so.
    ([{"role": "assistant", "tool_calls": [{"name": "a", "arguments": "[1]"}]}], "must be an object",
     "are a JSON string"),
    ([{"role": "assistant", "tool_calls": [{"name": "a", "arguments": [1]}]}], "must be an object", None),
    ([{"role": "assistant", "tool_calls": [{"arguments": {}}]}], "no string 'name'", None),
    ([{"role": "assistant", "tool_calls": ["call"]}], "must be a mapping", None),
])
def test_bad_messages_raise_in_both(hf, messages, fragment, template_fragment):
    with pytest.raises(RenderError, match=fragment):
        render(messages)
    with pytest.raises(jinja2.TemplateError, match=template_fragment or fragment):
        apply(hf, messages)


def test_json_string_arguments_need_decoding_first(hf):
    # Jinja cannot decode JSON: a JSON string is refused with a message saying what to do, never rendered raw.
    with pytest.raises(jinja2.TemplateError, match="pass them as a mapping"):
        apply(hf, CONTENT_THINK)
    # An empty string means no arguments, as in render().
    msgs = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "", "tool_calls": [_call("a", " ")]}]
    assert apply(hf, msgs) == render(msgs)


def test_bad_tools_raise_in_both(hf):
    msgs = [{"role": "user", "content": "u"}]
    for tools, fragment in [([{"type": "function", "function": {"description": "x"}}], "no function name")]:
        with pytest.raises(RenderError, match=fragment):
            render(msgs, tools)
        with pytest.raises(jinja2.TemplateError, match=fragment):
            apply(hf, msgs, tools)


# ---- generated conversations ----

MARKERS = ["<think>", "</think>", "<minimax:tool_call>", "</minimax:tool_call>", "]~!b[", "]~b]", "[e~[",
           "<response>", "</parameter>", "{{ x }}", "{% if %}", "\n", "\n\n", " ", "\t", '"', "\\"]
# Arbitrary text (any code point but lone surrogates), salted with the format's markers and Jinja syntax.
TEXT = st.lists(st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=12), st.sampled_from(MARKERS)),
                max_size=5).map("".join)
NAME = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10)
JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAME, inner, max_size=3),
    max_leaves=6,
)
ARGUMENTS = st.dictionaries(NAME, st.one_of(TEXT, st.integers(), st.floats(allow_nan=False), st.booleans(),
                                            st.none(), JSON_VALUE), max_size=4)
PARTS = st.lists(st.one_of(TEXT, TEXT.map(lambda t: {"type": "text", "text": t}),
                           st.just({"type": "image_url", "image_url": {"url": "x"}})), max_size=3)
CONTENT = st.one_of(TEXT, st.none(), PARTS)


@st.composite
def tool_call(draw: st.DrawFn) -> dict[str, Any]:
    name, args = draw(NAME), draw(ARGUMENTS)
    if draw(st.booleans()):
        return {"id": "call", "type": "function", "function": {"name": name, "arguments": args}}
    return {"name": name, "arguments": args}


@st.composite
def assistant(draw: st.DrawFn) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": draw(CONTENT)}
    style = draw(st.sampled_from(["field", "inline", "none"]))
    if style == "field":
        message["reasoning_content"] = draw(TEXT)
    elif style == "inline":
        message["content"] = f"<think>{draw(TEXT)}</think>{draw(TEXT)}"
    calls = draw(st.lists(tool_call(), max_size=3))
    if calls or draw(st.booleans()):
        message["tool_calls"] = calls
    return message


TOOL_RESULT = st.one_of(TEXT, st.none(), st.lists(st.one_of(
    TEXT, TEXT.map(lambda t: {"type": "text", "text": t}), JSON_VALUE.map(lambda v: {"output": v}),
    st.dictionaries(st.sampled_from(["a", "b"]), JSON_VALUE, max_size=2)), max_size=3))


@st.composite
def conversation(draw: st.DrawFn) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        system: dict[str, Any] = {"role": "system", "content": draw(CONTENT)}
        if draw(st.booleans()):
            system["current_date"] = draw(TEXT)
        messages.append(system)
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            messages.append({"role": "user", "content": draw(CONTENT)})
        else:
            message = draw(assistant())
            messages.append(message)
            if message.get("tool_calls"):
                messages += [{"role": "tool", "content": draw(TOOL_RESULT)}
                             for _ in range(draw(st.integers(0, len(message["tool_calls"]))))]
    return messages


TOOLS = st.none() | st.lists(st.builds(
    lambda name, description, props: {"type": "function", "function": {
        "name": name, "description": description, "parameters": {"type": "object", "properties": props}}},
    NAME, TEXT, st.dictionaries(NAME, JSON_VALUE, max_size=2)), max_size=3)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=conversation(), tools=TOOLS, add_generation_prompt=st.booleans(), enable_thinking=st.booleans(),
       keep_all_reasoning=st.booleans())
def test_generated_conversations_equal_render(hf, messages, tools, add_generation_prompt, enable_thinking,
                                              keep_all_reasoning):
    expected = render(messages, tools, add_generation_prompt, enable_thinking, keep_all_reasoning=keep_all_reasoning)
    got = apply(hf, messages, tools, add_generation_prompt, enable_thinking, keep_all_reasoning=keep_all_reasoning)
    assert got == expected


# ---- where the template is saved and shipped ----

def test_save_pretrained_writes_the_template_both_ways(saved_dir, hf):
    template = chat_template()
    assert (saved_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8") == template
    assert json.loads((saved_dir / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"] == template
    assert hf.chat_template == template


def test_tokenizer_config_alone_is_enough(saved_dir, tmp_path):
    # Readers that only know tokenizer_config.json (transformers 4, TGI) get the same template.
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (tmp_path / name).write_bytes((saved_dir / name).read_bytes())
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.chat_template == chat_template()
    assert apply(hf, EXAMPLE_MESSAGES, [WEATHER_TOOL], True) == render(EXAMPLE_MESSAGES, [WEATHER_TOOL], True)


def test_shipped_checkpoint_carries_the_current_template(saved_dir):
    # The warm-start checkpoint must not drift from the template (re-save it when the template changes).
    assert (ASSET_DIR / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8") == chat_template()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert json.loads((ASSET_DIR / name).read_text(encoding="utf-8")) == json.loads(
            (saved_dir / name).read_text(encoding="utf-8")), name
    hf = transformers.AutoTokenizer.from_pretrained(ASSET_DIR)
    assert apply(hf, decode_arguments(PARALLEL), [WEATHER_TOOL], True) == render(PARALLEL, [WEATHER_TOOL], True)


def test_template_ships_as_package_data():
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["m2rl.model"]
    for path in (CHAT_TEMPLATE_FILE, f"assets/tiny-python-sft/{CHAT_TEMPLATE_FILE}"):
        assert any(fnmatch.fnmatch(path, p) for p in patterns), (path, patterns)
