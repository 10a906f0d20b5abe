"""Packed learner batches: rows of a RolloutBatch laid end to end in one row, no padding computed.

    pack(batch, rows)                 -> PackedBatch: input_ids [1, N], cu_seqlens [S+1], per-token fields [1, N]
    packed_token_logprobs(model, p)   -> log pi(x_t | x_<t) [1, N], 0 at every segment's first token
    unpack(values_1N, p, width)       -> [S, width], right-padded with 0 like the batch rows

The M2 model attends causally within each segment and restarts positions at 0 (`cu_seqlens`, see
M2ForCausalLM.hidden_states), so a packed row computes exactly what the padded rows did, minus the padding.
The learner unpacks the log-probs to [S, width] before the loss, so the loss and its normalisation see the
same tensors with or without packing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from m2rl.model.logprobs import logprobs_from_hidden
from m2rl.model.m2 import M2ForCausalLM
from m2rl.rl.batch import RolloutBatch
from torch import Tensor, nn


@dataclass
class PackedBatch:
    """Rows `rows` of a RolloutBatch, each cut to its real length and concatenated: N = sum(lengths).

    Segment s is batch row rows[s], packed tokens [cu_seqlens[s], cu_seqlens[s+1])."""

    input_ids: Tensor  # [1, N]
    cu_seqlens: Tensor  # [S+1] int32: 0, end of segment 0, ..., N
    loss_mask: Tensor  # [1, N]
    old_logprobs: Tensor  # [1, N] the generator's log-probs
    advantages: Tensor  # [1, N]
    ref_logprobs: Tensor | None  # [1, N] or None
    rows: list[int]  # the batch row of each segment
    lengths: list[int]  # real tokens of each segment (a row may have 0)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    def segment_starts(self) -> Tensor:
        """[1, N] bool: True at the first token of every segment (nothing in its segment predicts it)."""
        starts = torch.zeros(self.input_ids.shape, dtype=torch.bool, device=self.input_ids.device)
        first = self.cu_seqlens[:-1][torch.tensor(self.lengths, device=self.cu_seqlens.device) > 0]
        starts[0, first.long().to(starts.device)] = True
        return starts


def _flat_index(lengths: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
    """(segment, column) [N] of every packed token: packed token n is row segment[n], position column[n]."""
    lengths_t = torch.tensor(lengths, device=device)
    total = sum(lengths)
    segment_N = torch.repeat_interleave(torch.arange(len(lengths), device=device), lengths_t, output_size=total)
    starts = torch.cumsum(lengths_t, 0) - lengths_t
    column_N = torch.arange(total, device=device) - starts[segment_N]
    return segment_N, column_N


def pack(batch: RolloutBatch, rows: list[int]) -> PackedBatch:
    """Concatenate the real tokens of batch rows `rows` (right padding dropped) into one row."""
    if not rows:
        raise ValueError("pack needs at least one row")
    all_lengths = batch.lengths()
    lengths = [all_lengths[r] for r in rows]
    device = batch.input_ids.device
    segment_N, column_N = _flat_index(lengths, device)
    row_N = torch.tensor(rows, device=device)[segment_N]

    def take(field: Tensor | None) -> Tensor | None:
        return None if field is None else field[row_N, column_N][None]

    cu_seqlens = torch.zeros(len(rows) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(lengths).cumsum(0)
    return PackedBatch(
        input_ids=take(batch.input_ids),
        cu_seqlens=cu_seqlens.to(device),
        loss_mask=take(batch.loss_mask),
        old_logprobs=take(batch.old_logprobs),
        advantages=take(batch.advantages),
        ref_logprobs=take(batch.ref_logprobs),
        rows=list(rows),
        lengths=lengths,
    )


def unpack(values_1N: Tensor, packed: PackedBatch, width: int | None = None) -> Tensor:
    """[S, width] (default: the longest segment): segment s in row s, right-padded with 0. Differentiable."""
    width = max(packed.lengths) if width is None else width
    if width < max(packed.lengths):
        raise ValueError(f"width {width} is shorter than the longest segment ({max(packed.lengths)} tokens)")
    segment_N, column_N = _flat_index(packed.lengths, values_1N.device)
    out = values_1N.new_zeros(len(packed.lengths), width)
    return out.index_put((segment_N, column_N), values_1N[0])


def supports_packing(model: nn.Module) -> bool:
    """Packed forwards need the M2 model's `cu_seqlens` attention; other models take the padded path."""
    return isinstance(model, M2ForCausalLM)


def packed_token_logprobs(
    model: M2ForCausalLM,
    packed: PackedBatch,
    return_entropy: bool = False,
    chunk_size: int = 1024,
    lm_head_fp32: bool = True,
    temperature: float = 1.0,
    target_mask: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """log pi(x_t | x_<t) [1, N] (fp32) of a packed batch, optionally with the entropy [1, N].

    0 at the first token of each segment (the hidden state before it belongs to the previous segment) and,
    with `target_mask` [1, N], wherever it is 0 (the LM head skips those positions)."""
    if packed.num_tokens == 0:
        raise ValueError("the packed batch has no tokens")
    hidden = model.hidden_states(packed.input_ids, cu_seqlens=packed.cu_seqlens)
    target = ~packed.segment_starts()
    if target_mask is not None:
        target &= target_mask.to(device=target.device, dtype=torch.bool)
    logprobs, entropy = logprobs_from_hidden(hidden, model.lm_head.weight, packed.input_ids, chunk_size=chunk_size,
                                             lm_head_fp32=lm_head_fp32, temperature=temperature, target_mask=target,
                                             return_entropy=return_entropy)
    if return_entropy:
        return logprobs, entropy
    return logprobs
