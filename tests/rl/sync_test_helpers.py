"""Shared by the weight-sync tests: a fixed greedy probe request and a stand-in for a learner update."""

from __future__ import annotations

import asyncio

import torch
from m2rl.agent.policy import SamplingParams
from m2rl.model import M2Tokenizer
from m2rl.rl.weight_sync import PolicyBackend
from torch import nn

TOK = M2Tokenizer.tiny()
PROMPT = TOK.encode("]~!b[]~b]user\nWhat is 2 + 3?[e~[\n]~b]ai\n<think>\n")
GREEDY = SamplingParams(max_tokens=12, greedy=True)


def learn(model: nn.Module, seed: int = 1) -> None:
    """Move every weight a little, as an optimizer step would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


def generate(backend: PolicyBackend) -> tuple[list[int], list[float], int]:
    """The backend's greedy answer to PROMPT: (ids, log-probs, policy version)."""

    async def main():
        try:
            return await backend.policy.generate(PROMPT, GREEDY)
        finally:
            await backend.policy.aclose()

    out = asyncio.run(main())
    return out.ids, out.logprobs, out.policy_version
