"""The staleness bound of asynchronous rollouts: which groups may start, and which may be trained on.

Versions: the generator serves the learner's weights after its latest push, and every sampled token records
the version that sampled it (`Trajectory.policy_versions`). An episode's staleness at training time is

    staleness = learner version when the batch is built - the oldest version among its sampled tokens,

how many updates behind its oldest token is. With the bound k (`rollout.max_staleness`):

- Admission. A group that starts now samples at the generator's version v or later. Groups reach the learner
  about in the order they finish, n per batch, so with L groups already live (running, or finished and
  waiting) a new one lands floor(L / n) batches after the next one, which the learner builds at version
  `next_batch_version + floor(L / n)`. It starts only if that is at most v + k. With k = 0 that admits n
  groups after each weight update and none while the learner trains on them: the synchronous loop.
- Batch time. Groups do not finish in the order they started (long tails, partial rollouts that continue
  across updates), so a group may still exceed the bound when a batch is built: it is dropped and its task
  resampled, and the bound is asserted on every batch handed out (`check_batch`).

Pure bookkeeping: no clock, no asyncio. The orchestrator calls `on_batch` when it hands out a batch and
`on_update(version)` after every learner step, with the version the generator now serves (the same version
when the learner skipped its update), so the next batch's version is always known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class StalenessViolation(AssertionError):
    """A batch was about to train on tokens older than the bound allows: a bug in the admission or drop rules."""


def oldest_version(policy_versions: Sequence[int]) -> int | None:
    """The oldest policy version among sampled tokens (non-sampled tokens carry -1); None: nothing sampled."""
    sampled = [v for v in policy_versions if v >= 0]
    return min(sampled) if sampled else None


@dataclass
class StalenessBound:
    max_staleness: int
    """k: how many updates behind the learner an episode's oldest token may be when it is trained on."""
    version: int = 0
    """The version the generator serves now (the learner's after its latest push)."""
    batch_taken: bool = False
    """A batch was handed out since the last `on_update`: the next one is built after that update."""

    def __post_init__(self) -> None:
        if self.max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {self.max_staleness}")

    @property
    def next_batch_version(self) -> int:
        """The learner version at which the next batch will be built (and its staleness measured)."""
        return self.version + int(self.batch_taken)

    @property
    def oldest_trainable(self) -> int:
        """Episodes whose oldest token is older than this can no longer be trained on."""
        return self.next_batch_version - self.max_staleness

    def may_start(self, live_groups: int, groups_per_batch: int) -> bool:
        """Whether one more group may start now, with `live_groups` running or waiting ahead of it."""
        if groups_per_batch < 1:
            raise ValueError(f"groups_per_batch must be >= 1, got {groups_per_batch}")
        lands_at = self.next_batch_version + live_groups // groups_per_batch
        return lands_at - self.version <= self.max_staleness

    def trainable(self, oldest: int | None) -> bool:
        """Whether an episode with this oldest token version may be in the next batch (None: no tokens)."""
        return oldest is None or oldest >= self.oldest_trainable

    def staleness(self, oldest: int | None) -> int | None:
        return None if oldest is None else self.next_batch_version - oldest

    def check_batch(self, oldest_versions: Sequence[int | None]) -> list[int]:
        """The staleness of each episode of a batch about to be handed out; raises if one exceeds the bound."""
        values = [s for s in (self.staleness(o) for o in oldest_versions) if s is not None]
        worst = max(values, default=0)
        if worst > self.max_staleness:
            raise StalenessViolation(f"a batch built at version {self.next_batch_version} holds an episode "
                                     f"{worst} updates stale; the bound is {self.max_staleness}")
        return values

    def on_batch(self) -> None:
        self.batch_taken = True

    def on_update(self, version: int) -> None:
        if version < self.version:
            raise ValueError(f"policy version went back from {self.version} to {version}")
        self.version = version
        self.batch_taken = False
