"""Advantages and reward shaping for group-sampled rollouts (pure functions, no I/O).

- `group_advantages`: A_i = (R_i - mean(R_group)) / (std(R_group) + eps), the GRPO/M1 group baseline.
- `group_advantages_by_id`: the same for ragged groups given as flat rewards plus group ids.
- `group_baselines`: each group's (mean, scale, spread) from flat returns, group ids and which episodes
  count; `GroupBaseline.advantages` applies it to an episode's return (`episode` mode) or to each of its
  tokens' returns-to-go (`turn` mode).
- `dynamic_sampling_keep`: DAPO/M1 dynamic sampling, drop groups whose rewards are all equal (zero signal).
- `turn_rewards_to_go` / `turn_returns_to_tokens`: dense per-turn rewards to per-token returns.
- `overlong_penalty`: DAPO's soft overlong punishment.
- `broadcast_to_tokens`: a per-sequence advantage onto that sequence's loss tokens.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


def group_advantages(
    rewards: Tensor, scale_by_std: bool = True, eps: float = 1e-6, unbiased: bool = True
) -> Tensor:
    """Group-relative advantages for rewards shaped [num_groups, group_size].

    `unbiased=True` uses the sample std (torch.std, as TRL and verl do). Dr. GRPO's variant is
    `scale_by_std=False` (mean-centring only). A group of one sample has no baseline: its advantage is 0.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    rewards = rewards.to(torch.float64) if rewards.dtype not in (torch.float32, torch.float64) else rewards
    group_size = rewards.shape[1]
    if group_size == 1:
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_by_std:
        return centred
    std = rewards.std(dim=1, keepdim=True, unbiased=unbiased)
    return centred / (std + eps)


def group_advantages_by_id(
    rewards: Sequence[float],
    group_ids: Sequence[Hashable],
    scale_by_std: bool = True,
    eps: float = 1e-6,
    unbiased: bool = True,
) -> list[float]:
    """`group_advantages` for ragged groups: rewards[k] belongs to group group_ids[k]; order is kept."""
    if len(rewards) != len(group_ids):
        raise ValueError(f"got {len(rewards)} rewards but {len(group_ids)} group ids")
    members: dict[Hashable, list[int]] = {}
    for k, gid in enumerate(group_ids):
        members.setdefault(gid, []).append(k)
    out = [0.0] * len(rewards)
    for idx in members.values():
        adv = group_advantages(
            torch.tensor([[float(rewards[k]) for k in idx]], dtype=torch.float64),
            scale_by_std=scale_by_std,
            eps=eps,
            unbiased=unbiased,
        )[0]
        for k, a in zip(idx, adv.tolist()):
            out[k] = a
    return out


# episode: the episode's group-relative return on every sampled token (M1, GRPO).
# turn: each turn's return-to-go against the same group baseline, on that turn's tokens, so a turn is not
#   credited with rewards earned before it. With outcome-only rewards both modes give the same advantages.
AdvantageMode = Literal["episode", "turn"]
ADVANTAGE_MODES: tuple[str, ...] = ("episode", "turn")


@dataclass(frozen=True)
class GroupBaseline:
    """A group's return statistics: an advantage is (return - mean) / scale, as in `group_advantages`.

    The values are float32 numbers, and `advantages` computes in float32, so an episode's advantage equals
    the element of `group_advantages` of its group's [1, G] float32 rewards bit for bit.
    """

    mean: float
    scale: float  # std + eps, or 1.0 without std scaling (and for a group of one: no baseline, advantage 0)
    spread: float  # max - min of the group's returns: 0 means the group carries no learning signal

    def advantages(self, returns: Tensor) -> Tensor:
        """(returns - mean) / scale, elementwise in float32."""
        return (returns.to(torch.float32) - self.mean) / self.scale

    def has_signal(self, atol: float = 1e-8) -> bool:
        """Dynamic sampling's test (`dynamic_sampling_keep`): the returns are not all equal."""
        return self.spread > float(torch.tensor(atol, dtype=torch.float32))  # compared in float32, as there


def group_baselines(
    returns: Sequence[float],
    group_ids: Sequence[Hashable],
    counted: Sequence[bool] | None = None,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    unbiased: bool = True,
) -> dict[Hashable, GroupBaseline]:
    """The baseline of each group from the returns of its `counted` members (default: all), in first-seen
    order. A group with no counted member has no entry."""
    if len(returns) != len(group_ids) or (counted is not None and len(counted) != len(returns)):
        raise ValueError(f"got {len(returns)} returns, {len(group_ids)} group ids"
                         + ("" if counted is None else f" and {len(counted)} counted flags"))
    members: dict[Hashable, list[float]] = {}
    for k, gid in enumerate(group_ids):
        members.setdefault(gid, [])
        if counted is None or counted[k]:
            members[gid].append(float(returns[k]))
    out: dict[Hashable, GroupBaseline] = {}
    for gid, values in members.items():
        if not values:
            continue
        r = torch.tensor([values], dtype=torch.float32)  # [1, G]
        if not torch.isfinite(r).all():
            raise ValueError(f"group {gid!r} has a NaN or inf return")
        mean = r.mean(dim=1, keepdim=True)
        if len(values) == 1 or not scale_by_std:
            scale = 1.0  # one sample has no baseline: (R - R) / 1 = 0
        else:
            scale = float(r.std(dim=1, keepdim=True, unbiased=unbiased) + eps)
        spread = float(r.max(dim=1).values - r.min(dim=1).values)
        out[gid] = GroupBaseline(mean=float(mean), scale=scale, spread=spread)
    return out


