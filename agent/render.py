"""Render OpenAI-style messages into the MiniMax-M2 conversation text (shared/reference/m2-format.md).

This mirrors the official MiniMax-M2 `chat_template.jinja` step by step, as plain Python so it can be
read, tested and used without Jinja:

- system text = the first message's content when its role is `system`, else the default identity;
  tools follow it as one `<tool>{json}</tool>` line per tool (JSON of the spec's "function" object).
- an assistant message writes `<think>\\n{reasoning}\\n</think>\\n\\n` only when it comes after the last
  user message (interleaved thinking), then its content, then `\\n<minimax:tool_call>\\n...`.
- consecutive tool messages share one `]~b]tool` header.
- the generation prompt is `]~b]ai\\n<think>\\n` (thinking on) or `]~b]ai\\n` (thinking off).

Deliberate deviations from the Jinja template, each because the template would silently produce junk:
`content=None` renders as "" (Jinja would print "None"); a `system` message that is not first, an
unknown role, or arguments that are not a mapping raise `RenderError` instead of being dropped.

Two extras serve token-exact rollouts, which append text instead of re-rendering:
`render_tool_suffix` / `render_user_suffix` (what the env appends after a sampled `[e~[`) and
`render_completion` (what the model writes for an assistant message after the generation prompt).
`keep_all_reasoning=True` renders what an append-only rollout actually showed the model: reasoning of
older turns is not dropped when a new user message arrives.

Environment text (tool output, error messages that quote the agent) must never read as structure:
`neutralize_markers` breaks every `STRUCTURE_MARKERS` string (and a tokenizer's own special tokens,
`control_tokens(tokenizer)`) inside it with a zero-width space, so it encodes to ordinary ids. Envs
apply it to what they render; the continuity check applies it to the tool messages it re-renders.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# The markers that are special tokens (one id each) belong to the tokenizer, which defines them once; the
# format's other tags are ordinary text and are defined here. Everything else imports both from this module
# (or `m2rl.agent.format`).
from m2rl.model.tokenizer import (
    BOS,
    EOS,
    MESSAGE_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
)

INVOKE_OPEN, INVOKE_CLOSE = "<invoke", "</invoke>"  # the opener's name attribute follows: `<invoke name="x">`
PARAMETER_OPEN, PARAMETER_CLOSE = "<parameter", "</parameter>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<response>", "</response>"

DEFAULT_SYSTEM = "You are a helpful assistant."

# Every string that reads as conversation structure: the special tokens of every M2 tokenizer (one id
# each) and the tags the model reads as calls and responses (`</response>\n<response>` in a tool's output
# would forge a second response). The single list of what environment text may not contain.
STRUCTURE_MARKERS: tuple[str, ...] = (
    BOS, MESSAGE_OPEN, EOS, THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE,
    INVOKE_OPEN, INVOKE_CLOSE, PARAMETER_OPEN, PARAMETER_CLOSE, RESPONSE_OPEN, RESPONSE_CLOSE,
)
# Inserted after a marker's first character: invisible when read, and it splits the marker so the
# tokenizer's special-token matcher (exact substrings) and the parser no longer see it.
ZERO_WIDTH_SPACE = "\u200b"

TOOLS_HEADER = (
    "\n\n# Tools\nYou may call one or more tools to assist with the user query.\n"
    "Here are the tools available in JSONSchema format:\n\n<tools>\n"
)
TOOLS_FOOTER = (
    "</tools>\n\nWhen making tool calls, use XML format to invoke tools and pass parameters:\n\n"
    '<minimax:tool_call>\n<invoke name="tool-name-1">\n<parameter name="param-key-1">param-value-1</parameter>\n'
    '<parameter name="param-key-2">param-value-2</parameter>\n...\n</invoke>\n</minimax:tool_call>'
)

Message = Mapping[str, Any]


class RenderError(ValueError):
    """The messages or tools cannot be rendered; the message names the offending entry."""


def control_tokens(tokenizer: Any) -> tuple[str, ...]:
    """The special/added tokens of a tokenizer: an `M2Tokenizer` (its backend), a `tokenizers.Tokenizer`,
    or a transformers tokenizer. Text containing one of them would encode to its control id."""
    backend = getattr(tokenizer, "backend", tokenizer)
    if hasattr(backend, "get_added_tokens_decoder"):  # tokenizers.Tokenizer
        return tuple(t.content for t in backend.get_added_tokens_decoder().values())
    decoder = getattr(tokenizer, "added_tokens_decoder", None)  # transformers
    if isinstance(decoder, Mapping):
        return tuple(str(getattr(t, "content", t)) for t in decoder.values())
    return ()


@functools.lru_cache(maxsize=16)
def _marker_pattern(markers: tuple[str, ...]) -> re.Pattern[str]:
    # A lookahead finds every occurrence, overlapping ones too (`]~b]~b]` holds two).
    alternatives = sorted(markers, key=len, reverse=True)
    return re.compile("(?=(?:" + "|".join(re.escape(m) for m in alternatives) + "))")


def neutralize_markers(text: str, extra: Iterable[str] = ()) -> str:
    """`text` with every `STRUCTURE_MARKERS` string and every `extra` string (e.g. `control_tokens(tok)`)
    broken by a zero-width space after its first character. Only zero-width spaces are added, so
    `result.replace(ZERO_WIDTH_SPACE, "") == text.replace(ZERO_WIDTH_SPACE, "")`; applying it twice
    changes nothing. A one-character control token cannot be split: it becomes U+FFFD."""
    markers = tuple(dict.fromkeys(m for m in (*STRUCTURE_MARKERS, *extra) if len(m) > 1))
    singles = {ord(m): "\ufffd" for m in extra if len(m) == 1}
    if singles:
        text = text.translate(singles)
    cuts = sorted({m.start() + 1 for m in _marker_pattern(markers).finditer(text)})
    if not cuts:
        return text
    pieces, previous = [], 0
    for cut in cuts:
        pieces += [text[previous:cut], ZERO_WIDTH_SPACE]
        previous = cut
    pieces.append(text[previous:])
    return "".join(pieces)


def generation_prompt(enable_thinking: bool = True) -> str:
    return f"{MESSAGE_OPEN}ai\n" + (f"{THINK_OPEN}\n" if enable_thinking else "")


def visible_text(content: Any) -> str:
    """A message's text: a string, or the concatenated text parts of a list (other parts are skipped)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        out = []
        for item in content:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, Mapping) and item.get("type") == "text":
                out.append(str(item.get("text", "")))
        return "".join(out)
    return str(content)


