"""Pure sampling math over a batch of logits: temperature, top-k, top-p, and the sample itself.

All functions take fp32 logits [B, V]. The sampling distribution is softmax(filter(logits / T)); the
log-probability we report for a sampled id is taken under exactly that distribution.
"""

from __future__ import annotations

import torch


def top_k_filter(logits_BV: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept too); others -> -inf."""
    if k <= 0 or k >= logits_BV.shape[-1]:
        return logits_BV
    kth = torch.topk(logits_BV, k, dim=-1).values[..., -1:]
    return logits_BV.masked_fill(logits_BV < kth, float("-inf"))


def top_p_filter(logits_BV: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits_BV
    sorted_logits, order = torch.sort(logits_BV, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the strictly more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits_BV.masked_fill(drop, float("-inf"))


def sampling_logits(logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Logits of the distribution we sample from (top-k then top-p, as vLLM orders them)."""
    scaled = logits_BV.float() / temperature
    return top_p_filter(top_k_filter(scaled, top_k), top_p)


def sample_from_logits(logits_BV: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row ~ softmax(logits). The exponential race argmax(p / E), E ~ Exp(1), samples exactly
    from p without a host sync or a cumulative sum (gpt-fast)."""
    probs = torch.softmax(logits_BV.float(), dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return torch.argmax(probs / race, dim=-1)
