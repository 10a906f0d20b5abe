"""EpisodeRunner: a failing episode ends that episode only; detector hits and failures reach the metrics.

The envs are real `ToolEnv`s without a sandbox (backend=None) whose `reset` can be made to fail, the policy
is a scripted double, and the metrics come from the trainer's own `summarize_episodes`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from m2rl.rl.rollout import EpisodeRunner, RolloutError
from m2rl.rl.trainer import episodes_to_batch, summarize_episodes
from rollout_doubles import LOOP, PARAMS, TOK, EnvFactory, ShellThenSubmit


def collect(runner: EpisodeRunner, tasks: list[str], group: int, command: str = "echo hi") -> list[Any]:
    return asyncio.run(runner.run(ShellThenSubmit(command), tasks, group, PARAMS, LOOP))


def test_a_failing_episode_ends_that_episode_only() -> None:
    """Before: the SandboxError of one reset came out of asyncio.gather and ended the whole batch."""
    factory = EnvFactory(fail_on_resets={2, 5})
    runner = EpisodeRunner(factory, num_envs=2, tokenizer=TOK)
    episodes = collect(runner, ["sum/three/1", "sum/three/2"], group=4)
    assert [(e.task_id, e.group) for e in episodes] == [("sum/three/1", 0)] * 4 + [("sum/three/2", 1)] * 4
    failed = [e for e in episodes if e.error is not None]
    assert len(failed) == 2
    for e in failed:
        assert e.exit_reason == "error" and "SandboxError" in e.error and "reset failed" in e.error
        assert e.reward == 0.0 and not e.resolved and e.sampled_tokens == 0  # no loss tokens
    assert all(e.resolved and e.error is None for e in episodes if e not in failed)
    # Each env that failed was closed and replaced by a fresh one from make_env.
    assert len(factory.made) == 4 and sum(env.closed for env in factory.made) == 2
    assert set(runner.envs) == {env for env in factory.made if not env.closed}
    runner.close()


def test_failed_episodes_add_no_loss_tokens_to_the_batch() -> None:
    runner = EpisodeRunner(EnvFactory(fail_on_resets={1}), num_envs=1, tokenizer=TOK)
    episodes = collect(runner, ["sum/three/1"], group=2)
    batch = episodes_to_batch(episodes, [1.0, -1.0], pad_id=TOK.eos_id)
    failed = [i for i, e in enumerate(episodes) if e.error is not None]
    assert failed == [0] and int(batch.loss_mask[0].sum()) == 0 and int(batch.loss_mask[1].sum()) > 0
    runner.close()


def test_every_episode_failing_is_a_clear_error() -> None:
    runner = EpisodeRunner(EnvFactory(fail_all=True), num_envs=2, tokenizer=TOK)
    with pytest.raises(RolloutError, match=r"all 4 episodes failed.*SandboxError: sandbox reset failed"):
        collect(runner, ["sum/three/1", "sum/three/2"], group=2)
    runner.close()


def test_an_env_that_cannot_be_replaced_is_kept_and_nothing_hangs() -> None:
    factory = EnvFactory(fail_on_resets={1})
    runner = EpisodeRunner(factory, num_envs=1, tokenizer=TOK)

    def broken_make_env() -> Any:
        raise OSError("no more sandboxes")

    runner.make_env = broken_make_env
    episodes = collect(runner, ["sum/three/1"], group=3)
    assert [e.error is not None for e in episodes] == [True, False, False]
    assert runner.envs == factory.made[:1]
    runner.close()


def test_detector_hits_and_failures_reach_the_metrics() -> None:
    """Before: compute_episode_rewards counted detector hits, but no metric ever showed them."""
    factory = EnvFactory(fail_on_resets={3})
    runner = EpisodeRunner(factory, num_envs=2, tokenizer=TOK)
    episodes = collect(runner, ["sum/three/1", "sum/three/2"], group=2, command="echo '5 passed'")
    finished = [e for e in episodes if e.error is None]
    assert len(finished) == 3 and all(e.detectors == {"fake_test_output": 1} for e in finished)
    assert all(e.resolved for e in finished)  # honest output does not cost the answer
    metrics = summarize_episodes(episodes, "train")
    assert metrics["detectors/fake_test_output"] == pytest.approx(3 / 4)  # share of episodes with a hit
    assert metrics["detectors/test_tampering"] == 0.0
    assert metrics["rollout/failed_episodes"] == 1.0
    held_out = summarize_episodes(episodes, "eval")
    assert held_out["eval/detectors/fake_test_output"] == pytest.approx(3 / 4)
    assert held_out["eval/failed_episodes"] == 1.0 and "detectors/fake_test_output" not in held_out
    runner.close()
