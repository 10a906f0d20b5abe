"""The Ray backend on a local Ray cluster that the module starts and stops: the orchestrator's episodes run in
env-worker actors calling a generator actor; a dead worker is replaced; a local policy in the generator actor
takes the learner's weights. No Ray process outlives the module."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
ray = pytest.importorskip("ray")  # the dist extra: installed by scripts/setup.sh, absent on the GPU machines

from m2rl.rl.orchestrator import OrchestratorBatch, OrchestratorConfig, RolloutOrchestrator
from m2rl.rl.ray_backend import LocalPolicyFactory, RayConfig, RayEnvPool, split_envs
from m2rl.rl.staleness import oldest_version
from rollout_doubles import LOOP, PARAMS, TOK, EnvFactory, LatencyPolicy

HERE = Path(__file__).parent
# Two CPUs: the generator and two env workers must fit (Ray would otherwise wait for resources forever).
SMALL = RayConfig(env_workers=2, worker_cpus=0.5, generator_cpus=0.5)


def _ray_processes() -> list[str]:
    """Command lines of the live processes below this one (Linux /proc) that belong to Ray."""
    parents, commands = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue  # gone meanwhile
        if fields[0] != "Z":  # an exited child not reaped yet is not running
            parents[int(stat.parent.name)], commands[int(stat.parent.name)] = int(fields[1]), command
    below, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - below
        below |= frontier
    return [commands[pid] for pid in below if "ray" in commands[pid].lower()]


@pytest.fixture(scope="module", autouse=True)
def ray_cluster() -> Iterator[None]:
    # The workers import the test doubles (rollout_doubles) as the driver does.
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 2**20, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        yield
    finally:
        ray.shutdown()
    deadline = time.monotonic() + 20
    while _ray_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _ray_processes()


def test_envs_are_split_evenly_over_the_workers() -> None:
    assert split_envs(5, 2) == [3, 2] and split_envs(2, 4) == [1, 1] and split_envs(8, 4) == [2] * 4


async def _train(orch: RolloutOrchestrator, pool: RayEnvPool, steps: int, groups: int) -> list[OrchestratorBatch]:
    await orch.start()
    batches = []
    try:
        for version in range(1, steps + 1):
            batch = await orch.next_batch(groups)
            for episode in batch.episodes():
                oldest = oldest_version(episode.trajectory.policy_versions)
                assert oldest is None or batch.learner_version - oldest <= orch.config.max_staleness
            await asyncio.sleep(0.05)  # the learner's update; the workers go on
            pool.set_policy_version(version)
            orch.on_weights_updated(version)
            batches.append(batch)
    finally:
        await orch.aclose()
    return batches


def _orchestrator(pool: RayEnvPool, **config: Any) -> RolloutOrchestrator:
    tasks = (f"sum/three/{i}" for i in itertools.count(1))
    return RolloutOrchestrator(pool, lambda: next(tasks), PARAMS, lambda: LOOP,
                               OrchestratorConfig(group_size=2, groups_per_batch=2, **config), version=0,
                               eos_id=TOK.eos_id)


def test_the_ray_backend_runs_a_small_batch_end_to_end() -> None:
    pool = RayEnvPool(EnvFactory(), 4, TOK, LatencyPolicy, SMALL)
    try:
        batches = asyncio.run(_train(_orchestrator(pool, max_staleness=1), pool, steps=2, groups=2))
    finally:
        pool.close()
    assert [len(b.groups) for b in batches] == [2, 2]
    assert all(e.resolved and not e.failed for b in batches for e in b.episodes())
    assert batches[-1].learner_version == 1 and all(b.metrics["rollout/generator_busy"] > 0 for b in batches)
    assert len({e.trajectory.metadata.get("task_id") for b in batches for e in b.episodes()}) == 4


def test_a_crashed_env_worker_is_replaced_and_its_episode_resampled() -> None:
    pool = RayEnvPool(EnvFactory(step_delay=lambda: 0.3), 2, TOK, LatencyPolicy, SMALL)
    orch = _orchestrator(pool, max_staleness=0)

    async def run() -> OrchestratorBatch:
        await orch.start()
        await asyncio.sleep(0.5)  # both workers are inside an episode
        ray.kill(pool.workers[0])
        batch = await orch.next_batch(2)
        await orch.aclose()
        return batch

    try:
        batch = asyncio.run(run())
    finally:
        pool.close()
    assert pool.workers_replaced == 1 and batch.metrics["rollout/resampled"] >= 1
    assert all(e.resolved for e in batch.episodes())


def test_a_local_policy_in_the_generator_actor_takes_the_learners_weights() -> None:
    from m2rl.model import M2Config, M2ForCausalLM
    from m2rl.rl.parity import model_logprobs

    config = M2Config.from_preset("tiny")
    generator_start = M2ForCausalLM(config).init_weights(seed=0)
    learner = M2ForCausalLM(config).init_weights(seed=1)
    pool = RayEnvPool(EnvFactory(), 2, TOK, LocalPolicyFactory(generator_start, TOK, max_batch_size=2), SMALL)
    try:
        ids = TOK.encode("What is 2 + 3 + 4?")
        assert pool.generator_logprobs(ids) != pytest.approx(model_logprobs(learner, ids), abs=1e-4)
        pool.push_weights(learner, version=5)
        assert ray.get(pool.generator.policy_version.remote()) == 5
        assert pool.generator_logprobs(ids) == pytest.approx(model_logprobs(learner, ids), abs=1e-5)
        # and it samples, with the version it was given
        from m2rl.agent.policy import SamplingParams

        out = ray.get(pool.generator.generate.remote(ids, SamplingParams(max_tokens=4, greedy=True)))
        assert out.policy_version == 5 and 1 <= len(out.ids) <= 4
    finally:
        pool.close()
    torch.set_num_threads(1)


@pytest.mark.bwrap
def test_a_training_run_on_the_ray_backend(tmp_path: Path) -> None:
    """The main job's stack (tiny M2, Python env in bubblewrap) with its episodes in two env-worker actors and
    its generator in a third, on the module's cluster (which it joins, and leaves running)."""
    from m2rl.rl.trainer import Trainer
    from test_trainer import small_config

    trainer = Trainer(small_config(tmp_path, "steps=2", "eval.every=0", "rollout.backend=ray",
                                   "rollout.ray.worker_cpus=0.5", "rollout.ray.generator_cpus=0.5"))
    summary = trainer.train()
    assert summary["steps"] == 2 and ray.is_initialized()
    records = [r for r in (json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines())
               if "learner/loss" in r]
    assert [r["rollout/max_staleness"] for r in records] == [0, 0]
    assert all(r["rollout/staleness_max"] == 0 and r["train/turns_mean"] > 0 for r in records)
    # the generator actor's copy was probed after every update, as the trainer's own generator is
    assert all(r["sync/ray_generator_parity_max_diff"] <= 1e-3 for r in records)


