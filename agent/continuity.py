"""Check that a trajectory's ids are what re-rendering its messages would give (token-in, token-out).

Rollouts append sampled ids and env-suffix ids and never re-render. The learner, SFT and any replay
may re-render the message view. If the two disagree the learner's log-probs are computed on tokens the
sampler never produced, the most common silent bug of RL frameworks. Causes: the rollout re-rendered or
mangled a suffix, the message view does not describe what was sampled, or the model sampled a
non-canonical tokenization / non-canonical text (e.g. `R</think>` with no newline, a value with extra
whitespace, a malformed tool call) that a re-render cannot reproduce.

The expected transcript is `render(messages, tools, keep_all_reasoning=True)`: an append-only rollout
showed the model the reasoning of earlier turns, so nothing is dropped. It is cut into segments that
match the trajectory: the prompt, each sampled turn (after the generation prompt, through `[e~[`) and
each env reply (from the `\\n` after `[e~[` through the next generation prompt). Consecutive non-sampled
spans of the trajectory are one segment. A sampled segment cut by the length limit (no EOS) expects no
EOS: at the end of the trajectory none, before an env reply the EOS is expected as the env's first token.

`violations` = number of segments whose ids differ from the tokenization of the matching expected
segment, plus segments present on one side only; when every segment matches but tokenizing the whole
transcript at once merges tokens across a segment boundary, that counts as one violation.
`first_divergence` is the first token index where the ids differ from the tokenization of the whole
expected transcript (the ids the learner would get by re-rendering).

Tool messages are re-rendered as an env must show them: with `neutralize_markers` applied (the format's
structure markers and the tokenizer's own special tokens broken by a zero-width space). A tool reply whose
ids hold a control token (or whose text forges `</response>\n<response>`) therefore differs from the
expected segment and counts as a violation, even though rendering the same raw text would reproduce it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from m2rl.agent.render import (
    EOS,
    MESSAGE_OPEN,
    RenderError,
    control_tokens,
    generation_prompt,
    neutralize_markers,
    render_parts,
)

if TYPE_CHECKING:
    from m2rl.agent.trajectory import Trajectory

logger = logging.getLogger(__name__)

SNIPPET_TOKENS = 12


@dataclass
class ContinuityReport:
    ok: bool
    violations: int
    first_divergence: int | None  # token index, None when ids match
    expected_snippet: str = ""  # decoded expected tokens around first_divergence
    actual_snippet: str = ""  # decoded trajectory tokens around first_divergence
    segments: int = 0  # segments compared
    error: str | None = None  # why the check could not run (bad trajectory or unrenderable messages)


def _groups(traj: Trajectory) -> list[tuple[bool, int, int]]:
    """(is_sampled, start, end) with consecutive non-sampled spans merged."""
    out: list[tuple[bool, int, int]] = []
    for s in traj.spans:
        sampled = s.kind == "sampled"
        if out and not sampled and not out[-1][0]:
            out[-1] = (False, out[-1][1], s.end)
        else:
            out.append((sampled, s.start, s.end))
    return out


def _neutral_part(part: Any, extra: Sequence[str]) -> Any:
    """A tool message's text, or the text of one of its parts (`render_tool_response` reads "text"/"output")."""
    if isinstance(part, str):
        return neutralize_markers(part, extra)
    if isinstance(part, dict):
        return {k: neutralize_markers(v, extra) if k in ("text", "output") and isinstance(v, str) else v
                for k, v in part.items()}
    return part


def _neutral_tool_content(content: Any, extra: Sequence[str]) -> Any:
    if isinstance(content, list):
        return [_neutral_part(part, extra) for part in content]
    return _neutral_part(content, extra) if isinstance(content, str) else content