def tool_function(tool: Any, index: int = 0) -> Mapping[str, Any]:
    """The "function" object of an OpenAI tool spec (a bare function object is accepted as is)."""
    if not isinstance(tool, Mapping):
        raise RenderError(f"tool {index} must be a mapping like {{'type': 'function', 'function': {{...}}}}, "
                          f"got {type(tool).__name__}")
    fn = tool.get("function", tool)
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise RenderError(f"tool {index} has no function name: {tool!r:.200}")
    return fn


def render_tools(tools: Sequence[Any]) -> str:
    lines = "".join(
        f"<tool>{json.dumps(tool_function(t, i), ensure_ascii=False)}</tool>\n" for i, t in enumerate(tools)
    )
    return TOOLS_HEADER + lines + TOOLS_FOOTER


def split_reasoning(message: Message) -> tuple[str, str]:
    """(reasoning, content) of an assistant message, as the official template derives them."""
    content = visible_text(message.get("content"))
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        return reasoning, content
    if THINK_CLOSE in content:
        reasoning = content.split(THINK_CLOSE)[0].strip("\n").split(THINK_OPEN)[-1].strip("\n")
        content = content.split(THINK_CLOSE)[-1].strip("\n")
        return reasoning, content
    return "", content


def tool_call_parts(call: Any, where: str) -> tuple[str, Mapping[str, Any]]:
    """(name, arguments mapping) of an OpenAI-shaped or simplified tool call."""
    if not isinstance(call, Mapping):
        raise RenderError(f"{where}: a tool call must be a mapping, got {type(call).__name__}")
    fn: Mapping[str, Any] = call["function"] if isinstance(call.get("function"), Mapping) else call
    name = fn.get("name")
    if not isinstance(name, str):
        raise RenderError(f"{where}: tool call has no string 'name': {call!r:.200}")
    args = fn.get("arguments")
    if args is None:
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise RenderError(f"{where}: arguments of tool call {name!r} are not valid JSON: {e}") from e
    if not isinstance(args, Mapping):
        raise RenderError(f"{where}: arguments of tool call {name!r} must be an object, got {type(args).__name__}")
    return name, args


