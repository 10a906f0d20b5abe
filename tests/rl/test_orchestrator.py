"""RolloutOrchestrator: asynchronous rollouts within a staleness bound, on real ToolEnvs (no sandbox) with
scripted policies; and its pure parts (the bound, the resource budget, group assembly, the busy clock)."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
from m2rl.agent.policy import PolicyOutput, SamplingParams
from m2rl.agent.trajectory import Trajectory
from m2rl.rl.admission import ResourceBudget, ResourceCost, episode_cost
from m2rl.rl.env_pool import LocalEnvPool
from m2rl.rl.groups import GroupAssembler, ScoredGroup
from m2rl.rl.orchestrator import OrchestratorBatch, OrchestratorConfig, RolloutOrchestrator
from m2rl.rl.rollout import EpisodeRunner, RolloutError, ScoredTrajectory
from m2rl.rl.rollout_stats import BusyClock
from m2rl.rl.staleness import StalenessBound, StalenessViolation, oldest_version
from rollout_doubles import LOOP, PARAMS, TOK, EnvFactory, LatencyPolicy, ShellThenSubmit, first_turn

# ------------------------------------------------------------------------------------------ pure parts


def test_the_bound_admits_a_batch_per_update_when_synchronous() -> None:
    bound = StalenessBound(max_staleness=0, version=3)
    assert [bound.may_start(live, 2) for live in range(4)] == [True, True, False, False]
    bound.on_batch()  # the learner trains on version 3's batch: nothing may start until it pushes version 4
    assert not bound.may_start(0, 2) and bound.next_batch_version == 4
    bound.on_update(4)
    assert bound.may_start(1, 2) and not bound.may_start(2, 2)


def test_the_bound_lets_k_batches_run_ahead() -> None:
    bound = StalenessBound(max_staleness=2, version=0)
    assert [bound.may_start(live, 2) for live in (4, 5, 6)] == [True, True, False]
    bound.on_batch()  # while the learner trains, one batch fewer may be ahead
    assert bound.may_start(3, 2) and not bound.may_start(4, 2)
    assert bound.oldest_trainable == -1 and bound.trainable(-1) and not bound.trainable(-2)


def test_check_batch_asserts_the_bound() -> None:
    bound = StalenessBound(max_staleness=1, version=5)
    assert bound.check_batch([5, 4, None]) == [0, 1]
    with pytest.raises(StalenessViolation, match="2 updates stale; the bound is 1"):
        bound.check_batch([5, 3])
    with pytest.raises(ValueError, match="went back"):
        bound.on_update(4)


def test_oldest_version_ignores_tokens_not_sampled() -> None:
    assert oldest_version([-1, -1, 3, 3, -1, 4]) == 3 and oldest_version([-1, -1]) is None


def test_the_budget_counts_cpu_memory_and_generator_slots() -> None:
    budget = ResourceBudget(cpus=2.0, memory_mb=3000, generator_slots=8)
    cost = ResourceCost(cpus=1.0, memory_mb=1024)
    budget.acquire(cost)
    budget.acquire(cost)
    assert not budget.fits(cost)  # a third would need 3 cores
    budget.release(cost)
    assert budget.fits(cost)
    assert not ResourceBudget(memory_mb=512).admits_ever(cost) and ResourceBudget().admits_ever(cost)


def test_an_episode_costs_its_sandbox_limits() -> None:
    from m2rl.sandboxes.limits import Limits

    class Env:
        backend, sandbox_limits = "bwrap", Limits(cpus=0.5, memory_mb=256)
        unwrapped = property(lambda self: self)

    assert episode_cost(Env()) == ResourceCost(cpus=0.5, memory_mb=256)
    Env.sandbox_limits = None
    assert episode_cost(Env()) == ResourceCost(cpus=Limits().cpus, memory_mb=Limits().memory_mb)
    Env.backend = None
    assert episode_cost(Env()) == ResourceCost()


def _episode(versions: list[int]) -> ScoredTrajectory:
    trajectory = Trajectory()
    trajectory.append_prompt([1, 2])
    for v in versions:
        trajectory.append_sampled([3], [-0.5], v)
    return ScoredTrajectory("t", 0, trajectory)


def test_a_group_is_handed_over_only_whole() -> None:
    groups = GroupAssembler(group_size=2)
    a, b = groups.start("task/a", version=1), groups.start("task/b", version=1)
    assert groups.finish(a, 1, _episode([1, 2])) is None and groups.oldest(a) == 1
    done = groups.finish(a, 0, _episode([2]))
    assert done is not None and [e.task_id for e in done.episodes] == ["task/a", "task/a"]
    assert done.oldest_version == 1 and len(groups) == 1
    assert groups.discard(b) == "task/b" and groups.finish(b, 0, _episode([1])) is None  # dropped: ignored
    with pytest.raises(ValueError, match="already filled"):
        c = groups.start("task/c", 1)
        groups.finish(c, 0, _episode([1]))
        groups.finish(c, 0, _episode([1]))


def test_a_finished_group_survives_serialisation() -> None:
    group = ScoredGroup(7, "task/a", [_episode([2, 3]), _episode([3])], start_version=2)
    back = ScoredGroup.from_dict(json.loads(json.dumps(group.to_dict())))
    assert back.group_id == 7 and back.start_version == 2 and back.oldest_version == 2
    assert [e.trajectory for e in back.episodes] == [e.trajectory for e in group.episodes]


def test_the_busy_clock_counts_time_with_a_request_in_flight() -> None:
    now = [0.0]
    clock = BusyClock(now=lambda: now[0])
    clock.begin()
    now[0] = 1.0
    clock.begin()  # overlapping requests count once
    now[0] = 2.0
    clock.end()
    now[0] = 3.0
    clock.end()
    now[0] = 10.0
    assert clock.busy_seconds() == 3.0
    clock.begin()
    now[0] = 11.0
    assert clock.busy_seconds() == 4.0


# ------------------------------------------------------------------------------------------ orchestrator


def orchestrator(factory: EnvFactory, policy: Any, num_envs: int = 4, max_staleness: int = 1, groups: int = 2,
                 group_size: int = 2, **config: Any) -> RolloutOrchestrator:
    runner = EpisodeRunner(factory, num_envs, TOK)
    tasks = (f"sum/three/{i}" for i in itertools.count(1))
    return RolloutOrchestrator(
        LocalEnvPool(runner, policy), lambda: next(tasks), PARAMS, lambda: LOOP,
        OrchestratorConfig(group_size=group_size, groups_per_batch=groups, max_staleness=max_staleness, **config),
        version=policy.policy_version, eos_id=TOK.eos_id)


async def train(orch: RolloutOrchestrator, policy: Any, steps: int, groups: int,
                learner_s: Callable[[], float] = lambda: 0.0,
                during_update: Callable[[], None] = lambda: None) -> list[OrchestratorBatch]:
    """What the trainer does: take a batch, train on it while generation goes on, push the next version."""
    await orch.start()
    batches = []
    try:
        for _ in range(steps):
            batch = await orch.next_batch(groups)
            assert batch.learner_version == policy.policy_version
            for episode in batch.episodes():  # the bound, checked here from the tokens themselves
                oldest = oldest_version(episode.trajectory.policy_versions)
                assert oldest is None or batch.learner_version - oldest <= orch.config.max_staleness
            assert orch.live_groups <= (orch.config.max_staleness + 1) * groups
            await asyncio.sleep(learner_s())
            during_update()
            policy.policy_version += 1
            orch.on_weights_updated(policy.policy_version)
            batches.append(batch)
    finally:
        await orch.aclose()
        orch.pool.runner.close()  # type: ignore[attr-defined]
    return batches


def test_max_staleness_0_is_the_synchronous_loop() -> None:
    policy = LatencyPolicy(seed=1)
    orch = orchestrator(EnvFactory(), policy, max_staleness=0)
    calls_during_updates: list[int] = []
    before = [0]

    def during_update() -> None:
        calls_during_updates.append(policy.calls - before[0])

    async def run() -> list[OrchestratorBatch]:
        batches = []
        await orch.start()
        for _ in range(3):
            batch = await orch.next_batch(2)
            before[0] = policy.calls
            await asyncio.sleep(0.05)  # the update: nothing is generated meanwhile
            during_update()
            policy.policy_version += 1
            orch.on_weights_updated(policy.policy_version)
            batches.append(batch)
        await orch.aclose()
        return batches

    batches = asyncio.run(run())
    assert calls_during_updates == [0, 0, 0]
    for version, batch in enumerate(batches):
        assert batch.staleness == [0] * 4 and batch.metrics["rollout/staleness_max"] == 0
        assert {v for e in batch.episodes() for v in e.trajectory.policy_versions} == {-1, version}
    # The same episodes, in the same order, as the synchronous EpisodeRunner makes of the same tasks.
    runner = EpisodeRunner(EnvFactory(), 2, TOK)
    reference = asyncio.run(runner.run(ShellThenSubmit(), ["sum/three/1", "sum/three/2"], 2, PARAMS, LOOP))
    got = batches[0].episodes()
    assert [(e.task_id, e.group, e.trajectory.ids, e.reward) for e in got] == \
           [(e.task_id, e.group, e.trajectory.ids, e.reward) for e in reference]
    runner.close()
    orch.pool.runner.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("max_staleness", [1, 2])
def test_the_staleness_bound_holds_under_random_latencies(max_staleness: int) -> None:
    stale_seen = 0
    for seed in range(4):
        rng = random.Random(seed)
        policy = LatencyPolicy(seed=seed, max_delay_s=0.01)
        factory = EnvFactory(step_delay=lambda r=rng: r.uniform(0, 0.004))
        orch = orchestrator(factory, policy, num_envs=4, max_staleness=max_staleness, groups=2)
        batches = asyncio.run(train(orch, policy, steps=6, groups=2, learner_s=lambda r=rng: r.uniform(0, 0.03)))
        for batch in batches:
            assert len(batch.groups) == 2 and all(len(g.episodes) == 2 for g in batch.groups)
            assert batch.metrics["rollout/staleness_max"] <= max_staleness
            stale_seen += batch.metrics["rollout/staleness_max"] > 0
    assert stale_seen  # it did run ahead of the learner


def test_groups_that_cannot_make_the_bound_are_dropped_and_resampled() -> None:
    """One episode is slow: by the time it finishes, its group is too stale; it is dropped, not trained on."""
    policy = LatencyPolicy(seed=0, max_delay_s=0.0)
    calls = itertools.count()
    factory = EnvFactory(step_delay=lambda: 0.4 if next(calls) == 0 else 0.0)
    orch = orchestrator(factory, policy, num_envs=4, max_staleness=1, groups=1)
    batches = asyncio.run(train(orch, policy, steps=4, groups=1, learner_s=lambda: 0.02))
    assert sum(b.metrics["rollout/dropped_stale"] for b in batches) >= 1
    assert all(b.metrics["rollout/staleness_max"] <= 1 for b in batches)


def test_a_crashed_env_is_replaced_and_its_episode_resampled() -> None:
    factory = EnvFactory(fail_on_resets={2})
    policy = LatencyPolicy(seed=0)
    orch = orchestrator(factory, policy, num_envs=2, max_staleness=1, groups=2)
    [batch] = asyncio.run(train(orch, policy, steps=1, groups=2))
    assert all(not e.failed and e.resolved for e in batch.episodes())  # the crash was rerun, not kept
    assert batch.metrics["rollout/resampled"] == 1
    assert len(factory.made) == 3 and sum(env.closed for env in factory.made) == 3  # replaced; then all closed


def test_an_episode_that_keeps_failing_is_kept_as_failed_and_all_failing_is_an_error() -> None:
    policy = LatencyPolicy(seed=0)
    factory = EnvFactory(fail_on_resets={1, 2})  # the first episode fails twice: max_resamples=1 keeps it failed
    orch = orchestrator(factory, policy, num_envs=1, max_staleness=0, groups=1, max_resamples=1)
    [batch] = asyncio.run(train(orch, policy, steps=1, groups=1))
    assert [e.failed for e in batch.episodes()] == [True, False]
    orch = orchestrator(EnvFactory(fail_all=True), LatencyPolicy(), num_envs=2, max_staleness=1, groups=1)
    with pytest.raises(RolloutError, match="episodes.*failed.*SandboxError"):
        asyncio.run(train(orch, orch.pool.policy, steps=1, groups=1))  # type: ignore[attr-defined]


class GatedPolicy(ShellThenSubmit):
    """The first episode's second turn waits at a gate: the test updates the weights meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.reached, self.gate = asyncio.Event(), asyncio.Event()

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> PolicyOutput:
        if not first_turn(prompt_ids) and not self.gate.is_set():
            self.reached.set()
            await self.gate.wait()
        return await super().generate(prompt_ids, params)


