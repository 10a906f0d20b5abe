"""Parser tests: golden cases, every malformed-output path, and hypothesis (never raises; round trip)."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from m2rl.agent.format import FormatError, ParsedOutput, parse, render_completion
from m2rl.agent.schema import json_type

BASH = {"type": "function", "function": {
    "name": "bash", "description": "Run a command",
    "parameters": {"type": "object", "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}},
                   "required": ["command"]}}}
TYPED = {"type": "function", "function": {
    "name": "typed", "parameters": {"type": "object", "properties": {
        "i": {"type": "integer"}, "f": {"type": "number"}, "b": {"type": "boolean"}, "n": {"type": "null"},
        "a": {"type": "array", "items": {"type": "string"}}, "o": {"type": "object"}, "s": {"type": "string"},
        "opt": {"type": ["integer", "null"]}, "any": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
        "e": {"enum": [1, 2, 3]}}}}}
TOOLS = [BASH, TYPED]


def block(*invokes: str) -> str:
    return "<minimax:tool_call>\n" + "".join(invokes) + "</minimax:tool_call>"


def invoke(name: str, **params: str) -> str:
    body = "".join(f'<parameter name="{k}">{v}</parameter>\n' for k, v in params.items())
    return f'<invoke name="{name}">\n{body}</invoke>\n'


def codes(out: ParsedOutput) -> list[str]:
    return [e.code for e in out.errors]


def test_reasoning_content_and_call():
    text = "Let me list.\n</think>\n\nListing now.\n" + block(invoke("bash", command="ls -la")) + "[e~["
    out = parse(text, TOOLS)
    assert out.ok
    assert (out.reasoning, out.content) == ("Let me list.", "Listing now.")
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("bash", {"command": "ls -la"})]


def test_plain_answer_and_leading_think():
    assert parse("r\n</think>\n\nHello.[e~[").content == "Hello."
    out = parse("<think>\nr\n</think>\n\nHello.")
    assert (out.reasoning, out.content, out.tool_calls, out.errors) == ("r", "Hello.", [], [])


def test_no_think_close_is_content_unless_thinking_was_opened():
    assert parse("Just an answer.").content == "Just an answer."
    assert parse("Just an answer.", enable_thinking=False).ok
    out = parse("still thinking about " + block(invoke("bash", command="ls")), TOOLS, enable_thinking=True)
    assert out.tool_calls == [] and codes(out) == ["unclosed_think"] and out.content == ""
    out = parse("<think>\nhalf a thought")
    assert out.reasoning == "half a thought" and codes(out) == ["unclosed_think"]


def test_parallel_calls_in_order():
    text = "</think>\n\n" + block(invoke("bash", command="a"), invoke("bash", command="b", timeout="5"))
    out = parse(text, TOOLS)
    assert [(c.arguments, c.index) for c in out.tool_calls] == [({"command": "a"}, 0), ({"command": "b", "timeout": 5}, 1)]


@pytest.mark.parametrize("header", ['name="bash"', "name='bash'", "name=bash", ' name = "bash" ', 'name="bash'])
def test_names_one_layer_of_quotes(header):
    out = parse(f"</think>\n\n<minimax:tool_call>\n<invoke {header}>\n<parameter name=command>ls</parameter>\n"
                "</invoke>\n</minimax:tool_call>", TOOLS)
    assert out.ok, out.errors
    assert out.tool_calls[0].name == "bash" and out.tool_calls[0].arguments == {"command": "ls"}


@pytest.mark.parametrize("value", ["def f():\n    return 1\n", "\n    def f():\n        return 1\n\n", "  spaced  ",
                                   "\n", "\n\n", " ", "", "\r\n x \t\n"])
def test_values_are_verbatim(value):
    """Before: one leading and one trailing newline were dropped, so a file's final newline was lost."""
    out = parse("</think>\n\n" + block(invoke("bash", command=value)), TOOLS)
    assert out.ok, out.errors
    assert out.tool_calls[0].arguments["command"] == value


def test_values_typed_by_schema_with_lenient_fallback():
    params = {"i": "\n42\n", "f": "2.5", "b": "True", "n": "None", "a": "['x', 'y']", "o": '{"k": [1, 2]}',
              "s": "007", "opt": "null", "any": "7", "e": "2", "extra": "[1]"}
    out = parse("</think>\n\n" + block(invoke("typed", **params)), TOOLS)
    assert out.ok, out.errors
    assert out.tool_calls[0].arguments == {"i": 42, "f": 2.5, "b": True, "n": None, "a": ["x", "y"],
                                           "o": {"k": [1, 2]}, "s": "007", "opt": None, "any": 7, "e": 2,
                                           "extra": "[1]"}  # extra: absent from the schema, stays a string


