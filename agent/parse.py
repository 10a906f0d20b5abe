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
- Arguments are checked and typed against the tool's JSON schema by `agent/schema.py` (the one
  validator: types, enums, nesting depth; keys absent from the schema stay strings unless it is closed).
  An invalid call gets one `schema` error, whose message names each problem and whose code is the first's.
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

import re
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
from m2rl.agent.schema import check_arguments

# Coarse kinds follow the env -> rewards contract (docs/design.md); `code` is the precise failure.
KIND_FORMAT, KIND_UNKNOWN_TOOL, KIND_SCHEMA = "format", "unknown_tool", "schema"

# An opener is the tag name followed by its attributes or `>` (`<invokes` is text).
INVOKE_START = re.compile(re.escape(INVOKE_OPEN) + r"(?=[\s>=])")
PARAMETER_START = re.compile(re.escape(PARAMETER_OPEN) + r"(?=[\s>=])")
NAME_ATTRIBUTE = re.compile(r"\s*name\s*=\s*")
MAX_ERRORS = 20
WHITESPACE = re.compile(r"\s*")
CALL_EXAMPLE = '<minimax:tool_call>\n<invoke name="TOOL">\n<parameter name="KEY">VALUE</parameter>\n</invoke>\n</minimax:tool_call>'


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


def _snippet(text: str, limit: int = 60) -> str:
    text = text.strip()
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _tool_table(tools: Any) -> dict[str, Mapping[str, Any]] | None:
    """name -> parameters schema; malformed entries are skipped (parse must not raise)."""
    if tools is None or isinstance(tools, (str, bytes)):
        return None
    items = tools.values() if isinstance(tools, Mapping) else tools
    table: dict[str, Mapping[str, Any]] = {}
    try:
        for tool in items:
            function = tool.get("function", tool) if isinstance(tool, Mapping) else None
            if isinstance(function, Mapping) and isinstance(function.get("name"), str):
                parameters = function.get("parameters")
                table[function["name"]] = parameters if isinstance(parameters, Mapping) else {}
    except TypeError:
        return None
    return table


def _attr_name(header: str) -> str | None:
    """`name="x"` -> x: text up to the first `>` (already cut), one layer of quotes removed."""
    prefix = NAME_ATTRIBUTE.match(header)
    if not prefix:
        return None
    name = header[prefix.end():].strip()
    if name[:1] in "\"'" and name:
        name = name[1:]
    if name[-1:] in "\"'" and name:
        name = name[:-1]
    return name


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
        match = pattern.search(self.text, pos)
        self._last[pattern] = (pos, match.start() if match else -1, match)
        return match

    def search_start(self, pattern: re.Pattern[str], pos: int) -> int:
        match = self.search(pattern, pos)
        return match.start() if match else -1