def test_a_weight_update_mid_episode_tags_later_tokens_with_the_new_version() -> None:
    policy = GatedPolicy()
    orch = orchestrator(EnvFactory(), policy, num_envs=1, max_staleness=1, groups=1, group_size=1)

    async def run() -> OrchestratorBatch:
        await orch.start()
        await policy.reached.wait()  # turn 1 sampled at version 0, turn 2 not yet
        policy.policy_version = 1
        orch.on_weights_updated(1)
        policy.gate.set()
        batch = await orch.next_batch(1)
        await orch.aclose()
        return batch

    batch = asyncio.run(run())
    [episode] = batch.episodes()
    spans = episode.trajectory.sampled_spans()
    assert [set(episode.trajectory.policy_versions[s.start:s.end]) for s in spans] == [{0}, {1}]
    assert batch.learner_version == 1 and batch.staleness == [1]  # measured from its oldest token
    orch.pool.runner.close()  # type: ignore[attr-defined]


class HangOnce(LatencyPolicy):
    """The very first request never returns: a straggler."""

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> PolicyOutput:
        if self.calls == 0:
            self.calls += 1
            await asyncio.Event().wait()
        return await super().generate(prompt_ids, params)


def test_a_straggler_is_abandoned_and_rerun() -> None:
    factory = EnvFactory()
    policy = HangOnce(seed=0)
    orch = orchestrator(factory, policy, num_envs=2, max_staleness=0, groups=1, episode_timeout_s=0.3)
    batches = asyncio.run(train(orch, policy, steps=1, groups=1))
    assert all(not e.failed for b in batches for e in b.episodes())
    assert sum(b.metrics["rollout/abandoned"] for b in batches) == 1
    assert sum(b.metrics["rollout/resampled"] for b in batches) == 1
    assert len(factory.made) == 3  # its env was replaced: it may have been mid-step