def test_integral_float_becomes_int_and_bool_is_not_a_number():
    out = parse("</think>\n\n" + block(invoke("typed", i="3.0", f="4")), TOOLS)
    assert out.tool_calls[0].arguments == {"i": 3, "f": 4}
    out = parse("</think>\n\n" + block(invoke("typed", f="true")), TOOLS)
    assert codes(out) == ["bad_type"]


def test_without_tools_values_stay_strings():
    out = parse("</think>\n\n" + block(invoke("anything", x="1", y="[2]")))
    assert out.ok and out.tool_calls[0].arguments == {"x": "1", "y": "[2]"}


def test_missing_required_argument_message():
    out = parse("</think>\n\n" + block(invoke("bash", timeout="3")), TOOLS)
    assert out.tool_calls == []
    assert out.errors == [FormatError(
        "schema", "Tool 'bash' is missing required parameter 'command'. Call it as <invoke name=\"bash\">"
        "<parameter name=\"command\">...</parameter></invoke>.", "bash", "missing_argument", 0)]


def test_bad_type_and_unknown_tool_keep_valid_calls():
    text = "</think>\n\n" + block(invoke("bash", command="ls", timeout="soon"), invoke("bsh", command="x"),
                                  invoke("bash", command="pwd"))
    out = parse(text, TOOLS)
    assert [c.arguments for c in out.tool_calls] == [{"command": "pwd"}]
    assert out.tool_calls[0].index == 2
    assert [(e.kind, e.code, e.invoke_index) for e in out.errors] == [
        ("schema", "bad_type", 0), ("unknown_tool", "unknown_tool", 1)]
    assert "must be an integer" in out.errors[0].message and "Available tools: bash, typed" in out.errors[1].message


def test_enum_and_item_types_are_checked():
    out = parse("</think>\n\n" + block(invoke("typed", e="5"), invoke("typed", a='["x", 2]'), invoke("typed", a='["x", ["y"]]')),
                TOOLS)
    assert [c.arguments for c in out.tool_calls] == [{"a": ["x", "2"]}]  # a number where text is expected keeps its text
    assert [(e.code, e.invoke_index) for e in out.errors] == [("bad_value", 0), ("bad_type", 2)]
    assert "must be one of 1, 2, 3" in out.errors[0].message
    assert "Parameter 'a'[1] of tool 'typed' must be a string, got array" in out.errors[1].message


def test_one_error_per_invalid_call_naming_each_problem():
    """Rewards count invalid calls by their errors: a call with two problems is one error."""
    out = parse("</think>\n\n" + block(invoke("bash", timeout="soon", extra="1")), [{"type": "function", "function": {
        **BASH["function"], "parameters": {**BASH["function"]["parameters"], "additionalProperties": False}}}])
    assert [(e.kind, e.code) for e in out.errors] == [("schema", "missing_argument")]
    message = out.errors[0].message
    assert "missing required parameter 'command'" in message and "'timeout'" in message and "'extra'" in message


def test_additional_properties_false_rejects_unknown_key():
    strict = {"type": "function", "function": {"name": "s", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False}}}
    out = parse("</think>\n\n" + block(invoke("s", a="1", b="2")), [strict])
    assert codes(out) == ["unexpected_argument"] and out.tool_calls == []


@pytest.mark.parametrize("text, expected_codes, n_calls", [
    ("</think>\n\n<minimax:tool_call>\n" + invoke("bash", command="ls"), ["unclosed_block"], 1),
    ("</think>\n\n" + block('<invoke name="bash">\n<parameter name="command">ls</parameter>\n'), ["unclosed_invoke"], 0),
    ("</think>\n\n" + block('<invoke name="bash">\n<parameter name="command">ls</parameter>\n',
                            invoke("bash", command="pwd")), ["unclosed_invoke"], 1),
    ("</think>\n\n" + block('<invoke name="bash">\n<parameter name="command">ls\n</invoke>\n',
                            invoke("bash", command="pwd")), ["unclosed_parameter"], 1),
    ("</think>\n\n" + block('<invoke name="">\n</invoke>\n'), ["empty_invoke"], 0),
    ("</think>\n\n" + block('<invoke>\n<parameter name="command">x</parameter>\n</invoke>\n'), ["empty_invoke"], 0),
    ("</think>\n\n" + block(), ["empty_block"], 0),
    ("</think>\n\n" + block("oops ", invoke("bash", command="ls")), ["stray_text"], 1),
    ("</think>\n\n" + block('<invoke name="bash">\njunk<parameter name="command">ls</parameter>\n</invoke>\n'),
     ["stray_text"], 0),
    ("</think>\n\n" + block(invoke("bash", command="ls")) + " trailing", ["stray_text"], 1),
    ("</think>\n\n" + block(invoke("bash", command="ls")) + "[e~[more", ["stray_text"], 1),
    ("</think>\n\n" + invoke("bash", command="ls"), ["no_block"], 0),
    ("</think>\n\n" + block('<invoke name="bash">\n<parameter>x</parameter>\n</invoke>\n'), ["bad_parameter"], 0),
    ("</think>\n\n" + block(invoke("bash", command="a").replace("</invoke>", '<parameter name="command">b</parameter>'
                                                                 "\n</invoke>")), ["duplicate_parameter"], 0),
    ("</think>\n\n" + block('<invoke name="bash"'), ["unclosed_invoke"], 0),
])
def test_malformed_output_gives_structured_errors(text, expected_codes, n_calls):
    out = parse(text, TOOLS)
    assert codes(out) == expected_codes, out.errors
    assert len(out.tool_calls) == n_calls
    for e in out.errors:
        assert e.kind in ("format", "unknown_tool", "schema") and len(e.message) > 20


