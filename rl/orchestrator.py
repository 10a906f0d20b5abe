"""Asynchronous rollouts: episodes keep running while the learner trains, within a staleness bound.

    orchestrator = RolloutOrchestrator(pool, next_task, params, loop_config, config, version=v0)
    await orchestrator.start()                        # generation starts in the background
    batch = await orchestrator.next_batch(n_groups)   # n whole groups of G episodes, each within the bound
    ... learner update, weight push ...
    orchestrator.on_weights_updated(version)          # after every step, even one that changed nothing

What runs, and when:
- Admission (rl/staleness.py): a group of G episodes of the next task starts only if it can be trained on
  within `max_staleness` updates, only while fewer than `max_ready_groups` finished groups wait for the
  learner (backpressure: producers wait when the learner is behind), and each episode starts only while the
  resource budget (rl/admission.py: sandbox CPU and memory, generator slots) has room for it.
- Episodes (rl/env_pool.py) run concurrently, so the generator batches their requests. A weight update does
  not stop them: later segments carry the new version (partial rollouts), and their oldest token decides
  their staleness.
- Groups (rl/groups.py) are handed to the learner whole, as they complete, oldest tokens first.
- Long tail: an episode running past `episode_timeout_s` is abandoned and rerun on a fresh env (counted);
  the loop's turn limit (LoopConfig.max_turns) bounds it too. A failed episode (a dead env or sandbox, a
  policy error) is rerun on the fresh env the pool put in its place, `max_resamples` times, then kept as a
  failed episode (the learner leaves it out of its group's baseline). Nothing one episode does stops the others.
- Staleness: after every batch and update, groups that can no longer make the bound are dropped (running
  ones cancelled) and their tasks resampled; the bound is asserted on every batch handed out.
With max_staleness 0 it is the synchronous loop: n groups start after each update, none while the learner
trains. Metrics: rl/rollout_stats.py. Everything here runs on one event loop; rl/rollout_thread.py drives it
from the trainer's thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from m2rl.agent.loop import LoopConfig
from m2rl.agent.policy import SamplingParams
from m2rl.rl.admission import ResourceBudget
from m2rl.rl.env_pool import EpisodePool
from m2rl.rl.groups import GroupAssembler, ScoredGroup
from m2rl.rl.rollout import RolloutError, ScoredTrajectory, failed_episode
from m2rl.rl.rollout_stats import RolloutStats
from m2rl.rl.staleness import StalenessBound, oldest_version

logger = logging.getLogger(__name__)


@dataclass
class OrchestratorConfig:
    group_size: int = 8
    """G: episodes per task, handed to the learner together."""
    groups_per_batch: int = 4
    """Groups per learner batch until `next_batch` asks for another number (admission counts in batches)."""
    max_staleness: int = 1
    """Updates an episode's oldest token may be behind the learner when trained on; 0: synchronous."""
    max_ready_groups: int | None = None
    """Finished groups that may wait for the learner before no new group starts; None: (k+1) x groups_per_batch."""
    episode_timeout_s: float | None = None
    """Wall clock of one episode before it is abandoned and rerun; None: no limit."""
    max_resamples: int = 2
    """Reruns of one episode (failed or abandoned) before it is kept as a failed episode."""
    budget: ResourceBudget = field(default_factory=ResourceBudget)
    """Sandbox CPU and memory and generator slots running episodes may hold together."""


@dataclass
class OrchestratorBatch:
    groups: list[ScoredGroup]
    learner_version: int  # the version the batch was built (and its staleness measured) at
    staleness: list[int]  # of each episode that sampled anything
    metrics: dict[str, float]

    def episodes(self) -> list[ScoredTrajectory]:
        """Every episode, numbered by group within the batch (`ScoredTrajectory.group`)."""
        return [e for number, g in enumerate(self.groups) for e in g.numbered(number)]


@dataclass(eq=False)
class _Episode:
    """One slot of an admitted group, waiting or running."""

    group_id: int
    index: int
    attempts: int = 0
    oldest: int | None = None  # the oldest version it has sampled with so far
    task: asyncio.Task[None] | None = None

    def saw(self, version: int) -> None:
        self.oldest = version if self.oldest is None else min(self.oldest, version)


