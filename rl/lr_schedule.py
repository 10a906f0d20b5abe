"""Learning-rate schedules as a pure multiplier of the base LR, wrapped in torch's LambdaLR.

constant:       1 after a linear warm-up of `warmup_steps` optimizer steps (0 = no warm-up).
warmup_cosine:  linear warm-up, then cosine decay from 1 to `min_lr_ratio` at `total_steps`, flat after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class LRScheduleConfig:
    kind: Literal["constant", "warmup_cosine"] = "constant"
    """constant, or a linear warm-up then a cosine decay to min_lr_ratio at total_steps."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to the base learning rate (both kinds)."""
    total_steps: int = 1000  # used by warmup_cosine only
    min_lr_ratio: float = 0.1  # final LR / base LR for warmup_cosine

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "warmup_cosine"):
            raise ValueError(
                f"LRScheduleConfig.kind must be 'constant' or 'warmup_cosine', got {self.kind!r}"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"LRScheduleConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.kind == "warmup_cosine" and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"LRScheduleConfig.total_steps ({self.total_steps}) must exceed warmup_steps ({self.warmup_steps})"
            )
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"LRScheduleConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def lr_multiplier(step: int, config: LRScheduleConfig) -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based: the first step uses step=0)."""
    if config.warmup_steps > 0 and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.kind == "constant":
        return 1.0
    decay_steps = config.total_steps - config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: LRScheduleConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config))