def test_the_generator_actor_is_probed_after_a_sync_and_a_copy_that_disagrees_is_rejected() -> None:
    """As the trainer probes its own generator: the actor's copy must give the learner's log-probs; a push that
    corrupts the weights is retried, then rejected (the run stops with its data kept)."""
    from m2rl.model import M2Config, M2ForCausalLM
    from m2rl.rl.parity import ParityProbe
    from m2rl.rl.weight_sync import SyncRejected

    config = M2Config.from_preset("tiny")
    learner = M2ForCausalLM(config).init_weights(seed=1)
    pool = RayEnvPool(EnvFactory(), 2, TOK, LocalPolicyFactory(M2ForCausalLM(config).init_weights(seed=0), TOK,
                                                               max_batch_size=2), SMALL)
    probe = ParityProbe.for_model(learner, tolerance=1e-4, tokenizer=TOK)
    try:
        parity = pool.sync(learner, 1, probe)
        assert parity is not None and parity.passed and pool.version == 1
        assert pool.sync(learner, 1, probe) is None  # the same version: nothing to do
        pushes = []
        real_push = pool.push_weights

        def corrupting_push(model, version):  # what a broken transport would deliver
            pushes.append(version)
            broken = M2ForCausalLM(config).init_weights(seed=7)
            real_push(broken, version)

        pool.push_weights = corrupting_push
        with pytest.raises(SyncRejected) as rejected:
            pool.sync(learner, 2, probe, retries=1)
        assert pushes == [2, 2] and rejected.value.report.rejected == 2
        assert rejected.value.report.parity.max_abs_diff > 1e-4 and pool.version == 1
    finally:
        pool.close()