class RolloutOrchestrator:
    def __init__(self, pool: EpisodePool, next_task: Callable[[], str], params: SamplingParams,
                 loop_config: Callable[[], LoopConfig], config: OrchestratorConfig, *, version: int,
                 eos_id: int) -> None:
        self.pool, self.next_task, self.params, self.loop_config = pool, next_task, params, loop_config
        self.config, self.eos_id = config, eos_id
        self.budget = ResourceBudget(config.budget.cpus, config.budget.memory_mb,
                                     min(pool.slots, config.budget.generator_slots or pool.slots))
        if not self.budget.admits_ever(pool.cost):
            raise ValueError(f"one episode needs {pool.cost}, more than the whole budget {self.budget}")
        self.bound = StalenessBound(config.max_staleness, version)
        self.groups = GroupAssembler(config.group_size)
        self.groups_per_batch = config.groups_per_batch
        self.stats = RolloutStats(config.max_staleness)
        self.ready: list[ScoredGroup] = []  # finished groups waiting for the learner
        self.waiting: deque[_Episode] = deque()  # episodes of admitted groups not started yet
        self.running: set[_Episode] = set()
        self.resample: deque[str] = deque()  # tasks of dropped groups, admitted again first
        self.failures_in_a_row = 0
        self.error: BaseException | None = None
        self._changed = asyncio.Event()  # something the admission loop waits on happened
        self._progress = asyncio.Event()  # a group finished, or an error: what next_batch waits on
        self._driver: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ the learner's side

    async def start(self) -> None:
        self.stats.start(await self.pool.generator_busy_seconds())
        self._driver = asyncio.create_task(self._drive(), name="RolloutOrchestrator-admission")

    async def next_batch(self, n_groups: int) -> OrchestratorBatch:
        """`n_groups` whole groups within the staleness bound, once that many have finished."""
        if n_groups < 1:
            raise ValueError(f"n_groups must be >= 1, got {n_groups}")
        self.groups_per_batch = n_groups
        self._changed.set()
        while True:
            if self.error is not None:
                raise self.error
            self._drop_hopeless()
            if len(self.ready) >= n_groups:
                break
            self._progress.clear()
            await self._progress.wait()
        # Oldest tokens first: they are the ones the next update would make too stale.
        self.ready.sort(key=lambda g: (_oldest_or_newest(g), g.group_id))
        taken, self.ready = self.ready[:n_groups], self.ready[n_groups:]
        taken.sort(key=lambda g: g.group_id)
        errors = [e.error for g in taken for e in g.episodes if e.error is not None]
        if len(errors) == sum(len(g.episodes) for g in taken):  # as EpisodeRunner: nothing to learn from
            raise RolloutError(f"all {len(errors)} episodes of the batch failed; the first: {errors[0]}")
        version = self.bound.next_batch_version
        staleness = self.bound.check_batch([oldest_version(e.trajectory.policy_versions)
                                            for g in taken for e in g.episodes])
        metrics = self.stats.batch_metrics(staleness, await self.pool.generator_busy_seconds())
        self.bound.on_batch()
        self._drop_hopeless()
        self._changed.set()
        return OrchestratorBatch(taken, version, staleness, metrics)

    def on_weights_updated(self, version: int) -> None:
        """The generator now serves `version`; call after every learner step (the same version if it skipped)."""
        self.bound.on_update(version)
        self._drop_hopeless()
        self._changed.set()

    def preload(self, groups: list[ScoredGroup]) -> None:
        """Finished groups from a checkpoint: they wait for the learner like any other."""
        self.ready.extend(groups)
        self.groups.next_id = max([self.groups.next_id, *(g.group_id + 1 for g in groups)])
        self._progress.set()
        self._changed.set()

    def finished_groups(self) -> list[ScoredGroup]:
        """The finished groups not handed out yet (a checkpoint keeps them)."""
        return list(self.ready)

    async def aclose(self) -> None:
        """Stop admitting, cancel every running episode and wait for them."""
        await self.pool.aclose()
        tasks = [t for t in [self._driver, *(e.task for e in self.running)] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.running.clear()

    @property
    def live_groups(self) -> int:
        """Groups admitted and not yet handed out: running, waiting to run, or finished and waiting."""
        return len(self.groups) + len(self.ready)

    # ------------------------------------------------------------------ admission

    async def _drive(self) -> None:
        while True:
            try:
                self._admit()
            except Exception as exc:  # e.g. the task source failed: the learner gets the error
                logger.exception("rollout admission failed")
                self._fail(exc)
                return
            self._changed.clear()
            await self._changed.wait()

    def _admit(self) -> None:
        ready_cap = self.config.max_ready_groups or (self.config.max_staleness + 1) * self.groups_per_batch
        while (self.bound.may_start(self.live_groups, self.groups_per_batch) and len(self.ready) < ready_cap):
            task_id = self.resample.popleft() if self.resample else self.next_task()
            group_id = self.groups.start(task_id, self.bound.version)
            self.waiting.extend(_Episode(group_id, i) for i in range(self.config.group_size))
        while self.waiting and self.budget.fits(self.pool.cost):
            episode = self.waiting.popleft()
            if not self.groups.is_open(episode.group_id):
                continue  # its group was dropped
            self.budget.acquire(self.pool.cost)
            self.running.add(episode)
            episode.task = asyncio.create_task(self._run(episode))

    async def _run(self, episode: _Episode) -> None:
        task_id = self.groups.task_of(episode.group_id)
        try:
            result = await asyncio.wait_for(
                self.pool.run(task_id, self.params, self.loop_config(), on_version=episode.saw),
                self.config.episode_timeout_s)
        except TimeoutError:
            self.stats.count("abandoned")
            message = f"abandoned after {self.config.episode_timeout_s} s"
            logger.info("an episode of task %s was %s", task_id, message)
            result = failed_episode(task_id, 0, message, self.eos_id)
        except asyncio.CancelledError:
            return  # its group was dropped, or the orchestrator is closing
        finally:
            self.budget.release(self.pool.cost)
            self.running.discard(episode)
            self._changed.set()
        self._finished(episode, result)

    def _finished(self, episode: _Episode, result: ScoredTrajectory) -> None:
        self.stats.count("finished")
        if not result.failed:
            self.failures_in_a_row = 0
        else:
            self.failures_in_a_row += 1
            if self.failures_in_a_row >= max(8, 2 * self.pool.slots):
                self._fail(RolloutError(f"the last {self.failures_in_a_row} episodes all failed; "
                                        f"the latest: {result.error}"))
            if episode.attempts < self.config.max_resamples and self.groups.is_open(episode.group_id):
                self.stats.count("resampled")
                episode.attempts, episode.oldest = episode.attempts + 1, None
                self.waiting.appendleft(episode)  # before new groups: its group waits for it
                return
        group = self.groups.finish(episode.group_id, episode.index, result)
        if group is not None:
            self.ready.append(group)
            self._progress.set()

    def _drop_hopeless(self) -> None:
        """Drop every group that can no longer be trained on within the bound; their tasks are resampled."""
        floor = self.bound.oldest_trainable
        for group in [g for g in self.ready if not self.bound.trainable(g.oldest_version)]:
            self.ready.remove(group)
            self.stats.count("dropped_stale")
            self.resample.append(group.task_id)
        hopeless = {e.group_id for e in self.running if e.oldest is not None and e.oldest < floor}
        hopeless |= {gid for gid in list(self.groups.open) if (o := self.groups.oldest(gid)) is not None and o < floor}
        for group_id in hopeless:
            task_id = self.groups.discard(group_id)
            if task_id is None:
                continue
            self.stats.count("dropped_stale")
            self.resample.append(task_id)
            for episode in [e for e in self.running if e.group_id == group_id]:
                if episode.task is not None:
                    episode.task.cancel()
        if hopeless:
            self._changed.set()

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self._progress.set()


def _oldest_or_newest(group: ScoredGroup) -> float:
    oldest = group.oldest_version
    return float("inf") if oldest is None else oldest

