"""Learner-side log-probabilities: log pi(x_t | x_<t) for every position, with gradients, through the
`ops.linear_logprobs` op.

The [tokens x vocab] logits are never held at once: the torch implementation (CPU, and the fallback)
reduces chunks of rows to log-probs and recomputes each chunk's logits in backward (torch.utils.checkpoint);
the Triton one (CUDA default, m2rl/kernels/linear_logprob.py) tiles the vocabulary inside fused kernels for
few rows and runs cuBLAS GEMMs on row chunks with Triton row kernels for many; `chunked`
(model/linear_logprobs_chunked.py) is that chunk driver with torch passes.
"""

from __future__ import annotations

import torch
from m2rl.model import ops
from m2rl.model.m2 import M2ForCausalLM


def logprobs_from_hidden(hidden_BTD: torch.Tensor, lm_head_weight: torch.Tensor, input_ids: torch.Tensor,
                         chunk_size: int = 1024, lm_head_fp32: bool = True,
                         temperature: float = 1.0, target_mask: torch.Tensor | None = None,
                         return_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logprobs [B, T], entropy [B, T] or None without `return_entropy`) from final hidden states;
    position 0 is 0 in both.

    `target_mask` [B, T]: compute only positions where it is non-zero (others are 0). In RL only the
    sampled tokens need log-probs; skipping the prompt's positions skips most of the LM head's work.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    B, T, D = hidden_BTD.shape
    if target_mask is not None and target_mask.shape != input_ids.shape:
        raise ValueError(f"target_mask shape {tuple(target_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    # position t's log-prob comes from the hidden state at t-1
    h_ND = hidden_BTD[:, :-1].reshape(-1, D)
    targets_N = input_ids[:, 1:].reshape(-1)
    rows_M = None
    if target_mask is not None:
        rows_M = target_mask[:, 1:].reshape(-1).to(device=hidden_BTD.device).bool().nonzero()[:, 0]
        h_ND = h_ND.index_select(0, rows_M)
        targets_N = targets_N.index_select(0, rows_M.to(input_ids.device))
    lp_N, ent_N = ops.linear_logprobs(h_ND, lm_head_weight, targets_N.to(hidden_BTD.device), return_entropy,
                                      fp32_logits=lm_head_fp32, temperature=temperature, chunk_size=chunk_size)
    logprobs = _to_positions(lp_N, rows_M, B, T)
    return logprobs, _to_positions(ent_N, rows_M, B, T) if return_entropy else None


def _to_positions(values_N: torch.Tensor, rows_M: torch.Tensor | None, B: int, T: int) -> torch.Tensor:
    """[B, T] with a 0 column first and `values_N` at positions 1.. (only at `rows_M` of them, if given)."""
    zeros = torch.zeros(B, 1, dtype=torch.float32, device=values_N.device)
    if T == 1:
        return zeros
    if rows_M is not None:
        flat = torch.zeros(B * (T - 1), dtype=torch.float32, device=values_N.device)
        values_N = flat.index_put((rows_M,), values_N) if rows_M.numel() else flat
    return torch.cat([zeros, values_N.view(B, T - 1)], dim=1)


def token_logprobs(model: M2ForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                   return_entropy: bool = False, chunk_size: int = 1024, lm_head_fp32: bool = True,
                   temperature: float = 1.0,
                   target_mask: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log pi(x_t | x_<t) [B, T] (fp32, position 0 and padding positions are 0), optionally with the
    entropy of each predicting distribution. Differentiable w.r.t. the model's parameters.
    With `target_mask`, only positions where it is non-zero are computed (the rest are 0)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    hidden = model.hidden_states(input_ids, attention_mask=attention_mask)
    logprobs, entropy = logprobs_from_hidden(hidden, model.lm_head.weight, input_ids, chunk_size,
                                             lm_head_fp32, temperature, target_mask=target_mask,
                                             return_entropy=return_entropy)
    if attention_mask is not None:
        keep = attention_mask.to(device=logprobs.device, dtype=torch.bool)
        logprobs = logprobs * keep
        entropy = entropy * keep if return_entropy else None
    return (logprobs, entropy) if return_entropy else logprobs
