"""The policy seam: token ids in, token ids (and their sampler log-probs) out.

Everything that samples actions for the agent loop — the in-process model (`LocalPolicy`), an
OpenAI-compatible server such as vLLM (`OpenAIPolicy`), or the `ScriptedPolicy` test double — speaks
this one protocol, so the loop and the trainer never know which one they are driving.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

# One sampling-parameter type for the whole project: the model's own generate() defines it.
from m2rl.model.generation import SamplingParams

FinishReason = Literal["stop", "length"]

__all__ = [
    "ChatPolicy", "FinishReason", "Policy", "PolicyError", "PolicyOutput", "PolicyRequestError",
    "PolicyResponseError", "PolicyUnavailableError", "SamplingParams", "validate_prompt_ids",
]


@dataclass(frozen=True)
class PolicyOutput:
    """One sampled segment.

    ids: the sampled token ids; when `finish_reason == "stop"` the last id is the stop token (EOS).
    logprobs: log pi(ids[i] | prompt, ids[:i]) for each sampled id, as the sampler computed it
        (the raw policy distribution at temperature 1, like vLLM's default `raw_logprobs` mode).
    policy_version: which weights produced the segment, so the learner can measure staleness.
    message: set only by a chat policy (`ChatPolicy`): the assistant message as the chat model wrote it
        (native tool calls with their ids); the loop keeps it as the turn's message view instead of parsing
        the ids back, so every call it made, valid or not, stays paired with its tool result.
    usage: the server's own token counts for this request (an OpenAI-compatible API's `usage`:
        prompt_tokens, completion_tokens, ...), where it reported them; what a hosted model bills.
    """

    ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    policy_version: int
    message: dict[str, Any] | None = None
    usage: dict[str, int] | None = None

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.logprobs):
            raise ValueError(f"PolicyOutput has {len(self.ids)} ids but {len(self.logprobs)} logprobs")
        if self.finish_reason not in ("stop", "length"):
            raise ValueError(f"finish_reason must be 'stop' or 'length', got {self.finish_reason!r}")


@runtime_checkable
class Policy(Protocol):
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> PolicyOutput: ...


@runtime_checkable
class ChatPolicy(Protocol):
    """A policy that reads the conversation as OpenAI chat messages instead of token ids (a hosted model
    behind native tool calls, `m2rl.agent.chat_adapter.ChatAgentPolicy`). The agent loop prefers
    `chat_turn` when a policy has it. Its output ids are our tokenization of the M2 text its reply stands
    for, with log-probs 0.0: such episodes are scored like any other but are never trained on
    (`Trajectory.chat_mode`)."""

    async def chat_turn(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                        params: SamplingParams, enable_thinking: bool) -> PolicyOutput: ...


class PolicyError(RuntimeError):
    """Base class of everything a policy raises on purpose."""


class PolicyRequestError(PolicyError):
    """The server rejected the request (4xx): retrying will not help. Names the status and the server's message."""

    def __init__(self, status: int, message: str, url: str = "") -> None:
        self.status = status
        self.server_message = message
        where = f" from {url}" if url else ""
        super().__init__(f"HTTP {status}{where}: {message}")


class PolicyUnavailableError(PolicyError):
    """The server could not be reached or kept failing (connection errors, 5xx) after every retry."""


class PolicyResponseError(PolicyError):
    """The server answered 200 but the body lacks what the protocol needs (e.g. token ids or log-probs)."""


def validate_prompt_ids(prompt_ids: list[int], vocab_size: int | None = None) -> list[int]:
    """Check a prompt is a non-empty list of in-range ints; returns it as a plain list of ints."""
    if not isinstance(prompt_ids, (list, tuple)) or len(prompt_ids) == 0:
        raise ValueError("prompt_ids must be a non-empty list of token ids")
    out: list[int] = []
    for i, t in enumerate(prompt_ids):
        # numbers.Integral admits numpy/torch integer scalars; bool is an int subclass but never a token.
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"prompt_ids[{i}] is {t!r}, not an int token id")
        t = int(t)
        if t < 0 or (vocab_size is not None and t >= vocab_size):
            raise ValueError(f"prompt_ids[{i}] = {t} is out of range [0, {vocab_size})")
        out.append(t)
    return out
