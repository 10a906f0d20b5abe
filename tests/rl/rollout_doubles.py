"""Test doubles of the rollout tests: real `ToolEnv`s without a sandbox (backend=None) whose `reset` can be made
to fail and whose steps can take time, and scripted policies (one with random latencies and a version the test
bumps, as `LocalPolicy.update_weights` does)."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable
from typing import Any

from m2rl.agent.format import render_completion
from m2rl.agent.loop import LoopConfig
from m2rl.agent.policy import PolicyOutput, SamplingParams
from m2rl.envs import Task, TaskSet, ToolEnv, ToolOutput
from m2rl.model import M2Tokenizer
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


def first_turn(prompt_ids: list[int]) -> bool:
    return "<response>" not in TOK.decode(prompt_ids)


class ShellThenSubmit:
    """A policy double: first turn of an episode runs `command`, the next one submits 9."""

    policy_version = 0

    def __init__(self, command: str = "echo hi") -> None:
        self.command = command

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> PolicyOutput:
        text = turn("shell", command=self.command) if first_turn(prompt_ids) else turn("submit", answer="9")
        ids = TOK.encode(text)
        return PolicyOutput(ids=ids, logprobs=[-0.1] * len(ids), finish_reason="stop",
                            policy_version=self.policy_version)


class LatencyPolicy(ShellThenSubmit):
    """ShellThenSubmit taking a seeded random time per request; each output carries the version read when the
    request starts (as LocalPolicy reads it under its weights lock). `calls` counts requests."""

    def __init__(self, seed: int = 0, max_delay_s: float = 0.01) -> None:
        super().__init__()
        self.rng, self.max_delay_s = random.Random(seed), max_delay_s
        self.calls = 0

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> PolicyOutput:
        self.calls += 1
        version = self.policy_version
        await asyncio.sleep(self.rng.uniform(0, self.max_delay_s))
        out = await super().generate(prompt_ids, params)
        return PolicyOutput(out.ids, out.logprobs, out.finish_reason, version)


class FlakyEnv(ToolEnv):
    """A ToolEnv whose reset raises when `fails()` says so (a sandbox that cannot be reset), and whose steps
    take `step_delay()` seconds (a tool call's latency)."""

    def __init__(self, fails: Any, step_delay: Callable[[], float] = lambda: 0.0) -> None:
        super().__init__(SumTasks(), lambda env: [shell, submit], backend=None)
        self.fails, self.step_delay = fails, step_delay
        self.closed = False

    def reset(self, **kwargs: Any) -> Any:
        if self.fails():
            raise SandboxError("sandbox reset failed: RecursionError")
        return super().reset(**kwargs)

    def step(self, action: str) -> Any:
        time.sleep(self.step_delay())
        return super().step(action)

    def close(self) -> None:
        self.closed = True
        super().close()


class EnvFactory:
    def __init__(self, fail_on_resets: set[int] | None = None, fail_all: bool = False,
                 step_delay: Callable[[], float] = lambda: 0.0) -> None:
        self.resets = itertools.count(1)
        self.fail_on_resets, self.fail_all, self.step_delay = fail_on_resets or set(), fail_all, step_delay
        self.made: list[FlakyEnv] = []

    def fails(self) -> bool:
        return self.fail_all or next(self.resets) in self.fail_on_resets

    def __call__(self) -> FlakyEnv:
        env = FlakyEnv(self.fails, self.step_delay)
        self.made.append(env)
        return env