def test_unclosed_parameter_does_not_swallow_next_invoke():
    text = "</think>\n\n" + block('<invoke name="bash">\n<parameter name="command">ls\n</invoke>\n',
                                  invoke("bash", command="echo ok"))
    out = parse(text, TOOLS)
    assert [c.arguments for c in out.tool_calls] == [{"command": "echo ok"}]
    assert out.errors[0].invoke_index == 0


def test_value_may_contain_markup():
    html = '<div class="x">\n  <invoke name="not-a-call"></invoke>\n</div>'
    out = parse("</think>\n\n" + block(invoke("bash", command=html)), TOOLS)
    assert out.ok and out.tool_calls[0].arguments["command"] == html


def test_non_text_input_is_an_error_not_an_exception():
    out = parse(None)  # type: ignore[arg-type]
    assert codes(out) == ["not_text"]
    assert parse("x", tools="garbage").ok  # unusable tool specs are ignored, never raised on


def test_to_message_round_trips_through_render_completion():
    text = "plan\n</think>\n\nOK.\n" + block(invoke("bash", command="ls", timeout="3")) + "[e~["
    out = parse(text, TOOLS)
    assert render_completion(out.to_message()) == text


# ---- hypothesis ----

FRAGMENTS = ["<think>", "</think>", "<minimax:tool_call>", "</minimax:tool_call>", "<invoke", "<invoke name=",
             "</invoke>", "<parameter", "<parameter name=", "</parameter>", ">", '"', "'", "\n", " ", "[e~[",
             "bash", "command", "typed", "i", "1", "true", "[", "{", "}", "]", "ls", "=", "<", "é"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5)), max_size=40),
       st.sampled_from([None, True, False]))
def test_parse_never_raises(pieces, thinking):
    out = parse("".join(pieces), TOOLS, enable_thinking=thinking)
    assert isinstance(out, ParsedOutput)
    assert all(isinstance(e, FormatError) and e.message for e in out.errors)
    assert all(isinstance(c.arguments, dict) for c in out.tool_calls)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_parse_never_raises_on_any_text(text):
    parse(text, TOOLS)


NAME = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,12}", fullmatch=True)
STRING_VALUE = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40).filter(
    lambda s: "</parameter>" not in s
    and not any(m in s for m in ("[e~[", "<minimax:tool_call>", "</minimax:tool_call>", "]~b]")))
JSON_SCALAR = st.one_of(st.integers(-10**12, 10**12), st.booleans(), st.none(),
                        st.floats(allow_nan=False, allow_infinity=False))
# A value whose JSON holds a conversation marker cannot round-trip (the marker is a special token that
# ends or opens a block), so such values are not "well-formed calls".
JSON_VALUE = st.recursive(JSON_SCALAR | st.text(max_size=5),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                          max_leaves=6).filter(
    lambda v: not any(m in json.dumps(v, ensure_ascii=False)
                      for m in ("[e~[", "<minimax:tool_call>", "</minimax:tool_call>", "]~b]", "</parameter>")))
PLAIN = st.text(st.characters(blacklist_characters="<[", blacklist_categories=("Cs",)), max_size=30)


@settings(max_examples=150, deadline=None)
@given(calls=st.lists(st.tuples(NAME, st.dictionaries(NAME, STRING_VALUE | JSON_VALUE, max_size=4)),
                      min_size=1, max_size=3),
       reasoning=PLAIN, content=PLAIN)
