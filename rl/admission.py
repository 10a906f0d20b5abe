"""Admission control: an episode starts only while the sandbox CPU, memory and generator capacity allow.

Each env declares what one episode on it needs: its sandbox's `Limits` (sandboxes/limits.py: `cpus`,
`memory_mb`), nothing for an env without a sandbox, and one generator slot (the episodes whose turns the
generator batches together). A `ResourceBudget` holds the totals; an episode acquires its cost when it starts
and releases it when it ends. A limit of None is not enforced (the default for CPU and memory: sandbox limits
are caps, not reservations, and an episode spends most of its time waiting for the generator, so counting
them against the host's cores would idle both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ResourceCost:
    """What one running episode holds."""

    cpus: float = 0.0
    memory_mb: float = 0.0
    generator_slots: int = 1


def episode_cost(env: Any) -> ResourceCost:
    """The cost of one episode on `env`: its sandbox's declared limits (the default `Limits` when it has a
    sandbox backend but no explicit limits), zero CPU and memory when it has no sandbox (backend None)."""
    unwrapped = getattr(env, "unwrapped", env)
    if getattr(unwrapped, "backend", None) is None:
        return ResourceCost()
    limits = getattr(unwrapped, "sandbox_limits", None)
    if limits is None:
        from m2rl.sandboxes.limits import Limits

        limits = Limits()
    return ResourceCost(cpus=float(limits.cpus), memory_mb=float(limits.memory_mb))


@dataclass
class ResourceBudget:
    cpus: float | None = None
    """Sandbox CPU cores all running episodes may declare together; None: not limited."""
    memory_mb: float | None = None
    """Sandbox memory (MB) all running episodes may declare together; None: not limited."""
    generator_slots: int | None = None
    """Episodes running at once (the generator's batch); None: not limited."""
    used_cpus: float = 0.0
    used_memory_mb: float = 0.0
    used_generator_slots: int = 0

    def admits_ever(self, cost: ResourceCost) -> bool:
        """Whether one episode of this cost fits an empty budget (else it could never start)."""
        return ResourceBudget(self.cpus, self.memory_mb, self.generator_slots).fits(cost)

    def fits(self, cost: ResourceCost) -> bool:
        return (_room(self.cpus, self.used_cpus, cost.cpus)
                and _room(self.memory_mb, self.used_memory_mb, cost.memory_mb)
                and _room(self.generator_slots, self.used_generator_slots, cost.generator_slots))

    def acquire(self, cost: ResourceCost) -> None:
        if not self.fits(cost):
            raise RuntimeError(f"{cost} does not fit the budget {self}")
        self.used_cpus += cost.cpus
        self.used_memory_mb += cost.memory_mb
        self.used_generator_slots += cost.generator_slots

    def release(self, cost: ResourceCost) -> None:
        self.used_cpus = max(0.0, self.used_cpus - cost.cpus)
        self.used_memory_mb = max(0.0, self.used_memory_mb - cost.memory_mb)
        self.used_generator_slots = max(0, self.used_generator_slots - cost.generator_slots)


def _room(limit: float | None, used: float, need: float) -> bool:
    # 1e-9: sums of fractional cores must not refuse an exact fit through rounding
    return limit is None or used + need <= limit + 1e-9
