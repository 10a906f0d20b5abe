"""Test double: a tiny causal LM (any module mapping input_ids [B, T] to logits [B, T, V]) and batch builders."""

from __future__ import annotations

import torch
from m2rl.rl.learner import RolloutBatch
from torch import nn


class TinyCausalLM(nn.Module):
    """Position t sees tokens <= t only: its own embedding plus the running mean of the prefix."""

    def __init__(self, vocab_size: int = 13, dim: int = 8, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, dtype=dtype)
        self.mix = nn.Linear(dim, dim, dtype=dtype)
        self.lm_head = nn.Linear(dim, vocab_size, dtype=dtype)
        self.gradient_checkpointing = False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)  # [B, T, D]
        steps = torch.arange(1, input_ids.shape[1] + 1, device=h.device, dtype=h.dtype)
        prefix_mean = h.cumsum(dim=1) / steps[None, :, None]
        return self.lm_head(torch.tanh(self.mix(prefix_mean)) + h)  # [B, T, V]


def random_batch(
    generator: torch.Generator | None = None,
    rows: int = 6,
    max_len: int = 12,
    vocab_size: int = 13,
    prompt_len: int = 3,
) -> RolloutBatch:
    """Right-padded rows of different lengths; the tokens after the prompt are 'sampled' (loss tokens)."""
    g = generator
    lengths = torch.randint(prompt_len + 1, max_len + 1, (rows,), generator=g)
    ids = torch.randint(0, vocab_size, (rows, max_len), generator=g)
    positions = torch.arange(max_len)[None, :]
    attention = (positions < lengths[:, None]).long()
    loss_mask = attention * (positions >= prompt_len).long()
    ids = torch.where(attention.bool(), ids, torch.zeros_like(ids))
    old = (-torch.rand(rows, max_len, generator=g, dtype=torch.float64) * 3) * loss_mask
    seq_adv = torch.randn(rows, generator=g, dtype=torch.float64)
    return RolloutBatch(
        input_ids=ids,
        loss_mask=loss_mask,
        old_logprobs=old,
        advantages=seq_adv[:, None] * loss_mask,
        attention_mask=attention,
    )
