"""Advantages and reward shaping for group-sampled rollouts (pure functions, no I/O).

- `group_advantages`: A_i = (R_i - mean(R_group)) / (std(R_group) + eps), the GRPO/M1 group baseline
  (`group_baseline` gives the mean and the scale).
- `dynamic_sampling_keep`: DAPO/M1 dynamic sampling, drop groups whose rewards are all equal (zero signal).
- `group_baselines`: both of them per group for episodes given as a flat list with group ids (and which
  episodes count); `GroupBaseline.advantages` applies it to an episode's return (`rollout.advantage:
  episode`) or to each of its tokens' returns-to-go (`turn`).
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


def group_baseline(
    rewards: Tensor, scale_by_std: bool = True, eps: float = 1e-6, unbiased: bool = True
) -> tuple[Tensor, Tensor]:
    """(mean, scale), each [num_groups, 1], of rewards shaped [num_groups, group_size]: the group-relative
    advantage is (R - mean) / scale, scale = std + eps (or 1: Dr. GRPO's mean-centring, and for a group of
    one sample, which has no baseline: its advantage is 0)."""
    mean = rewards.mean(dim=1, keepdim=True)
    if rewards.shape[1] == 1 or not scale_by_std:
        return mean, torch.ones_like(mean)
    return mean, rewards.std(dim=1, keepdim=True, unbiased=unbiased) + eps


def group_advantages(
    rewards: Tensor, scale_by_std: bool = True, eps: float = 1e-6, unbiased: bool = True
) -> Tensor:
    """Group-relative advantages for rewards shaped [num_groups, group_size] (see `group_baseline`).

    `unbiased=True` uses the sample std (torch.std, as TRL and verl do).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    rewards = rewards.to(torch.float64) if rewards.dtype not in (torch.float32, torch.float64) else rewards
    mean, scale = group_baseline(rewards, scale_by_std, eps, unbiased)
    return (rewards - mean) / scale


def dynamic_sampling_keep(rewards: Tensor, atol: float = 1e-8) -> Tensor:
    """Bool [num_groups]: True for groups whose rewards are not all equal (they carry a learning signal)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {tuple(rewards.shape)}")
    spread = rewards.max(dim=1).values - rewards.min(dim=1).values
    return spread > atol


# episode: the episode's group-relative return on every sampled token (M1, GRPO).
# turn: each turn's return-to-go against the same group baseline, on that turn's tokens, so a turn is not
#   credited with rewards earned before it. With outcome-only rewards both modes give the same advantages.
AdvantageMode = Literal["episode", "turn"]


@dataclass(frozen=True)
class GroupBaseline:
    """One group's `group_baseline` and dynamic-sampling verdict, for episodes given as a flat list.

    The numbers are float32 values and `advantages` computes in float32, so an episode's advantage equals
    its element of `group_advantages` over the group's float32 [1, G] rewards, bit for bit.
    """

    mean: float
    scale: float
    has_signal: bool  # the group's returns are not all equal (`dynamic_sampling_keep`)

    def advantages(self, returns: Tensor) -> Tensor:
        """(returns - mean) / scale, elementwise in float32."""
        return (returns.to(torch.float32) - self.mean) / self.scale


def group_baselines(
    returns: Sequence[float],
    group_ids: Sequence[Hashable],
    counted: Sequence[bool] | None = None,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    unbiased: bool = True,
) -> dict[Hashable, GroupBaseline]:
    """The baseline of each group (groups may differ in size) from the returns of its `counted` members
    (default: all). A group with no counted member has no entry."""
    if len(returns) != len(group_ids) or (counted is not None and len(counted) != len(returns)):
        raise ValueError(f"got {len(returns)} returns, {len(group_ids)} group ids"
                         + ("" if counted is None else f" and {len(counted)} counted flags"))
    members: dict[Hashable, list[float]] = {}
    for k, gid in enumerate(group_ids):
        if counted is None or counted[k]:
            members.setdefault(gid, []).append(float(returns[k]))
    out: dict[Hashable, GroupBaseline] = {}
    for gid, values in members.items():
        r = torch.tensor([values], dtype=torch.float32)  # [1, G]
        if not torch.isfinite(r).all():
            raise ValueError(f"group {gid!r} has a NaN or inf return")
        mean, scale = group_baseline(r, scale_by_std, eps, unbiased)
        out[gid] = GroupBaseline(float(mean), float(scale), bool(dynamic_sampling_keep(r)[0]))
    return out


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
