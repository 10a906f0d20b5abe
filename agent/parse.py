"""Parse what an M2 model wrote after the generation prompt into reasoning, content and tool calls.

`parse(text, tools)` never raises. Malformed output becomes `FormatError`s whose messages tell the model
what to write instead. Decisions (documented because peers differ):

- Reasoning is the text before the first `</think>` (a leading `<think>` is dropped); exactly one
  newline before `</think>` and the `\\n\\n` after it are separators, not text. Without `</think>`
  the text is content, unless it opened with `<think>` or `enable_thinking=True` was passed: then it is
  unfinished reasoning (error `unclosed_think`) and nothing is executed.
- Parameter values are verbatim: exactly the text between `>` and `</parameter>`, since the template writes
  them inline (vLLM's `minimax_m2` parser does the same). Whitespace at either end is data: a file's final
  newline, code indentation. So `parse` inverts `render` on every string value except those holding
  `</parameter>` (the format has no escaping), a special-token marker, or `</invoke>` followed by `<invoke`:
  that last one reads as a parameter left unclosed before the next call and is a format error
  (`unclosed_parameter`), never a silently different value.
- Names are the text up to the first `>`, one layer of quotes removed.
- Values are typed by the tool's JSON schema (integer, number, boolean, null, array, object: JSON,
  then a lenient fallback: Python literals, `True`, `None`); keys absent from the schema stay strings.
- Values nest at most `MAX_VALUE_DEPTH` levels (`[[...]]`); deeper is a schema error (`too_deep`): every
  later deep copy, `repr` and `json.dumps` of the arguments recurses once per level.
- Work is linear in the text: each closer (`</parameter>`, `</invoke>`, `</minimax:tool_call>`) is searched
  for once per position reached, not once per opener (`_Finder`), so hostile output costs no more than
  ordinary output of the same length.
- Partial validity: every invoke is checked on its own. An invoke with any error (unclosed, unknown
  tool, missing/ill-typed argument, stray text inside it) is not returned; the valid invokes of the
  same output are returned, in order. Errors carry `invoke_index` (0-based position of the invoke in
  the output) and the messages say "tool call N" (1-based). Callers that want all-or-nothing check
  `ParsedOutput.ok`.
"""

from __future__ import annotations

import ast
import json
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from m2rl.agent.render import (
    EOS,
    INVOKE_CLOSE,
    INVOKE_OPEN,
    PARAMETER_CLOSE,
    PARAMETER_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
)

# Coarse kinds follow the env -> rewards contract (docs/design.md); `code` is the precise failure.
KIND_FORMAT, KIND_UNKNOWN_TOOL, KIND_SCHEMA = "format", "unknown_tool", "schema"

# An opener is the tag name followed by its attributes or `>` (`<invokes` is text).
INVOKE_START = re.compile(re.escape(INVOKE_OPEN) + r"(?=[\s>=])")
PARAMETER_START = re.compile(re.escape(PARAMETER_OPEN) + r"(?=[\s>=])")
MAX_ERRORS = 20
MAX_VALUE_DEPTH = 32  # nesting levels of one parameter value; real arguments use a handful
WHITESPACE = re.compile(r"\s*")
CALL_EXAMPLE = '<minimax:tool_call>\n<invoke name="TOOL">\n<parameter name="KEY">VALUE</parameter>\n</invoke>\n</minimax:tool_call>'
TYPE_EXAMPLES = {"integer": "3", "number": "1.5", "boolean": "true", "null": "null",
                 "array": '["a", "b"]', "object": '{"key": "value"}', "string": "text"}


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    index: int = 0  # position of the invoke in the output (0-based, counting invalid ones)

    def to_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "arguments": dict(self.arguments)}}


@dataclass
class FormatError:
    kind: str  # "format" | "unknown_tool" | "schema"
    message: str  # written for the model to act on
    tool: str | None = None
    code: str = ""  # e.g. "unclosed_block", "missing_argument", "bad_type"
    invoke_index: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "tool": self.tool, "code": self.code,
                "invoke_index": self.invoke_index}