@dataclass
class _Invoke:
    """One `<invoke>` being read: its position among the output's invokes, its name, its raw arguments."""

    index: int  # 0-based, counting invalid invokes
    name: str | None
    body_start: int  # just after the `>` of `<invoke name="...">`
    arguments: dict[str, str] = field(default_factory=dict)
    ok: bool = True  # False once any error is reported: the call is not returned

    @property
    def label(self) -> str:
        """How messages name it: "Tool call 2 ('bash')" (1-based)."""
        return f"Tool call {self.index + 1}" + (f" ({self.name!r})" if self.name else "")


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

    def parse_blocks(self, text: str, start: int) -> None:
        """Every `<minimax:tool_call>` block of `text` from `start` (where the first one opens) to the end."""
        find = _Finder(text)
        pos = start
        while pos < len(text):
            open_at = find.find(TOOL_CALL_OPEN, pos)
            gap = text[pos: open_at if open_at >= 0 else len(text)]
            if gap.strip():
                self.error(KIND_FORMAT, "stray_text", f"Text after a tool-call block was ignored: {_snippet(gap)}. "
                           "Put text before <minimax:tool_call> and end the message after </minimax:tool_call>.")
            if open_at < 0:
                return
            body_start = open_at + len(TOOL_CALL_OPEN)
            close_at = find.find(TOOL_CALL_CLOSE, body_start)
            next_open = find.find(TOOL_CALL_OPEN, body_start)
            if close_at < 0 or 0 <= next_open < close_at:
                body_end = next_open if next_open >= 0 else len(text)
                self.error(KIND_FORMAT, "unclosed_block",
                           "The <minimax:tool_call> block is not closed. End it with </minimax:tool_call>.")
                self.parse_block(text[body_start:body_end])
                pos = body_end
                continue
            self.parse_block(text[body_start:close_at])
            pos = close_at + len(TOOL_CALL_CLOSE)

    def parse_block(self, block: str) -> None:
        self.find = _Finder(block)
        pos, found = 0, False
        while True:
            opener = self.find.search(INVOKE_START, pos)
            gap = block[pos: opener.start() if opener else len(block)]
            if gap.strip():
                self.error(KIND_FORMAT, "stray_text",
                           f"Unexpected text {_snippet(gap)} inside <minimax:tool_call>; only <invoke> elements "
                           f"belong there. Write calls as {CALL_EXAMPLE}")
            if not opener:
                break
            found = True
            pos = self.parse_invoke(block, opener.end())
        if not found:
            self.error(KIND_FORMAT, "empty_block",
                       f"The <minimax:tool_call> block has no <invoke>. Write calls as {CALL_EXAMPLE}")

    def parse_invoke(self, block: str, start: int) -> int:
        """Parse one invoke whose `<invoke` ends at `start`; return where scanning resumes. Steps: the header,
        then parameters (and stray text) up to `</invoke>`, then the call is validated. A part that cannot be
        closed abandons the invoke (`abandoned`), resuming where the next invoke may start."""
        invoke = self.read_header(block, start)
        if invoke is None:
            return len(block)
        pos = invoke.body_start
        while True:
            pos = WHITESPACE.match(block, pos).end()  # type: ignore[union-attr]  # \s* always matches
            if block.startswith(INVOKE_CLOSE, pos):
                self.finish(invoke)
                return pos + len(INVOKE_CLOSE)
            if PARAMETER_START.match(block, pos):
                pos, abandoned = self.read_parameter(block, pos, invoke)
            else:
                pos, abandoned = self.skip_stray_text(block, pos, invoke)
            if abandoned:
                return pos

    def read_header(self, block: str, start: int) -> _Invoke | None:
        """The invoke's name from `<invoke name="...">`; None (and an error) when its `>` is missing."""
        index, self.n_invokes = self.n_invokes, self.n_invokes + 1
        header_end = self.find.find(">", start)
        if header_end < 0:
            self.error(KIND_FORMAT, "unclosed_invoke",
                       f"Tool call {index + 1}: the <invoke ...> tag is not closed with '>'. Write <invoke name=\"TOOL\">.",
                       index=index)
            return None
        invoke = _Invoke(index, _attr_name(block[start:header_end]), header_end + 1)
        if not invoke.name:
            self.error(KIND_FORMAT, "empty_invoke",
                       f"{invoke.label}: <invoke> has no tool name. Write <invoke name=\"TOOL\">...</invoke>.",
                       index=index)
            invoke.ok = False
        return invoke

    def read_parameter(self, block: str, start: int, invoke: _Invoke) -> tuple[int, bool]:
        """One `<parameter name="KEY">VALUE</parameter>` at `start`, its value kept verbatim; returns (where
        to go on, abandoned)."""
        opener = PARAMETER_START.match(block, start)
        assert opener is not None  # the caller matched it
        header_end = self.find.find(">", opener.end())
        key = _attr_name(block[opener.end():header_end]) if header_end >= 0 else None
        if not key:
            self.error(KIND_FORMAT, "bad_parameter",
                       f"{invoke.label}: a <parameter> has no name. Write <parameter name=\"KEY\">VALUE</parameter>.",
                       invoke.name, invoke.index)
            invoke.ok = False
            if header_end < 0:
                return len(block), True
        value_end = self.find.find(PARAMETER_CLOSE, header_end + 1)
        invoke_end = self.find.find(INVOKE_CLOSE, header_end + 1)
        if value_end < 0 or self.runs_into_next_invoke(invoke_end, value_end):
            self.error(KIND_FORMAT, "unclosed_parameter",
                       f"{invoke.label}: parameter {key!r} is not closed. End every value with </parameter>.",
                       invoke.name, invoke.index)
            return (invoke_end + len(INVOKE_CLOSE) if invoke_end >= 0 else len(block)), True
        if key:
            if key in invoke.arguments:
                self.error(KIND_FORMAT, "duplicate_parameter",
                           f"{invoke.label}: parameter {key!r} is given twice; give each parameter once.",
                           invoke.name, invoke.index)
                invoke.ok = False
            invoke.arguments[key] = block[header_end + 1:value_end]
        return value_end + len(PARAMETER_CLOSE), False

    def runs_into_next_invoke(self, invoke_end: int, value_end: int) -> bool:
        """Whether `</invoke>` and then `<invoke` come before the value's `</parameter>`: its closer is missing,
        and reading on would swallow the following calls into this value."""
        return 0 <= invoke_end < value_end and 0 <= self.find.search_start(INVOKE_START, invoke_end) < value_end

    def skip_stray_text(self, block: str, start: int, invoke: _Invoke) -> tuple[int, bool]:
        """Text inside an invoke that is no parameter: an error, skipped up to the next tag. When that tag is
        another invoke (or there is none), this invoke was never closed: abandoned."""
        next_invoke = self.find.search_start(INVOKE_START, start)
        next_tags = [at for at in (self.find.find(INVOKE_CLOSE, start), self.find.search_start(PARAMETER_START, start),
                                   next_invoke) if at >= 0]
        if not next_tags or min(next_tags) == next_invoke:
            self.error(KIND_FORMAT, "unclosed_invoke",
                       f"{invoke.label} is not closed. End every call with </invoke>.", invoke.name, invoke.index)
            return (next_invoke if next_invoke >= 0 else len(block)), True
        resume = min(next_tags)
        self.error(KIND_FORMAT, "stray_text",
                   f"{invoke.label}: unexpected text {_snippet(block[start:resume])} inside <invoke>; only "
                   "<parameter name=\"KEY\">VALUE</parameter> elements belong there.", invoke.name, invoke.index)
        invoke.ok = False
        return resume, False

    def finish(self, invoke: _Invoke) -> None:
        """A closed invoke with no error so far becomes a call if its tool and arguments are valid."""
        if not (invoke.ok and invoke.name):
            return
        typed = self.validate(invoke.name, invoke.arguments, invoke.index)
        if typed is not None:
            self.calls.append(ToolCall(invoke.name, typed, invoke.index))

    def validate(self, name: str, arguments: dict[str, str], index: int) -> dict[str, Any] | None:
        """The typed arguments, or None (and one error) for an unknown tool or arguments its schema refuses.
        Without tool specs every call is valid and its values stay text."""
        if self.tools is None:
            return dict(arguments)
        if name not in self.tools:
            known = ", ".join(sorted(self.tools)) or "(none)"
            self.error(KIND_UNKNOWN_TOOL, "unknown_tool",
                       f"Tool call {index + 1} ({name!r}): unknown tool {name!r}. Available tools: {known}.",
                       name, index)
            return None
        typed, problems = check_arguments(name, self.tools[name], arguments)
        if problems:
            # One error per invalid call (rewards count invalid calls), naming every problem in it.
            self.error(KIND_SCHEMA, problems[0].code, " ".join(p.message for p in problems), name, index)
            return None
        return typed


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
    blocks.parse_blocks(rest, start)
    out.tool_calls, out.errors = blocks.calls, _capped(out.errors + blocks.errors)
    return out


def _capped(errors: list[FormatError]) -> list[FormatError]:
    """At most MAX_ERRORS errors and a count of the rest: a degenerate output would otherwise flood the
    model's next prompt."""
    if len(errors) <= MAX_ERRORS:
        return errors
    more = len(errors) - MAX_ERRORS
    return errors[:MAX_ERRORS] + [FormatError(
        KIND_FORMAT, f"... and {more} more format errors of the same output.", None, "too_many_errors")]