def dynamic_sampling_keep(rewards: Tensor, atol: float = 1e-8) -> Tensor:
    """Bool [num_groups]: True for groups whose rewards are not all equal (they carry a learning signal)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {tuple(rewards.shape)}")
    spread = rewards.max(dim=1).values - rewards.min(dim=1).values
    return spread > atol


def dynamic_sampling_keep_ids(
    rewards: Sequence[float], group_ids: Sequence[Hashable], atol: float = 1e-8
) -> set:
    """The group ids (ragged form) whose rewards are not all equal."""
    if len(rewards) != len(group_ids):
        raise ValueError(f"got {len(rewards)} rewards but {len(group_ids)} group ids")
    by_group: dict[Hashable, list[float]] = {}
    for r, gid in zip(rewards, group_ids):
        by_group.setdefault(gid, []).append(float(r))
    return {gid for gid, rs in by_group.items() if max(rs) - min(rs) > atol}


def turn_rewards_to_go(turn_rewards: Sequence[float], gamma: float = 1.0) -> list[float]:
    """G_k = sum_{j >= k} gamma^(j-k) r_j for each turn k."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    returns = [0.0] * len(turn_rewards)
    running = 0.0
    for k in range(len(turn_rewards) - 1, -1, -1):
        r = float(turn_rewards[k])
        if not math.isfinite(r):
            raise ValueError(f"turn reward {k} is {r}")
        running = r + gamma * running
        returns[k] = running
    return returns


def turn_returns_to_tokens(
    turn_rewards: Sequence[float],
    turn_spans: Sequence[tuple[int, int]],
    num_tokens: int,
    gamma: float = 1.0,
    loss_mask: Tensor | None = None,
) -> Tensor:
    """Per-token returns [num_tokens]: turn k's reward-to-go on its sampled tokens, 0 elsewhere.

    `turn_spans[k] = (start, end)` is the half-open token range of the k-th policy turn. With a loss_mask,
    tokens inside a span that the policy did not sample (none in a clean trajectory) also get 0.
    """
    if len(turn_rewards) != len(turn_spans):
        raise ValueError(f"got {len(turn_rewards)} turn rewards but {len(turn_spans)} turn spans")
    returns = turn_rewards_to_go(turn_rewards, gamma)
    out = torch.zeros(num_tokens, dtype=torch.float32)
    prev_end = 0
    for k, (start, end) in enumerate(turn_spans):
        if not (0 <= start <= end <= num_tokens):
            raise ValueError(f"turn span {k} = {(start, end)} is outside [0, {num_tokens}]")
        if start < prev_end:
            raise ValueError(
                f"turn span {k} = {(start, end)} overlaps the previous span ending at {prev_end}"
            )
        out[start:end] = returns[k]
        prev_end = end
    if loss_mask is not None:
        if loss_mask.shape != (num_tokens,):
            raise ValueError(f"loss_mask has shape {tuple(loss_mask.shape)}, expected ({num_tokens},)")
        out = out * loss_mask.to(out.dtype)
    return out


def broadcast_to_tokens(seq_values: Tensor, loss_mask: Tensor) -> Tensor:
    """[B] per-sequence values -> [B, T] on the loss tokens (0 elsewhere)."""
    if seq_values.dim() != 1 or loss_mask.dim() != 2 or seq_values.shape[0] != loss_mask.shape[0]:
        raise ValueError(
            f"need values [B] and mask [B, T], got {tuple(seq_values.shape)} and {tuple(loss_mask.shape)}"
        )
    return seq_values.to(torch.float32).unsqueeze(-1) * loss_mask.to(torch.float32)


@dataclass
class OverlongPenaltyConfig:
    """DAPO soft overlong punishment: no penalty up to max_length - cache_length tokens, then a linear ramp
    down to -penalty at max_length, and -penalty beyond it."""

    max_length: int = 16384
    cache_length: int = 4096
    penalty: float = 1.0
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.max_length <= 0:
            raise ValueError(f"max_length must be > 0, got {self.max_length}")
        if not 0 < self.cache_length <= self.max_length:
            raise ValueError(
                f"cache_length must be in (0, max_length={self.max_length}], got {self.cache_length}"
            )
        if self.penalty < 0:
            raise ValueError(f"penalty must be >= 0, got {self.penalty}")


def overlong_penalty(length: int, config: OverlongPenaltyConfig) -> float:
    """The (non-positive) reward term for a response of `length` generated tokens."""
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if not config.enabled:
        return 0.0
    expected = config.max_length - config.cache_length
    if length <= expected:
        return 0.0
    if length <= config.max_length:
        return (expected - length) / config.cache_length * config.penalty
    return -config.penalty
