"""Where the rollout orchestrator's episodes run: `EpisodePool`, and its in-process form `LocalEnvPool`.

A pool runs one episode of a task at a time per slot and returns it as a `ScoredTrajectory`; an env or
sandbox that fails becomes a failed episode (its env replaced, rl/rollout.py), never an exception. Every
sampled segment's policy version is reported as it arrives (`on_version`), so the orchestrator can give up on
an episode that has become too stale while it still runs. The generator's busy time is measured where the
requests are made. `LocalEnvPool` runs envs in this process against any `Policy`; rl/ray_backend.py's
`RayEnvPool` runs them in env-worker actors against a generator actor.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from m2rl.agent.loop import LoopConfig
from m2rl.agent.policy import Policy, PolicyOutput, SamplingParams
from m2rl.rl.admission import ResourceCost, episode_cost
from m2rl.rl.rollout import EpisodeRunner, ScoredTrajectory
from m2rl.rl.rollout_stats import BusyClock

logger = logging.getLogger(__name__)

VersionCallback = Callable[[int], None]


class EpisodePool(Protocol):
    @property
    def slots(self) -> int:
        """Episodes it can run at once."""
        ...

    @property
    def cost(self) -> ResourceCost:
        """What one episode holds while it runs (admission control, rl/admission.py)."""
        ...

    async def run(self, task_id: str, params: SamplingParams, loop_config: LoopConfig,
                  on_version: VersionCallback | None = None) -> ScoredTrajectory:
        """One episode of `task_id`; a failure is a failed episode. Cancelling it frees its slot."""
        ...

    async def generator_busy_seconds(self) -> float:
        """Wall time so far with at least one generate request in flight."""
        ...

    async def aclose(self) -> None: ...


class WatchedPolicy:
    """A `Policy` that times its requests on a BusyClock and reports each output's version."""

    def __init__(self, policy: Policy, clock: BusyClock, on_version: VersionCallback | None = None) -> None:
        self.policy, self.clock, self.on_version = policy, clock, on_version

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> PolicyOutput:
        self.clock.begin()
        try:
            out = await self.policy.generate(prompt_ids, params)
        finally:
            self.clock.end()
        if self.on_version is not None:
            self.on_version(out.policy_version)
        return out


class LocalEnvPool:
    """The envs of an `EpisodeRunner`, one episode each at a time, against one in-process `Policy`.

    The orchestrator never runs more than `slots` episodes at once, so a free env is always there."""

    def __init__(self, runner: EpisodeRunner, policy: Policy) -> None:
        if not runner.envs:
            raise ValueError("LocalEnvPool needs a runner with at least one env")
        self.runner, self.policy = runner, policy
        self.clock = BusyClock()
        self.free = list(runner.envs)
        self._cost = episode_cost(runner.envs[0])
        self.closing = False

    @property
    def slots(self) -> int:
        return len(self.runner.envs)

    @property
    def cost(self) -> ResourceCost:
        return self._cost

    async def run(self, task_id: str, params: SamplingParams, loop_config: LoopConfig,
                  on_version: VersionCallback | None = None) -> ScoredTrajectory:
        if not self.free:
            raise RuntimeError(f"all {self.slots} envs are busy: the orchestrator started too many episodes")
        env = self.free.pop()
        policy = WatchedPolicy(self.policy, self.clock, on_version)
        try:
            episode, env = await self.runner.episode(env, policy, task_id, 0, params, loop_config)
        except asyncio.CancelledError:
            # Abandoned mid-episode: its env may still be inside a step in a worker thread, so a fresh one takes
            # its place (not while shutting down: then every env is closed anyway).
            if not self.closing:
                env = await asyncio.to_thread(self.runner.replace_env, env)
            raise
        finally:
            self.free.append(env)
        return episode

    async def generator_busy_seconds(self) -> float:
        return self.clock.busy_seconds()

    async def aclose(self) -> None:
        self.closing = True