def test_backpressure_stops_generation_when_the_learner_is_behind() -> None:
    policy = LatencyPolicy(seed=0)
    orch = orchestrator(EnvFactory(), policy, num_envs=4, max_staleness=1, groups=1, group_size=1)

    async def run() -> tuple[int, int]:
        await orch.start()
        await asyncio.sleep(0.3)  # the learner never asks
        calls = policy.calls
        await asyncio.sleep(0.2)
        stalled = policy.calls - calls
        await orch.aclose()
        return len(orch.ready), stalled

    ready, stalled = asyncio.run(run())
    assert ready == 2 and stalled == 0  # (k + 1) x 1 groups finished, then nothing more
    orch.pool.runner.close()  # type: ignore[attr-defined]


class CountingPool(LocalEnvPool):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.now = self.most = 0

    async def run(self, *args: Any, **kwargs: Any) -> ScoredTrajectory:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            return await super().run(*args, **kwargs)
        finally:
            self.now -= 1


def test_episodes_start_only_while_the_sandbox_budget_has_room() -> None:
    policy = LatencyPolicy(seed=0)
    runner = EpisodeRunner(EnvFactory(step_delay=lambda: 0.01), 4, TOK)
    pool = CountingPool(runner, policy)
    pool._cost = ResourceCost(cpus=1.0, memory_mb=1024)  # as a sandbox with Limits(cpus=1) declares
    tasks = (f"sum/three/{i}" for i in itertools.count(1))
    config = OrchestratorConfig(group_size=2, groups_per_batch=2, max_staleness=1,
                                budget=ResourceBudget(cpus=2.0, memory_mb=4096))
    orch = RolloutOrchestrator(pool, lambda: next(tasks), PARAMS, lambda: LOOP, config, version=0, eos_id=TOK.eos_id)
    asyncio.run(train(orch, policy, steps=2, groups=2))
    assert pool.most == 2  # 4 envs, but only 2 cores of sandboxes at once
    with pytest.raises(ValueError, match="more than the whole budget"):
        RolloutOrchestrator(pool, lambda: "x", PARAMS, lambda: LOOP,
                            OrchestratorConfig(budget=ResourceBudget(memory_mb=512)), version=0, eos_id=0)