def parameter_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render_invoke(call: Any, where: str = "assistant message") -> str:
    """One call of a tool-call block: `<invoke name="NAME">\n`, a line per argument, `</invoke>\n`."""
    name, args = tool_call_parts(call, where)
    params = "".join(f'{PARAMETER_OPEN} name="{key}">{parameter_value(value)}{PARAMETER_CLOSE}\n'
                     for key, value in args.items())
    return f'{INVOKE_OPEN} name="{name}">\n{params}{INVOKE_CLOSE}\n'


def render_tool_calls(calls: Sequence[Any], where: str = "assistant message") -> str:
    return f"\n{TOOL_CALL_OPEN}\n" + "".join(render_invoke(call, where) for call in calls) + TOOL_CALL_CLOSE


def render_assistant(message: Message, with_reasoning: bool, where: str = "assistant message") -> str:
    reasoning, content = split_reasoning(message)
    out = f"{MESSAGE_OPEN}ai\n"
    if reasoning and with_reasoning:
        out += f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n"
    out += content
    calls = message.get("tool_calls")
    if calls:
        out += render_tool_calls(calls, where)
    return out + f"{EOS}\n"


def render_tool_response(content: Any) -> str:
    if content is None or isinstance(content, str):
        return f"\n{RESPONSE_OPEN}{content or ''}{RESPONSE_CLOSE}"
    if isinstance(content, Sequence):
        # The official template renders each part as its own response, closed by "\n</response>".
        parts = []
        for part in content:
            if isinstance(part, Mapping):
                text = part.get("output", part.get("text", "") if part.get("type") == "text" else part)
            else:
                text = part
            parts.append(f"\n{RESPONSE_OPEN}{text if isinstance(text, str) else json.dumps(text, ensure_ascii=False)}"
                         f"\n{RESPONSE_CLOSE}")
        return "".join(parts)
    return f"\n{RESPONSE_OPEN}{content}{RESPONSE_CLOSE}"