@dataclass
class ParsedOutput:
    reasoning: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[FormatError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_message(self) -> dict[str, Any]:
        """The OpenAI-style assistant message (reasoning_content is always a string so the renderer
        never re-splits content that happens to contain `</think>`)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content, "reasoning_content": self.reasoning}
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return msg


def _snippet(text: str, n: int = 60) -> str:
    text = text.strip()
    return repr(text if len(text) <= n else text[:n] + "...")


def _tool_table(tools: Any) -> dict[str, Mapping[str, Any]] | None:
    """name -> parameters schema; malformed entries are skipped (parse must not raise)."""
    if tools is None or isinstance(tools, (str, bytes)):
        return None
    items = tools.values() if isinstance(tools, Mapping) else tools
    table: dict[str, Mapping[str, Any]] = {}
    try:
        for t in items:
            fn = t.get("function", t) if isinstance(t, Mapping) else None
            if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
                params = fn.get("parameters")
                table[fn["name"]] = params if isinstance(params, Mapping) else {}
    except TypeError:
        return None
    return table


def _schema_types(schema: Any) -> set[str]:
    if not isinstance(schema, Mapping):
        return set()
    t = schema.get("type")
    types = {t} if isinstance(t, str) else {x for x in t if isinstance(x, str)} if isinstance(t, list) else set()
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            types |= _schema_types(sub)
    if not types and isinstance(schema.get("enum"), list):
        types = {_json_type(v) for v in schema["enum"]}
    return types & set(TYPE_EXAMPLES)  # unknown type names are ignored (the value stays a string)


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object" if isinstance(v, dict) else "unknown"


def _fits(v: Any, types: set[str]) -> tuple[bool, Any]:
    jt = _json_type(v)
    if jt in types:
        return True, v
    if jt == "integer" and "number" in types:
        return True, v
    if jt == "number" and "integer" in types and not math.isnan(v) and float(v).is_integer():
        return True, int(v)
    return False, v


_LENIENT_WORDS = {"true": True, "false": False, "null": None, "none": None}


def _decode_candidates(raw: str) -> list[Any]:
    """JSON first, then lenient readings (Python literals, capitalised booleans)."""
    text, out = raw.strip(), []
    try:
        out.append(json.loads(text))
    except (ValueError, RecursionError):
        pass
    if text.lower() in _LENIENT_WORDS:
        out.append(_LENIENT_WORDS[text.lower()])
    if len(text) <= 100_000:
        try:
            with warnings.catch_warnings():  # e.g. SyntaxWarning for "\\d" escapes in model text
                warnings.simplefilter("ignore")
                v = ast.literal_eval(text)
            out.append(list(v) if isinstance(v, tuple) else v)
        except Exception:  # noqa: BLE001, S110  literal_eval raises many types (ValueError, SyntaxError, MemoryError, ...)
            pass
    return out


def _json_too_deep(raw: str) -> bool:
    """Whether `raw` failed to decode only because it nests deeper than the JSON decoder recurses."""
    try:
        json.loads(raw)
    except RecursionError:
        return True
    except ValueError:
        return False
    return False


def coerce_value(raw: str, schema: Any) -> tuple[bool, Any]:
    """(ok, value) of a parameter's raw text under its JSON schema."""
    types = _schema_types(schema)
    if not types or types == {"string"}:
        return True, raw
    for candidate in _decode_candidates(raw):
        ok, v = _fits(candidate, types - {"string"})
        if ok:
            return True, v
    return ("string" in types), raw


def _attr_name(header: str) -> str | None:
    """`name="x"` -> x: text up to the first `>` (already cut), one layer of quotes removed."""
    m = re.match(r"\s*name\s*=\s*", header)
    if not m:
        return None
    name = header[m.end():].strip()
    if name[:1] in "\"'" and name:
        name = name[1:]
    if name[-1:] in "\"'" and name:
        name = name[:-1]
    return name


def nesting_depth(value: Any, limit: int = MAX_VALUE_DEPTH) -> int:
    """Levels of list/tuple/dict nesting in `value` (a scalar is 0), counted without recursion and
    without looking deeper than `limit + 1` levels (enough to say "too deep")."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children = list(item.values())
        elif isinstance(item, (list, tuple)):
            children = list(item)
        else:
            continue
        deepest = max(deepest, depth + 1)
        if deepest > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


class _Finder:
    """`str.find` and regex search over one text, remembering the last answer per needle. The parser only
    moves forward, so a remembered hit at or after the new position (or a remembered miss) is still the
    answer: a missing closer is searched for once, not once per opener (quadratic on hostile output)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._last: dict[Any, tuple[int, int, re.Match[str] | None]] = {}

    def _cached(self, key: Any, pos: int) -> tuple[int, re.Match[str] | None] | None:
        hit = self._last.get(key)
        if hit is not None and hit[0] <= pos and (hit[1] < 0 or hit[1] >= pos):
            return hit[1], hit[2]
        return None

    def find(self, needle: str, pos: int) -> int:
        cached = self._cached(needle, pos)
        if cached is not None:
            return cached[0]
        at = self.text.find(needle, pos)
        self._last[needle] = (pos, at, None)
        return at

    def search(self, pattern: re.Pattern[str], pos: int) -> re.Match[str] | None:
        cached = self._cached(pattern, pos)
        if cached is not None:
            return cached[1]
        m = pattern.search(self.text, pos)
        self._last[pattern] = (pos, m.start() if m else -1, m)
        return m

    def search_start(self, pattern: re.Pattern[str], pos: int) -> int:
        m = self.search(pattern, pos)
        return m.start() if m else -1


class _BlockParser:
    """Parses the invokes of tool-call blocks, collecting calls and errors."""

    def __init__(self, tools: dict[str, Mapping[str, Any]] | None) -> None:
        self.tools = tools
        self.calls: list[ToolCall] = []
        self.errors: list[FormatError] = []
        self.n_invokes = 0
        self.find = _Finder("")  # over the block being parsed

    def error(self, kind: str, code: str, message: str, tool: str | None = None, index: int | None = None) -> None:
        self.errors.append(FormatError(kind, message, tool, code, index))

    def parse_block(self, block: str) -> None:
        self.find = _Finder(block)
        pos, found = 0, False
        while True:
            m = self.find.search(INVOKE_START, pos)
            gap = block[pos: m.start() if m else len(block)]
            if gap.strip():
                self.error(KIND_FORMAT, "stray_text",
                           f"Unexpected text {_snippet(gap)} inside <minimax:tool_call>; only <invoke> elements "
                           f"belong there. Write calls as {CALL_EXAMPLE}")
            if not m:
                break
            found = True
            pos = self.parse_invoke(block, m.end())
        if not found:
            self.error(KIND_FORMAT, "empty_block",
                       f"The <minimax:tool_call> block has no <invoke>. Write calls as {CALL_EXAMPLE}")

    def parse_invoke(self, block: str, pos: int) -> int:
        """Parse one invoke whose `<invoke` ends at `pos`; return where scanning resumes."""
        index, self.n_invokes = self.n_invokes, self.n_invokes + 1
        label = f"Tool call {index + 1}"
        find = self.find
        gt = find.find(">", pos)
        if gt < 0:
            self.error(KIND_FORMAT, "unclosed_invoke",
                       f"{label}: the <invoke ...> tag is not closed with '>'. Write <invoke name=\"TOOL\">.",
                       index=index)
            return len(block)
        name = _attr_name(block[pos:gt])
        if not name:
            self.error(KIND_FORMAT, "empty_invoke",
                       f"{label}: <invoke> has no tool name. Write <invoke name=\"TOOL\">...</invoke>.", index=index)
        label = f"{label} ({name!r})" if name else label
        args: dict[str, str] = {}
        ok, p = bool(name), gt + 1
        while True:
            q = WHITESPACE.match(block, p).end()  # type: ignore[union-attr]  # \s* always matches
            if block.startswith(INVOKE_CLOSE, q):
                p = q + len(INVOKE_CLOSE)
                break
            pm = PARAMETER_START.match(block, q)
            if pm is None:
                next_invoke = find.search_start(INVOKE_START, q)
                nxt = [i for i in (find.find(INVOKE_CLOSE, q), find.search_start(PARAMETER_START, q), next_invoke) if i >= 0]
                if not nxt or min(nxt) == next_invoke:
                    self.error(KIND_FORMAT, "unclosed_invoke",
                               f"{label} is not closed. End every call with </invoke>.", name, index)
                    return next_invoke if next_invoke >= 0 else len(block)
                self.error(KIND_FORMAT, "stray_text",
                           f"{label}: unexpected text {_snippet(block[q:min(nxt)])} inside <invoke>; only "
                           "<parameter name=\"KEY\">VALUE</parameter> elements belong there.", name, index)
                ok, p = False, min(nxt)
                continue
            pgt = find.find(">", pm.end())
            key = _attr_name(block[pm.end():pgt]) if pgt >= 0 else None
            if not key:
                self.error(KIND_FORMAT, "bad_parameter",
                           f"{label}: a <parameter> has no name. Write <parameter name=\"KEY\">VALUE</parameter>.",
                           name, index)
                ok = False
                if pgt < 0:
                    return len(block)
            end = find.find(PARAMETER_CLOSE, pgt + 1)
            inv_end = find.find(INVOKE_CLOSE, pgt + 1)
            # A missing </parameter> would otherwise swallow the following invokes into this value.
            if end < 0 or (0 <= inv_end < end and 0 <= find.search_start(INVOKE_START, inv_end) < end):
                self.error(KIND_FORMAT, "unclosed_parameter",
                           f"{label}: parameter {key!r} is not closed. End every value with </parameter>.",
                           name, index)
                return inv_end + len(INVOKE_CLOSE) if inv_end >= 0 else len(block)
            if key:
                if key in args:
                    self.error(KIND_FORMAT, "duplicate_parameter",
                               f"{label}: parameter {key!r} is given twice; give each parameter once.", name, index)
                    ok = False
                args[key] = block[pgt + 1:end]
            p = end + len(PARAMETER_CLOSE)
        if ok and name:
            typed = self.validate(name, args, index, label)
            if typed is not None:
                self.calls.append(ToolCall(name, typed, index))
        return p

    def validate(self, name: str, args: dict[str, str], index: int, label: str) -> dict[str, Any] | None:
        if self.tools is None:
            return dict(args)
        if name not in self.tools:
            known = ", ".join(sorted(self.tools)) or "(none)"
            self.error(KIND_UNKNOWN_TOOL, "unknown_tool",
                       f"{label}: unknown tool {name!r}. Available tools: {known}.", name, index)
            return None
        schema = self.tools[name]
        props: Mapping[str, Any] = schema["properties"] if isinstance(schema.get("properties"), Mapping) else {}
        required = [r for r in (schema.get("required") or []) if isinstance(r, str)]
        typed: dict[str, Any] = {}
        ok = True
        for key in required:
            if key not in args:
                self.error(KIND_SCHEMA, "missing_argument",
                           f"Tool {name!r} is missing required parameter {key!r}. Call it as <invoke name=\"{name}\">"
                           f"<parameter name=\"{key}\">...</parameter></invoke>.", name, index)
                ok = False
        for key, raw in args.items():
            if key not in props:
                if schema.get("additionalProperties") is False:
                    allowed = ", ".join(props) or "(none)"
                    self.error(KIND_SCHEMA, "unexpected_argument",
                               f"Tool {name!r} has no parameter {key!r}. Its parameters are: {allowed}.", name, index)
                    ok = False
                typed[key] = raw
                continue
            good, value = coerce_value(raw, props[key])
            if (good and nesting_depth(value) > MAX_VALUE_DEPTH) or (not good and _json_too_deep(raw)):
                self.error(KIND_SCHEMA, "too_deep",
                           f"Parameter {key!r} of tool {name!r} is nested more than {MAX_VALUE_DEPTH} levels deep; "
                           "pass flatter data (or a string).", name, index)
                ok = False
            elif not good:
                want = " or ".join(sorted(_schema_types(props[key])))
                example = TYPE_EXAMPLES.get(min(_schema_types(props[key])), "")
                self.error(KIND_SCHEMA, "bad_type",
                           f"Parameter {key!r} of tool {name!r} must be {want}, got {_snippet(raw)}. Write it as "
                           f"JSON, e.g. <parameter name=\"{key}\">{example}</parameter>.", name, index)
                ok = False
            typed[key] = value
        return typed if ok else None


def _split_reasoning(text: str, enable_thinking: bool | None, errors: list[FormatError]) -> tuple[str, str, bool]:
    """(reasoning, rest, finished) of the text after the generation prompt."""
    opened = text.lstrip("\n").startswith(THINK_OPEN)
    if opened:
        text = text.lstrip("\n")[len(THINK_OPEN):]
        text = text.removeprefix("\n")
    if THINK_CLOSE not in text:
        if opened or enable_thinking:
            errors.append(FormatError(KIND_FORMAT,
                                      "Your reasoning was not closed: end it with </think> before the answer or "
                                      "tool calls. Nothing was executed.", None, "unclosed_think"))
            return text, "", False
        return "", text, True
    reasoning, rest = text.split(THINK_CLOSE, 1)
    reasoning = reasoning.removesuffix("\n")
    rest = rest[2:] if rest.startswith("\n\n") else rest.lstrip("\n")
    return reasoning, rest, True


def parse(text: Any, tools: Any = None, *, enable_thinking: bool | None = None) -> ParsedOutput:
    """Parse model output (the text after the generation prompt). `enable_thinking`: None guesses from
    the text; True means the prompt opened `<think>`, so text without `</think>` is unfinished reasoning."""
    out = ParsedOutput()
    if not isinstance(text, str):
        out.errors.append(FormatError(KIND_FORMAT, f"Expected text output, got {type(text).__name__}.",
                                      None, "not_text"))
        return out
    if EOS in text:
        text, after = text.split(EOS, 1)
        if after.strip():
            out.errors.append(FormatError(KIND_FORMAT, f"Text after the end of the message was ignored: "
                                          f"{_snippet(after)}.", None, "stray_text"))
    reasoning, rest, finished = _split_reasoning(text, enable_thinking, out.errors)
    out.reasoning = reasoning
    if not finished:
        return out
    start = rest.find(TOOL_CALL_OPEN)
    content = rest if start < 0 else rest[:start]
    out.content = content[:-1] if start >= 0 and content.endswith("\n") else content
    if start < 0:
        if INVOKE_START.search(rest):
            out.errors.append(FormatError(KIND_FORMAT, "Found <invoke> outside a <minimax:tool_call> block, so no "
                                          f"tool was called. Wrap tool calls as {CALL_EXAMPLE}", None, "no_block"))
        elif TOOL_CALL_CLOSE in rest:
            out.errors.append(FormatError(KIND_FORMAT, "Found </minimax:tool_call> without an opening "
                                          f"<minimax:tool_call>. Write calls as {CALL_EXAMPLE}", None, "stray_text"))
        return out
    blocks = _BlockParser(_tool_table(tools))
    find = _Finder(rest)
    pos = start
    while pos < len(rest):
        open_at = find.find(TOOL_CALL_OPEN, pos)
        gap = rest[pos: open_at if open_at >= 0 else len(rest)]
        if gap.strip():
            blocks.error(KIND_FORMAT, "stray_text", f"Text after a tool-call block was ignored: {_snippet(gap)}. "
                         "Put text before <minimax:tool_call> and end the message after </minimax:tool_call>.")
        if open_at < 0:
            break
        body_start = open_at + len(TOOL_CALL_OPEN)
        close_at = find.find(TOOL_CALL_CLOSE, body_start)
        next_open = find.find(TOOL_CALL_OPEN, body_start)
        if close_at < 0 or 0 <= next_open < close_at:
            body_end = next_open if next_open >= 0 else len(rest)
            blocks.error(KIND_FORMAT, "unclosed_block",
                         "The <minimax:tool_call> block is not closed. End it with </minimax:tool_call>.")
            blocks.parse_block(rest[body_start:body_end])
            pos = body_end
            continue
        blocks.parse_block(rest[body_start:close_at])
        pos = close_at + len(TOOL_CALL_CLOSE)
    out.tool_calls, out.errors = blocks.calls, out.errors + blocks.errors
    if len(out.errors) > MAX_ERRORS:  # a degenerate output would otherwise flood the model's next prompt
        more = len(out.errors) - MAX_ERRORS
        out.errors = out.errors[:MAX_ERRORS] + [FormatError(
            KIND_FORMAT, f"... and {more} more format errors of the same output.", None, "too_many_errors")]
    return out