def as_env_shows(messages: Sequence[dict[str, Any]], extra_markers: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The messages with every tool message's text neutralised, as an env renders tool output."""
    return [{**m, "content": _neutral_tool_content(m.get("content"), extra_markers)}
            if isinstance(m, dict) and m.get("role") == "tool" else m for m in messages]


def expected_segments(messages: Sequence[dict[str, Any]], tools: Sequence[Any] | None, enable_thinking: bool,
                      ends_sampled: bool, extra_markers: Sequence[str] = ()) -> list[str]:
    """The re-rendered transcript cut at the sampled/env boundaries (alternating context, sampled, ...).
    Tool messages are neutralised first (`as_env_shows`)."""
    messages = as_env_shows(messages, extra_markers)
    parts = render_parts(messages, tools, add_generation_prompt=not ends_sampled, enable_thinking=enable_thinking,
                         keep_all_reasoning=True)
    text = "".join(p for _, p in parts)
    prompt, cuts, offset = generation_prompt(enable_thinking), [0], 0
    for index, piece in parts:
        if 0 <= index < len(messages) and messages[index]["role"] == "assistant":
            head = len(prompt) if piece.startswith(prompt) else len(f"{MESSAGE_OPEN}ai\n")
            cuts += [offset + head, offset + len(piece) - 1]  # the "\n" after [e~[ belongs to the env reply
        offset += len(piece)
    if ends_sampled and len(cuts) > 1:
        text = text[: cuts[-1]]  # the sampler stopped at [e~[; the newline was never written
    else:
        cuts.append(len(text))
    return [text[a:b] for a, b in pairwise(cuts)]


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    try:
        return tokenizer.decode(list(ids))
    except Exception:  # noqa: BLE001  a snippet is diagnostics only: fall back to raw ids rather than fail the check
        logger.debug("ids %s do not decode; the snippet shows them raw", list(ids)[:8], exc_info=True)
        return repr(list(ids))


def _eos_id(tokenizer: Any) -> int | None:
    eos = getattr(tokenizer, "eos_id", None)
    if isinstance(eos, int):
        return eos
    ids = tokenizer.encode(EOS)
    return ids[0] if len(ids) == 1 else None


def check_continuity(traj: Trajectory, tokenizer: Any, tools: Sequence[Any] | None = None,
                     enable_thinking: bool | None = None) -> ContinuityReport:
    problems = traj.validate()
    if problems:
        return ContinuityReport(False, 0, None, error="; ".join(problems))
    tools = traj.tools if tools is None else tools
    thinking = traj.enable_thinking if enable_thinking is None else enable_thinking
    groups = _groups(traj)
    ends_sampled = bool(groups) and groups[-1][0]
    try:
        segments = expected_segments(traj.messages, tools, thinking, ends_sampled, control_tokens(tokenizer))
    except RenderError as e:
        return ContinuityReport(False, 0, None, error=f"messages cannot be rendered: {e}")
    # A segment cut by the length limit has no sampled EOS. At the end of the trajectory none is
    # expected; before an env reply the loop closes the message with an EOS env token, so the expected
    # EOS moves to the start of the env segment.
    eos_id = _eos_id(tokenizer)
    for k, (sampled, start, end) in enumerate(groups[: len(segments)]):
        if sampled and segments[k].endswith(EOS) and (end == start or traj.ids[end - 1] != eos_id):
            segments[k] = segments[k][: -len(EOS)]
            if k + 1 < len(segments):
                segments[k + 1] = EOS + segments[k + 1]

    expected_ids = [list(tokenizer.encode(s)) for s in segments]
    violations = abs(len(groups) - len(segments))
    for (_, start, end), want in zip(groups, expected_ids):
        violations += traj.ids[start:end] != want
    whole = list(tokenizer.encode("".join(segments)))
    if violations == 0 and whole != traj.ids:
        violations = 1  # tokenizing the whole transcript merges across a segment boundary
    if violations == 0:
        return ContinuityReport(True, 0, None, segments=len(segments))

    actual = traj.ids
    if actual != whole:
        first = next((i for i, (a, b) in enumerate(zip(actual, whole)) if a != b), min(len(actual), len(whole)))
    else:  # same ids overall, but the span boundaries do not match the message view's turns
        first = next((start for (_, start, end), want in zip(groups, expected_ids) if actual[start:end] != want),
                     groups[min(len(groups), len(segments)) - 1][1] if groups else 0)
    lo = max(0, first - SNIPPET_TOKENS)
    return ContinuityReport(
        ok=False,
        violations=violations,
        first_divergence=first,
        expected_snippet=_decode(tokenizer, whole[lo:first + SNIPPET_TOKENS]),
        actual_snippet=_decode(tokenizer, actual[lo:first + SNIPPET_TOKENS]),
        segments=len(segments),
    )