def test_render_then_parse_round_trips(calls, reasoning, content):
    tools = {}
    for name, args in calls:  # one schema per tool name, typed from the first call that uses it
        props = tools.setdefault(name, {"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "properties": {}}}})["function"]["parameters"]["properties"]
        for k, v in args.items():
            props.setdefault(k, {"type": json_type(v)})
    calls = [(n, a) for n, a in calls
             if all(json_type(v) == tools[n]["function"]["parameters"]["properties"][k]["type"] for k, v in a.items())]
    message = {"role": "assistant", "reasoning_content": reasoning, "content": content,
               "tool_calls": [{"name": n, "arguments": a} for n, a in calls]}
    out = parse(render_completion(message), list(tools.values()))
    assert out.errors == []
    assert out.reasoning == reasoning and out.content == content
    assert [(c.name, c.arguments) for c in out.tool_calls] == calls


# Special tokens (one id each) end or open a message or block: a value cannot hold them, nor `</parameter>`.
UNWRITABLE = ("</parameter>", "[e~[", "]~!b[", "]~b]", "<minimax:tool_call>", "</minimax:tool_call>")
VALUE_TEXT = st.lists(st.one_of(st.text(st.characters(blacklist_categories=("Cs",)), max_size=8),
                                st.sampled_from(["\n", "\n\n", " ", "\t", "\r\n", "<think>", "</think>", "</invoke>",
                                                 '<invoke name="bash">', '<parameter name="x">', ">", '"', "<"])),
                      max_size=12).map("".join).filter(lambda s: not any(m in s for m in UNWRITABLE))


def _runs_into_next_invoke(value: str) -> bool:
    """`</invoke>` then `<invoke` inside one value reads as a parameter left unclosed before the next call."""
    closed = value.find("</invoke>")
    return closed >= 0 and re.search(r"<invoke(?=[\s>=])", value[closed:]) is not None


@settings(max_examples=300, deadline=None)
@given(value=VALUE_TEXT, other=VALUE_TEXT)
def test_string_arguments_round_trip_verbatim(value, other):
    """render -> parse is the identity on string arguments, leading and trailing whitespace included. The one
    exception is a value the parser reads as an unclosed parameter: then it says so, never a changed value."""
    tool = {"type": "function", "function": {"name": "edit", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}, "note": {"type": "string"}}}}}
    arguments = {"text": value, "note": other}
    message = {"role": "assistant", "reasoning_content": "r", "content": "",
               "tool_calls": [{"name": "edit", "arguments": arguments}]}
    out = parse(render_completion(message), [tool])
    if _runs_into_next_invoke(value) or _runs_into_next_invoke(other):
        assert out.tool_calls == [] and "unclosed_parameter" in codes(out)
    else:
        assert out.errors == []
        assert [(c.name, c.arguments) for c in out.tool_calls] == [("edit", arguments)]


def test_degenerate_output_errors_are_capped():
    out = parse("</think>\n\n<minimax:tool_call>" + '<invoke name="bash">junk' * 100, TOOLS)
    assert len(out.errors) == 21 and out.errors[-1].code == "too_many_errors"
    assert "81 more" in out.errors[-1].message  # 1 unclosed block + 100 unclosed invokes - 20 shown


# ----------------------------------------------------------------------------- bounded work on hostile output


@pytest.mark.parametrize("depth", [33, 500, 100_000])
def test_deeply_nested_values_are_schema_errors(depth):
    """Before: a 500-deep array parsed fine and raised RecursionError later (deep copies, repr, json.dumps)."""
    out = parse(block(invoke("typed", a="[" * depth + "]" * depth, o="{}")), TOOLS)
    assert out.tool_calls == [] and codes(out) == ["too_deep"]
    assert out.errors[0].kind == "schema"


def test_nesting_up_to_the_limit_is_fine():
    from m2rl.agent.schema import MAX_VALUE_DEPTH

    inner = MAX_VALUE_DEPTH - 1  # the object itself is one level
    value = {"k": json.loads("[" * inner + "]" * inner)}
    out = parse(block(invoke("typed", o=json.dumps(value))), TOOLS)
    assert out.ok and out.tool_calls[0].arguments["o"] == value


@pytest.mark.parametrize(
    "unit",
    ["<invoke name=\"bash\">\n", "<parameter name=\"command\">x", "<minimax:tool_call>\n", "</invoke>",
     "<invoke name=\"typed\">\n<parameter name=\"a\">[1,", "<minimax:tool_call>\n<invoke name=\"bash\">\n<parameter name=\"command\">"],
)
def test_parse_cost_is_linear_on_a_megabyte(unit):
    import time

    text = "x\n</think>\n\n" + unit * ((1 << 20) // len(unit))
    t0 = time.perf_counter()
    out = parse(text, TOOLS)
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"{len(text)} chars took {elapsed:.1f} s"
    assert len(out.errors) <= 21
