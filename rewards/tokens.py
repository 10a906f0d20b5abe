"""Per-turn rewards -> per-token reward vector for advantage computation.

Each turn's reward is placed on the last token the policy sampled in that turn: that token's
log-prob is the last decision the reward can be credited to, and a per-token return computed
backwards from it covers every token of the turn and of earlier turns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def per_token_rewards(
    turn_rewards: Sequence[float],
    turn_spans: Sequence[Any],
    num_tokens: int,
    loss_mask: Sequence[int | bool] | None = None,
) -> list[float]:
    """turn_spans[i] = (start, end), half-open token indices of turn i's sampled tokens (or any object
    with .start/.end, e.g. `Trajectory.sampled_spans()`).
    With `loss_mask`, the reward goes on the last position inside the span whose mask is set
    (env tokens spliced into a span are never credited). Returns `num_tokens` floats."""
    if len(turn_rewards) != len(turn_spans):
        raise ValueError(
            f"per_token_rewards: {len(turn_rewards)} turn rewards for {len(turn_spans)} turn spans"
        )
    if num_tokens < 0:
        raise ValueError(f"per_token_rewards: num_tokens must be >= 0, got {num_tokens}")
    if loss_mask is not None and len(loss_mask) != num_tokens:
        raise ValueError(f"per_token_rewards: loss_mask has {len(loss_mask)} entries for {num_tokens} tokens")
    out = [0.0] * num_tokens
    taken: list[tuple[int, int]] = []
    for i, (span, reward) in enumerate(zip(turn_spans, turn_rewards)):
        if hasattr(span, "start") and hasattr(span, "end"):  # agent.trajectory.TurnSpan
            start, end = int(span.start), int(span.end)
        elif isinstance(span, (tuple, list)) and len(span) == 2:
            start, end = int(span[0]), int(span[1])
        else:
            raise ValueError(f"per_token_rewards: turn {i} span {span!r} is not a (start, end) pair")
        if not 0 <= start < end <= num_tokens:
            raise ValueError(
                f"per_token_rewards: turn {i} span ({start}, {end}) is empty or outside [0, {num_tokens})"
            )
        for s, e in taken:
            if start < e and s < end:
                raise ValueError(
                    f"per_token_rewards: turn {i} span ({start}, {end}) overlaps span ({s}, {e})"
                )
        taken.append((start, end))
        last = end - 1
        if loss_mask is not None:
            while last >= start and not loss_mask[last]:
                last -= 1
            if last < start:
                raise ValueError(
                    f"per_token_rewards: turn {i} span ({start}, {end}) has no sampled token in loss_mask"
                )
        out[last] += float(reward)
    return out
