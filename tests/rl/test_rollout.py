"""EpisodeRunner: a failing episode ends that episode only; detector hits and failures reach the metrics.

The envs are real `ToolEnv`s without a sandbox (backend=None) whose `reset` can be made to fail, the policy
is a scripted double, and the metrics come from the trainer's own `summarize_episodes`.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from m2rl.agent.format import render_completion
from m2rl.agent.loop import LoopConfig
from m2rl.agent.policy import PolicyOutput, SamplingParams
from m2rl.envs import Task, TaskSet, ToolEnv, ToolOutput
from m2rl.model import M2Tokenizer
from m2rl.rl.rollout import EpisodeRunner, RolloutError
from m2rl.rl.trainer import episodes_to_batch, summarize_episodes
from m2rl.sandboxes import SandboxError

TOK = M2Tokenizer.tiny()
PARAMS = SamplingParams(max_tokens=200, greedy=True)
LOOP = LoopConfig(max_turns=4)


class SumTasks(TaskSet):
    family, kinds = "sum", ("three",)

    def generate(self, kind: str, seed: int) -> Task:
        return self.make_task(kind, seed, "What is 2 + 3 + 4? Submit the number.", answer="9")


def shell(command: str) -> ToolOutput:
    """Pretend to run a command (its output is the command).

    Args:
        command: the command
    """
    return ToolOutput(output=command, commands=[command])


def submit(answer: str) -> ToolOutput:
    """Submit the final answer.

    Args:
        answer: the answer
    """
    return ToolOutput(output="Submitted.", answer=answer, done=True)


def turn(name: str, **args: str) -> str:
    call = {"type": "function", "function": {"name": name, "arguments": args}}
    return render_completion({"role": "assistant", "reasoning_content": "Go.", "content": "", "tool_calls": [call]})


class ShellThenSubmit:
    """A policy double: first turn of an episode runs `command`, the next one submits 9."""

    policy_version = 0

    def __init__(self, command: str = "echo hi") -> None:
        self.command = command

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> PolicyOutput:
        first_turn = "<response>" not in TOK.decode(prompt_ids)
        ids = TOK.encode(turn("shell", command=self.command) if first_turn else turn("submit", answer="9"))
        return PolicyOutput(ids=ids, logprobs=[-0.1] * len(ids), finish_reason="stop", policy_version=0)


class FlakyEnv(ToolEnv):
    """A ToolEnv whose reset raises when `fails()` says so (a sandbox that cannot be reset)."""

    def __init__(self, fails: Any) -> None:
        super().__init__(SumTasks(), lambda env: [shell, submit], backend=None)
        self.fails = fails
        self.closed = False

    def reset(self, **kwargs: Any) -> Any:
        if self.fails():
            raise SandboxError("sandbox reset failed: RecursionError")
        return super().reset(**kwargs)

    def close(self) -> None:
        self.closed = True
        super().close()


class EnvFactory:
    def __init__(self, fail_on_resets: set[int] | None = None, fail_all: bool = False) -> None:
        self.resets = itertools.count(1)
        self.fail_on_resets, self.fail_all = fail_on_resets or set(), fail_all
        self.made: list[FlakyEnv] = []

    def fails(self) -> bool:
        return self.fail_all or next(self.resets) in self.fail_on_resets

    def __call__(self) -> FlakyEnv:
        env = FlakyEnv(self.fails)
        self.made.append(env)
        return env


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
