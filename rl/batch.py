"""The learner's input: right-padded token rows with per-token loss mask, generator log-probs, advantages.

`collate` builds one from per-sequence lists (e.g. a Trajectory's ids, loss_mask and sampler logprobs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class RolloutBatch:
    """Right-padded token rows. Position t of every [B, T] field refers to token x_t."""

    input_ids: Tensor  # [B, T] long
    loss_mask: Tensor  # [B, T] 1 on tokens the policy sampled
    old_logprobs: Tensor  # [B, T] the GENERATOR's log pi(x_t | x_<t) (0 off the loss mask)
    advantages: Tensor  # [B, T]
    attention_mask: Tensor | None = None  # [B, T] 1 on real tokens, then 0s; None: every position is real
    ref_logprobs: Tensor | None = None  # [B, T] for a KL penalty

    @classmethod
    def from_mapping(cls, data: Mapping[str, Tensor]) -> RolloutBatch:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown batch fields {sorted(unknown)}; expected some of {sorted(names)}")
        missing = [n for n in ("input_ids", "loss_mask", "old_logprobs", "advantages") if n not in data]
        if missing:
            raise ValueError(f"batch is missing {missing}")
        return cls(**data)

    def validate(self) -> None:
        if not isinstance(self.input_ids, Tensor) or self.input_ids.dim() != 2:
            raise ValueError("batch.input_ids must be a [batch, tokens] tensor")
        if self.input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"batch.input_ids must be integer token ids, got {self.input_ids.dtype}")
        shape = self.input_ids.shape
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (not isinstance(value, Tensor) or value.shape != shape):
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"batch.{f.name} has shape {got}, expected {tuple(shape)}")
        for name in ("old_logprobs", "advantages"):
            if not torch.isfinite(getattr(self, name)).all():
                raise ValueError(f"batch.{name} contains NaN or inf")
        if self.attention_mask is not None:
            attn = self.attention_mask.bool()
            # right padding: once a row has a 0, it stays 0 (lengths() and micro-batch trimming rely on it)
            if (attn[:, 1:] & ~attn[:, :-1]).any():
                raise ValueError("batch.attention_mask must be right-padded (1s then 0s in every row)")
            if (self.loss_mask.bool() & ~attn).any():
                raise ValueError("batch.loss_mask marks padding positions (attention_mask 0) as loss tokens")

    def lengths(self) -> list[int]:
        if self.attention_mask is None:
            return [self.input_ids.shape[1]] * self.input_ids.shape[0]
        return [int(x) for x in self.attention_mask.sum(dim=-1).tolist()]


def collate(
    ids: Sequence[Sequence[int]],
    loss_masks: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[float]],
    advantages: Sequence[float | Sequence[float]],
    pad_id: int = 0,
    ref_logprobs: Sequence[Sequence[float]] | None = None,
) -> RolloutBatch:
    """Right-pad sequences into a RolloutBatch. An advantage given as one float per sequence is put on
    that sequence's loss tokens; a list gives one value per token."""
    n = len(ids)
    if not n:
        raise ValueError("collate needs at least one sequence")
    for name, values in (("loss_masks", loss_masks), ("logprobs", logprobs), ("advantages", advantages)):
        if len(values) != n:
            raise ValueError(f"got {n} sequences but {len(values)} {name}")
    width = max(len(x) for x in ids)
    if width == 0:
        raise ValueError("all sequences are empty")
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(n, width, dtype=torch.long)
    attention = torch.zeros(n, width, dtype=torch.long)
    old = torch.zeros(n, width, dtype=torch.float32)
    adv = torch.zeros(n, width, dtype=torch.float32)
    ref = torch.zeros(n, width, dtype=torch.float32) if ref_logprobs is not None else None
    for i in range(n):
        length = len(ids[i])
        for name, values in (("loss_masks", loss_masks[i]), ("logprobs", logprobs[i])):
            if len(values) != length:
                raise ValueError(f"sequence {i}: {len(values)} {name} for {length} tokens")
        input_ids[i, :length] = torch.tensor(ids[i], dtype=torch.long)
        attention[i, :length] = 1
        loss_mask[i, :length] = torch.tensor(loss_masks[i], dtype=torch.long)
        old[i, :length] = torch.tensor(logprobs[i], dtype=torch.float32) * loss_mask[i, :length]
        a = advantages[i]
        if isinstance(a, (int, float)):
            adv[i, :length] = float(a) * loss_mask[i, :length]
        else:
            if len(a) != length:
                raise ValueError(f"sequence {i}: {len(a)} advantages for {length} tokens")
            adv[i, :length] = torch.tensor(a, dtype=torch.float32) * loss_mask[i, :length]
        if ref is not None:
            if len(ref_logprobs[i]) != length:
                raise ValueError(f"sequence {i}: {len(ref_logprobs[i])} ref_logprobs for {length} tokens")
            ref[i, :length] = torch.tensor(ref_logprobs[i], dtype=torch.float32)
    batch = RolloutBatch(input_ids, loss_mask, old, adv, attention_mask=attention, ref_logprobs=ref)
    batch.validate()
    return batch
