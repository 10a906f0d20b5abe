"""Sampling seeds of an evaluation: a function of what is sampled, never of when or beside what.

An episode's seed is a hash of (task id, sample index, eval seed), and each of its turns samples with a
hash of (episode seed, turn index). The turns of one episode run one after the other, so the turn index
is fixed too; neither the batch a request lands in nor the order in which episodes finish enters. Every
backend takes a per-request seed: LocalPolicy runs a seeded request in a batch of its own, `m2rl serve`
gives it its own generator, vLLM and OpenAI-compatible APIs take the `seed` field (a hosted API may only
promise best effort).

Seeds stay below 2^31: the range every backend accepts (some APIs read the field as int32).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Awaitable
from typing import Any

from m2rl.agent.policy import Policy, PolicyOutput, SamplingParams

SEED_RANGE = 2**31


def stable_hash(*parts: object) -> int:
    """A hash of `parts` that is the same in every process (Python's hash() of a str is salted per process)."""
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % SEED_RANGE


def episode_seed(task_id: str, sample: int, seed: int) -> int:
    """The sampling seed of sample `sample` of `task_id` in an eval seeded with `seed`."""
    return stable_hash("episode", task_id, sample, seed)


def turn_seed(episode: int, turn: int) -> int:
    return stable_hash("turn", episode, turn)


class SeededPolicy:
    """One episode's view of a shared policy: each request carries the seed of its turn.

    It also keeps the first error the policy raised (`failure`), so the runner can tell a dead server, which
    must stop the eval, from a failing sandbox, which only fails its episode."""

    def __init__(self, policy: Policy, seed: int) -> None:
        self.policy, self.seed = policy, seed
        self.turn = 0
        self.failure: BaseException | None = None
        self.usage: Counter[str] = Counter()  # the server's token counts over this episode's requests

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> PolicyOutput:
        return await self.watched(self.policy.generate(prompt_ids, self.seeded(params)))

    def seeded(self, params: SamplingParams) -> SamplingParams:
        """`params` with this turn's seed; the next call is the next turn."""
        seeded = dataclasses.replace(params, seed=turn_seed(self.seed, self.turn))
        self.turn += 1
        return seeded

    async def watched(self, request: Awaitable[PolicyOutput]) -> PolicyOutput:
        try:
            out = await request
        except Exception as exc:
            self.failure = self.failure or exc
            raise
        if out.usage:
            self.usage.update(out.usage)
        return out


class SeededChatPolicy(SeededPolicy):
    """The same for a chat policy (agent/chat_adapter.py): the agent loop asks it with the message view."""

    async def chat_turn(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                        params: SamplingParams, enable_thinking: bool) -> PolicyOutput:
        chat: Any = self.policy
        return await self.watched(chat.chat_turn(messages, tools, self.seeded(params), enable_thinking))


def seeded_policy(policy: Policy, seed: int) -> SeededPolicy:
    """One episode's seeded view of `policy`; a chat policy (agent/policy.py: ChatPolicy, recognised as the agent
    loop does, by its `chat_turn`) keeps it."""
    return SeededChatPolicy(policy, seed) if hasattr(policy, "chat_turn") else SeededPolicy(policy, seed)