def test_finished_groups_carry_over_to_a_new_orchestrator() -> None:
    """What a checkpoint keeps (rl/trainer.py saves them with it): the next run's first batch trains on them."""
    policy = LatencyPolicy(seed=3)
    orch = orchestrator(EnvFactory(), policy, max_staleness=2, groups=1)
    asyncio.run(train(orch, policy, steps=2, groups=1, learner_s=lambda: 0.05))
    saved = json.loads(json.dumps([g.to_dict() for g in orch.finished_groups()]))
    assert saved  # generation ran ahead of the learner
    resumed_policy = LatencyPolicy(seed=4)
    resumed_policy.policy_version = policy.policy_version
    resumed = orchestrator(EnvFactory(), resumed_policy, max_staleness=2, groups=1)
    resumed.preload([ScoredGroup.from_dict(d) for d in saved])
    batches = asyncio.run(train(resumed, resumed_policy, steps=len(saved), groups=1))
    trained = [e.trajectory.ids for b in batches for e in b.episodes()]
    assert all(e["trajectory"]["ids"] in trained for g in saved for e in g["episodes"])


# ------------------------------------------------------------------------------------------ in the trainer


def _async_config(tmp_path: Any, *extra: str) -> Any:
    from test_trainer import small_config

    return small_config(tmp_path, "rollout.max_staleness=1", "eval.every=0", *extra)


