"""Step-indexed schedules of an RL run: context length stages and rollout batch-size warm-up.

The solve-rate curriculum (`rl.curriculum`) and the multi-stage pipeline (`rl.pipeline`) are
re-exported here so every schedule is importable from one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from m2rl.rl.curriculum import CurriculumConfig, DifficultyCurriculum
from m2rl.rl.pipeline import PipelineConfig, StageConfig

__all__ = [
    "BatchSizeWarmup",
    "ContextLengthSchedule",
    "CurriculumConfig",
    "DifficultyCurriculum",
    "PipelineConfig",
    "StageConfig",
]


@dataclass
class ContextLengthSchedule:
    """Maximum episode tokens by step: stages[k] = (first step, max tokens), e.g. [(0, 8k), (200, 32k)].

    Short episodes first (cheap rollouts, fewer truncations while the policy is weak), longer later.
    """

    stages: list[tuple[int, int]] = field(default_factory=lambda: [(0, 8192)])
    """(first step, max episode tokens) pairs in increasing step order; the first must start at step 0."""

    def __post_init__(self) -> None:
        self.stages = [tuple(s) for s in self.stages]  # YAML gives lists
        if not self.stages:
            raise ValueError("ContextLengthSchedule needs at least one stage")
        if self.stages[0][0] != 0:
            raise ValueError(f"the first context-length stage must start at step 0, got {self.stages[0][0]}")
        for k, stage in enumerate(self.stages):
            if len(stage) != 2 or any(not isinstance(v, int) for v in stage):
                raise ValueError(
                    f"context-length stage {k} must be (start_step, max_tokens) integers, got {stage!r}"
                )
            if stage[1] < 1:
                raise ValueError(f"context-length stage {k} has max_tokens {stage[1]} < 1")
            if k and stage[0] <= self.stages[k - 1][0]:
                raise ValueError(f"context-length stage starts must increase; stage {k} starts at {stage[0]}")

    def max_tokens(self, step: int) -> int:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        current = self.stages[0][1]
        for start, tokens in self.stages:
            if step >= start:
                current = tokens
        return current


@dataclass
class BatchSizeWarmup:
    """Rollout batch size by step: linear from `start_size` to `target_size` over `warmup_steps` steps,
    rounded down to a multiple of `multiple_of` (e.g. the group size), never below it."""

    start_size: int = 8
    """Rollout batch size (episodes) at step 0."""
    target_size: int = 64
    """Rollout batch size once the warm-up is over."""
    warmup_steps: int = 0
    """Steps over which the size grows linearly from start_size to target_size (0: target at once)."""
    multiple_of: int = 1
    """Sizes are rounded down to a multiple of this (e.g. the group size), never below it."""

    def __post_init__(self) -> None:
        if self.multiple_of < 1:
            raise ValueError(f"multiple_of must be >= 1, got {self.multiple_of}")
        if not 1 <= self.start_size <= self.target_size:
            raise ValueError(
                f"need 1 <= start_size <= target_size, got {self.start_size}, {self.target_size}"
            )
        if self.target_size % self.multiple_of:
            raise ValueError(f"target_size {self.target_size} is not a multiple of {self.multiple_of}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    def batch_size(self, step: int) -> int:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step >= self.warmup_steps:
            return self.target_size
        raw = self.start_size + (self.target_size - self.start_size) * step / self.warmup_steps
        rounded = math.floor(raw / self.multiple_of) * self.multiple_of
        return max(self.multiple_of, min(self.target_size, rounded))
