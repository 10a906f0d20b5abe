"""What the rollout orchestrator measures between two batches, as `rollout/*` metrics.

- `rollout/generator_busy`: the share of wall time with at least one generate request in flight (the
  generator has work; how full its batches are is the generator's own metric).
- `rollout/trajectories_per_min`: episodes finished (kept or not) per minute of wall time.
- `rollout/staleness_mean`, `rollout/staleness_max`: of the batch's episodes (learner version - oldest token
  version); `rollout/max_staleness` is the bound they were checked against.
- `rollout/dropped_stale`: groups dropped because they could no longer be trained within the bound.
- `rollout/abandoned`: episodes cancelled past `rollout.episode_timeout_s` (stragglers) and rerun.
- `rollout/resampled`: failed episodes (a dead env or sandbox, a policy error) rerun on a fresh env.
Counts are per batch (since the previous one); rates are over the wall time since the previous batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


class BusyClock:
    """Time with at least one request in flight; `begin`/`end` bracket each request."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self.now = now
        self.in_flight = 0
        self._busy = 0.0
        self._since = 0.0

    def begin(self) -> None:
        if self.in_flight == 0:
            self._since = self.now()
        self.in_flight += 1

    def end(self) -> None:
        if self.in_flight <= 0:
            raise RuntimeError("BusyClock.end without a matching begin")
        self.in_flight -= 1
        if self.in_flight == 0:
            self._busy += self.now() - self._since

    def busy_seconds(self) -> float:
        """Busy time so far, the request in flight now included."""
        return self._busy + (self.now() - self._since if self.in_flight else 0.0)


@dataclass
class RolloutCounters:
    """Counts since the last batch (reset by `RolloutStats.batch_metrics`)."""

    finished: int = 0
    dropped_stale: int = 0
    abandoned: int = 0
    resampled: int = 0


@dataclass
class RolloutStats:
    max_staleness: int
    now: Callable[[], float] = time.monotonic
    counters: RolloutCounters = field(default_factory=RolloutCounters)
    totals: RolloutCounters = field(default_factory=RolloutCounters)
    _last_time: float | None = None
    _last_busy: float = 0.0

    def count(self, name: str, n: int = 1) -> None:
        setattr(self.counters, name, getattr(self.counters, name) + n)
        setattr(self.totals, name, getattr(self.totals, name) + n)

    def start(self, busy_seconds: float) -> None:
        self._last_time, self._last_busy = self.now(), busy_seconds

    def batch_metrics(self, staleness: Sequence[int], busy_seconds: float) -> dict[str, float]:
        """The metrics of the batch just built, over the time since the previous one; resets the counts."""
        now = self.now()
        if self._last_time is None:
            self._last_time = now
        wall = max(now - self._last_time, 1e-9)
        c = self.counters
        metrics = {
            "rollout/max_staleness": float(self.max_staleness),
            "rollout/staleness_mean": sum(staleness) / len(staleness) if staleness else 0.0,
            "rollout/staleness_max": float(max(staleness, default=0)),
            "rollout/generator_busy": min(1.0, max(0.0, (busy_seconds - self._last_busy) / wall)),
            "rollout/trajectories_per_min": c.finished * 60.0 / wall,
            "rollout/dropped_stale": float(c.dropped_stale),
            "rollout/abandoned": float(c.abandoned),
            "rollout/resampled": float(c.resampled),
        }
        self.counters = RolloutCounters()
        self._last_time, self._last_busy = now, busy_seconds
        return metrics