def _wait_for(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.bwrap
def test_an_asynchronous_run_logs_the_bound_and_resumes_without_losing_finished_groups(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from m2rl.rl import trainer as trainer_module
    from m2rl.rl.trainer import Trainer

    trainer = Trainer(_async_config(tmp_path, "steps=3"))
    try:
        metrics = trainer.train_step()
        assert metrics["rollout/max_staleness"] == 1 and metrics["rollout/staleness_max"] <= 1
        for key in ("rollout/generator_busy", "rollout/trajectories_per_min", "rollout/dropped_stale",
                    "rollout/abandoned", "learner/ratio_p1", "learner/ratio_p99", "learner/clip_frac_high",
                    "learner/logp_gap_gen_current"):
            assert key in metrics, key
        assert trainer.background is not None
        _wait_for(lambda: len(trainer.background.finished_groups()) > 0)  # generation went on after the batch
        checkpoint = trainer.save()
    finally:
        trainer.close()
    saved = torch.load(checkpoint / "trainer_state.pt", weights_only=False)["finished_groups"]
    assert saved
    trained: list[list[int]] = []
    real = trainer_module.learner_advantages

    def spy(episodes: Any, *args: Any) -> Any:
        trained.extend(e.trajectory.ids for e in episodes)
        return real(episodes, *args)

    monkeypatch.setattr(trainer_module, "learner_advantages", spy)
    resumed = Trainer(_async_config(tmp_path, "steps=3", "resume=true"))
    try:
        assert resumed.step == 1 and len(resumed._finished_groups) == len(saved)
        while resumed.step < 3 and not all(e["trajectory"]["ids"] in trained for g in saved for e in g["episodes"]):
            resumed.train_step()
    finally:
        resumed.close()
    assert all(e["trajectory"]["ids"] in trained for g in saved for e in g["episodes"])


def test_the_rollout_settings_are_checked_when_the_config_loads() -> None:
    from m2rl.config import ConfigError, load_config
    from m2rl.rl.trainer import TrainConfig
    from test_trainer import REPO

    with pytest.raises(ConfigError, match="max_staleness must be >= 0, got -1"):
        load_config(TrainConfig, REPO / "configs" / "train.yaml", ["rollout.max_staleness=-1"])
    with pytest.raises(ConfigError, match="env_workers must be >= 1"):
        load_config(TrainConfig, REPO / "configs" / "train.yaml", ["rollout.ray.env_workers=0"])
    config = load_config(TrainConfig, REPO / "configs" / "train.yaml", [])
    assert config.rollout.max_staleness == 0 and not config.rollout.asynchronous  # the main job: synchronous
