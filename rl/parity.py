"""Generator-vs-learner parity: is the generator really sampling from the learner's weights?

Two measurements of the same quantity, log pi(x_t | x_<t), taken on the two copies of the policy:

- the **parity probe**, after every weight sync: the log-probs of one fixed probe sequence, teacher-forced
  through the generator (its in-process model, or a server's `prompt_logprobs`) and through the learner
  (`rl/logprobs.py`, the code the loss uses). A max |difference| above the tolerance means the sync did
  not deliver these weights (a corrupted or partial transfer, a wrong checkpoint, a stale server), and
  `rl/weight_sync.py` rejects it. Measured on the tiny SFT policy (model/assets/tiny-python-sft): a generator
  one AdamW step (lr 5e-4) stale differs by up to ~9, one whose MoE experts alone are stale by ~2; rounding
  the weights to bfloat16 moves it by ~0.15, to float16 by ~0.01; fp32 kernels differ by ~1e-5.
- the **log-prob gap** on the training batch: the log-probs the generator reported while sampling vs the
  learner's before its update. This is the train-inference mismatch (different kernels, KV-cache decode vs
  full forward, precision, MoE routing flips) that CISPO's importance weights and truncated IS correct for.

The probe is a fixed M2 tool-use exchange in the run's tokenizer (tokens the policy really sees: on random
tokens a trained policy's log-probs are extreme and precision differences are magnified ~5x), or for a
model without a tokenizer a seeded random sequence; every sync of a run, and a resumed run, probes the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from m2rl.agent.render import render_ids
from m2rl.rl.batch import RolloutBatch
from m2rl.rl.interrupts import run_async
from m2rl.rl.logprobs import policy_token_logprobs
from torch import Tensor, nn

if TYPE_CHECKING:
    from m2rl.agent.openai_policy import OpenAIPolicy
    from m2rl.model.tokenizer import M2Tokenizer
    from m2rl.rl.learner import Learner

PROBE_TOKENS = 64  # the random probe: long enough to reach many experts in every layer, cheap on any model
PROBE_MESSAGES = [  # one tool call, its result and the answer: the turn structure rollouts produce
    {"role": "system", "content": "You are a helpful assistant with a Python tool."},
    {"role": "user", "content": "What is 37 * 41 + 12? Use the python tool, then submit the answer."},
    {"role": "assistant", "reasoning_content": "I will compute it with Python.", "content": "",
     "tool_calls": [{"type": "function", "function": {"name": "python", "arguments": {"code": "print(37 * 41 + 12)"}}}]},
    {"role": "tool", "content": "1529"},
    {"role": "assistant", "content": "The answer is 1529.",
     "tool_calls": [{"type": "function", "function": {"name": "submit", "arguments": {"answer": "1529"}}}]},
]


def probe_ids(vocab_size: int, length: int = PROBE_TOKENS, seed: int = 0) -> list[int]:
    """A fixed pseudo-random token sequence, for a model without a tokenizer."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


def text_probe_ids(tokenizer: M2Tokenizer) -> list[int]:
    """PROBE_MESSAGES rendered in the M2 format and tokenized (~150 tokens with the tiny tokenizer)."""
    return render_ids(tokenizer, PROBE_MESSAGES)


class GeneratorLogprobs(Protocol):
    """The generator's side of the probe: log pi(ids[t] | ids[:t]) for t = 1 .. len(ids)-1."""

    def __call__(self, ids: list[int]) -> list[float]: ...


@torch.no_grad()
def model_logprobs(model: nn.Module, ids: list[int]) -> list[float]:
    """Teacher-forced log-probs of ids[1:] through `model` (the learner's code path, fp32 LM head)."""
    device = next(model.parameters()).device
    logprobs = policy_token_logprobs(model, torch.tensor([ids], device=device))
    assert isinstance(logprobs, Tensor)
    return logprobs[0, 1:].double().tolist()


class ModelLogprobs:
    """An in-process generator (LocalPolicy's model copy)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, ids: list[int]) -> list[float]:
        return model_logprobs(self.model, ids)


class ServerLogprobs:
    """A served generator: `/v1/completions` with vLLM's `prompt_logprobs` (OpenAIPolicy.prompt_logprobs)."""

    def __init__(self, policy: OpenAIPolicy) -> None:
        self.policy = policy

    def __call__(self, ids: list[int]) -> list[float]:
        async def probe() -> list[float]:
            try:
                return await self.policy.prompt_logprobs(ids)
            finally:
                await self.policy.aclose()  # its HTTP client belongs to this event loop

        return run_async(probe())


@dataclass(frozen=True)
class ParityResult:
    """max_abs_diff / mean_abs_diff: |generator - learner| over the probe's positions; passed: max <= tolerance."""

    max_abs_diff: float
    mean_abs_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance  # NaN fails: a NaN log-prob is no parity


def compare_logprobs(generator: list[float], learner: list[float], tolerance: float) -> ParityResult:
    if len(generator) != len(learner):
        raise ValueError(f"the generator gave {len(generator)} log-probs, the learner {len(learner)}")
    diff = (torch.tensor(generator, dtype=torch.float64) - torch.tensor(learner, dtype=torch.float64)).abs()
    if not len(diff):
        return ParityResult(0.0, 0.0, tolerance)
    max_diff = math.nan if diff.isnan().any() else float(diff.max())
    return ParityResult(max_diff, float(diff.nanmean()), tolerance)


@dataclass
class ParityProbe:
    """Probe `generator` against `learner` on `ids` (default: `probe_ids` of the learner's vocabulary)."""

    tolerance: float
    ids: list[int]

    @classmethod
    def for_model(cls, model: nn.Module, tolerance: float, tokenizer: M2Tokenizer | None = None) -> ParityProbe:
        if tokenizer is not None:
            return cls(tolerance, text_probe_ids(tokenizer))
        vocab_size = int(cast(Any, model).config.vocab_size)  # any causal LM with an HF-style config
        return cls(tolerance, probe_ids(vocab_size))

    def check(self, learner: nn.Module, generator: GeneratorLogprobs) -> ParityResult:
        return compare_logprobs(generator(self.ids), model_logprobs(learner, self.ids), self.tolerance)


def logprob_gap(generator_logprobs: Tensor, learner_logprobs: Tensor, mask: Tensor) -> dict[str, float]:
    """`rollout/logprob_gap_mean` and `_max`: |generator - learner| log-prob over the sampled tokens (mask 1)."""
    keep = mask.bool()
    gap = (generator_logprobs.float() - learner_logprobs.float()).abs()[keep]
    if not gap.numel():
        return {}
    return {"rollout/logprob_gap_mean": float(gap.mean()), "rollout/logprob_gap_max": float(gap.max())}


def batch_logprob_gap(learner: Learner, batch: RolloutBatch) -> dict[str, float]:
    """`logprob_gap` of a training batch: the log-probs the generator sampled with vs the learner's (no grad),
    taken before the learner's update. An extra forward pass when the learner also recomputes pi_old: its
    `learner/logp_gap_gen_learner` is the same mean, but the max needs the per-token values."""
    on_device = RolloutBatch(**{f.name: None if (value := getattr(batch, f.name)) is None else value.to(learner.device)
                                for f in fields(batch)})
    learner_logprobs = learner.recompute_logprobs(on_device).cpu()
    return logprob_gap(batch.old_logprobs, learner_logprobs, batch.loss_mask)