def render_parts(
    messages: Sequence[Message],
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = True,
    *,
    keep_all_reasoning: bool = False,
) -> list[tuple[int, str]]:
    """The rendered text as (message index, piece) pairs; the system header has index 0 (or -1 when the
    default system text is used) and the generation prompt has index len(messages)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise RenderError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise RenderError(f"message {i} must be a dict with a string 'role', got {m!r:.200}")
    if tools is not None and (isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence)):
        raise RenderError(f"tools must be a list of tool specs, got {type(tools).__name__}")

    start = 1 if messages and messages[0]["role"] == "system" else 0
    system = messages[0] if start else {}
    header = f"{BOS}{MESSAGE_OPEN}system\n"
    header += visible_text(system["content"]) if system.get("content") else DEFAULT_SYSTEM
    # Optional fields of the official template's system message.
    if system.get("current_date"):
        header += f"\nCurrent date: {system['current_date']}"
    if system.get("current_location"):
        header += f"\nCurrent location: {system['current_location']}"
    if tools:
        header += render_tools(tools)
    parts: list[tuple[int, str]] = [(0 if start else -1, header + f"{EOS}\n")]

    last_user = max((i for i in range(start, len(messages)) if messages[i]["role"] == "user"), default=-1)
    has_open_call = False  # the template refuses a tool result that answers no tool call
    for i in range(start, len(messages)):
        m, role = messages[i], messages[i]["role"]
        where = f"message {i} ({role})"
        if role == "user":
            parts.append((i, f"{MESSAGE_OPEN}user\n{visible_text(m.get('content'))}{EOS}\n"))
        elif role == "assistant":
            parts.append((i, render_assistant(m, keep_all_reasoning or i > last_user, where)))
            has_open_call = bool(m.get("tool_calls"))
        elif role == "tool":
            if not has_open_call:
                raise RenderError(f"{where}: a tool message must follow an assistant message with tool_calls")
            first = messages[i - 1]["role"] != "tool"
            last = i + 1 == len(messages) or messages[i + 1]["role"] != "tool"
            text = (f"{MESSAGE_OPEN}tool" if first else "") + render_tool_response(m.get("content"))
            parts.append((i, text + (f"{EOS}\n" if last else "")))
        elif role == "system":
            raise RenderError(f"{where}: a system message is only allowed as the first message")
        else:
            raise RenderError(f"{where}: unknown role {role!r} (expected system, user, assistant or tool)")
    if add_generation_prompt:
        parts.append((len(messages), generation_prompt(enable_thinking)))
    return parts


def render(
    messages: Sequence[Message],
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = True,
    *,
    keep_all_reasoning: bool = False,
) -> str:
    """The M2 transcript of `messages` (see module docstring)."""
    parts = render_parts(messages, tools, add_generation_prompt, enable_thinking,
                         keep_all_reasoning=keep_all_reasoning)
    return "".join(text for _, text in parts)


def render_ids(
    tokenizer: Any,
    messages: Sequence[Message],
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = False,
    enable_thinking: bool = True,
    *,
    keep_all_reasoning: bool = False,
) -> list[int]:
    """Token ids of `render(...)` through `tokenizer.encode` (markers are single special ids)."""
    return list(tokenizer.encode(render(messages, tools, add_generation_prompt, enable_thinking,
                                        keep_all_reasoning=keep_all_reasoning)))


def render_tool_suffix(results: Sequence[str], enable_thinking: bool = True) -> str:
    """Text the env appends after an assistant turn that ended with a sampled `[e~[`: the tool results
    (one `<response>` each, in call order) and the next generation prompt."""
    if isinstance(results, str) or not isinstance(results, Sequence) or not results:
        raise RenderError("render_tool_suffix needs a non-empty list of result strings (one per tool call)")
    bad = [i for i, r in enumerate(results) if not isinstance(r, str)]
    if bad:
        raise RenderError(f"tool results must be strings; results {bad} are not")
    body = "".join(f"\n{RESPONSE_OPEN}{r}{RESPONSE_CLOSE}" for r in results)
    return f"\n{MESSAGE_OPEN}tool{body}{EOS}\n" + generation_prompt(enable_thinking)


def render_user_suffix(text: str, enable_thinking: bool = True) -> str:
    """Text the env appends after a sampled `[e~[` when the next message is a user reply."""
    if not isinstance(text, str):
        raise RenderError(f"user reply must be a string, got {type(text).__name__}")
    return f"\n{MESSAGE_OPEN}user\n{text}{EOS}\n" + generation_prompt(enable_thinking)


def render_completion(message: Message, enable_thinking: bool = True) -> str:
    """What the model writes for `message` after the generation prompt, ending with `[e~[`.

    With thinking on and no reasoning, the template writes no think block while the prompt already
    opened one; the result then starts with `\\n</think>\\n\\n` (the closest text the model could write),
    and re-rendering will not reproduce it exactly.
    """
    if not isinstance(message, Mapping) or message.get("role") != "assistant":
        raise RenderError("render_completion needs an assistant message")
    body = render_assistant(message, with_reasoning=True)[len(f"{MESSAGE_OPEN}ai\n"):-1]
    if not enable_thinking:
        return body
    if body.startswith(f"{THINK_OPEN}\n"):
        return body[len(THINK_OPEN) + 1:]
    return f"\n{THINK_CLOSE}\n\n" + body
