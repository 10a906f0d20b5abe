"""Difficulty curriculum driven by measured solve rates.

Each task keeps a (recency-weighted) count of attempts and successes; its solve-rate estimate is the
posterior mean under a Beta prior. A batch is drawn by tiers:
  1. an `explore_fraction` share from tasks not yet measured (fewer than `min_attempts` attempts);
  2. the rest from the learning band (target_low <= rate <= target_high: 20-60% by default), where
     group-relative advantages carry most signal;
  3. when the band runs out, harder tasks (rate < target_low), the nearest to the band first;
  4. then easy ones (rate > target_high), the least solved first; then unexplored tasks again.
As the policy improves, `update` moves hard tasks into the band and band tasks out, so the draw shifts
towards harder tasks on its own.
"""

from __future__ import annotations

import math
import random
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any


@dataclass
class CurriculumConfig:
    target_low: float = 0.2
    """Lower edge of the learning band: tasks solved at least this often (and at most target_high) come first."""
    target_high: float = 0.6
    """Upper edge of the learning band; tasks solved more often than this are drawn last."""
    min_attempts: int = 4  # fewer attempts: the task counts as unknown
    explore_fraction: float = 0.1  # share of each draw reserved for unknown tasks
    decay: float = 1.0  # weight kept by old attempts at each new attempt (< 1 follows a changing policy)
    prior_successes: float = 1.0  # Beta prior alpha
    prior_failures: float = 1.0  # Beta prior beta

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_low <= self.target_high <= 1.0:
            raise ValueError(
                f"need 0 <= target_low <= target_high <= 1, got {self.target_low}, {self.target_high}"
            )
        if self.min_attempts < 0:
            raise ValueError(f"min_attempts must be >= 0, got {self.min_attempts}")
        if not 0.0 <= self.explore_fraction <= 1.0:
            raise ValueError(f"explore_fraction must be in [0, 1], got {self.explore_fraction}")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {self.decay}")
        if self.prior_successes <= 0 or self.prior_failures <= 0:
            raise ValueError("prior_successes and prior_failures must be > 0")


class DifficultyCurriculum:
    def __init__(self, task_ids: Iterable[Hashable], config: CurriculumConfig | None = None) -> None:
        self.config = config or CurriculumConfig()
        self.attempts: dict[Hashable, float] = {}
        self.successes: dict[Hashable, float] = {}
        self.raw_attempts: dict[Hashable, int] = {}
        for task in task_ids:
            self.attempts[task] = 0.0
            self.successes[task] = 0.0
            self.raw_attempts[task] = 0
        if not self.attempts:
            raise ValueError("DifficultyCurriculum needs at least one task")

    def update(self, task_id: Hashable, score: float) -> None:
        """Record one attempt; score in [0, 1] (1 = solved; fractional scores count partially)."""
        if task_id not in self.attempts:
            raise KeyError(f"unknown task {task_id!r}")
        if not (0.0 <= score <= 1.0) or math.isnan(score):
            raise ValueError(f"score must be in [0, 1], got {score}")
        d = self.config.decay
        self.attempts[task_id] = d * self.attempts[task_id] + 1.0
        self.successes[task_id] = d * self.successes[task_id] + float(score)
        self.raw_attempts[task_id] += 1

    def solve_rate(self, task_id: Hashable) -> float:
        c = self.config
        return (self.successes[task_id] + c.prior_successes) / (
            self.attempts[task_id] + c.prior_successes + c.prior_failures
        )

    def tier(self, task_id: Hashable) -> str:
        """'unknown', 'band', 'hard' or 'easy'."""
        if self.raw_attempts[task_id] < self.config.min_attempts:
            return "unknown"
        rate = self.solve_rate(task_id)
        if rate < self.config.target_low:
            return "hard"
        if rate > self.config.target_high:
            return "easy"
        return "band"

    def sample(self, n: int, rng: random.Random) -> list[Hashable]:
        """Draw `n` task ids (distinct while n <= number of tasks; then the order repeats)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        tiers: dict[str, list[Hashable]] = {"unknown": [], "band": [], "hard": [], "easy": []}
        for task in self.attempts:
            tiers[self.tier(task)].append(task)
        for name in ("unknown", "band"):
            rng.shuffle(tiers[name])
        # ties broken by a shuffle so equal estimates are not always served in insertion order
        for name in ("hard", "easy"):
            rng.shuffle(tiers[name])
        tiers["hard"].sort(key=self.solve_rate, reverse=True)  # nearest the band first
        tiers["easy"].sort(key=self.solve_rate)  # least solved first
        n_explore = min(len(tiers["unknown"]), math.ceil(self.config.explore_fraction * n))
        order = tiers["unknown"][:n_explore] + tiers["band"] + tiers["hard"] + tiers["easy"]
        order += tiers["unknown"][n_explore:]
        out: list[Hashable] = []
        while len(out) < n:
            out.extend(order[: n - len(out)])
        return out

    def stats(self) -> dict[str, float]:
        counts = {"unknown": 0, "band": 0, "hard": 0, "easy": 0}
        for task in self.attempts:
            counts[self.tier(task)] += 1
        known = [self.solve_rate(t) for t in self.attempts if self.tier(t) != "unknown"]
        out = {f"curriculum/{k}_tasks": float(v) for k, v in counts.items()}
        out["curriculum/mean_solve_rate"] = sum(known) / len(known) if known else float("nan")
        return out

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: per task, the (decayed) attempts and successes, and the raw attempts."""
        return {
            "attempts": dict(self.attempts),
            "successes": dict(self.successes),
            "raw_attempts": dict(self.raw_attempts),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore `state_dict()`. The task pool stays this curriculum's: with `strict`, a pool task missing
        from the state is an error; without it (a resumed run whose pool changed), such a task starts
        unmeasured and state for tasks outside the pool is ignored."""
        missing = set(self.attempts) - set(state["attempts"])
        if missing and strict:
            raise ValueError(
                f"curriculum state lacks {len(missing)} tasks, e.g. {sorted(map(str, missing))[:3]}"
            )
        for task in self.attempts:
            if task in missing:
                continue
            self.attempts[task] = float(state["attempts"][task])
            self.successes[task] = float(state["successes"][task])
            self.raw_attempts[task] = int(state["raw_attempts"][task])
