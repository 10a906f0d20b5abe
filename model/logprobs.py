"""Learner-side log-probabilities: log pi(x_t | x_<t) for every position, with gradients, in token chunks.

The [tokens x vocab] logits are never held at once: each chunk's logits are computed, reduced to a
log-prob (and entropy), and freed; torch.utils.checkpoint recomputes them chunk by chunk in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from m2rl.model.m2 import M2ForCausalLM
from torch.utils.checkpoint import checkpoint


def _chunk_logprobs(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                    fp32: bool, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    if fp32:
        logits_NV = F.linear(hidden_ND.float(), weight_VD.float())
    else:
        logits_NV = F.linear(hidden_ND, weight_VD).float()
    if temperature != 1.0:
        logits_NV = logits_NV / temperature
    lse_N = torch.logsumexp(logits_NV, dim=-1)
    logprob_N = logits_NV.gather(1, targets_N[:, None])[:, 0] - lse_N
    entropy_N = lse_N - (torch.softmax(logits_NV, dim=-1) * logits_NV).sum(-1)
    return logprob_N, entropy_N


def logprobs_from_hidden(hidden_BTD: torch.Tensor, lm_head_weight: torch.Tensor, input_ids: torch.Tensor,
                         chunk_size: int = 1024, lm_head_fp32: bool = True,
                         temperature: float = 1.0,
                         target_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs [B, T], entropy [B, T]) from final hidden states; position 0 is 0 in both.

    `target_mask` [B, T]: compute only positions where it is non-zero (others are 0). In RL only the
    sampled tokens need log-probs; skipping the prompt's positions skips most of the LM head's work.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    B, T, D = hidden_BTD.shape
    if target_mask is not None:
        if target_mask.shape != input_ids.shape:
            raise ValueError(f"target_mask shape {tuple(target_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        return _masked_logprobs_from_hidden(hidden_BTD, lm_head_weight, input_ids, chunk_size, lm_head_fp32,
                                            temperature, target_mask)
    h_ND = hidden_BTD[:, :-1].reshape(-1, D)
    targets_N = input_ids[:, 1:].reshape(-1)
    recompute = torch.is_grad_enabled() and (hidden_BTD.requires_grad or lm_head_weight.requires_grad)
    lps, ents = [], []
    for s in range(0, h_ND.shape[0], chunk_size):
        args = (h_ND[s:s + chunk_size], lm_head_weight, targets_N[s:s + chunk_size], lm_head_fp32, temperature)
        if recompute:
            lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logprobs(*args)
        lps.append(lp)
        ents.append(ent)
    zeros = torch.zeros(B, 1, dtype=torch.float32, device=hidden_BTD.device)
    if T == 1:
        return zeros, zeros.clone()
    logprobs = torch.cat([zeros, torch.cat(lps).view(B, T - 1)], dim=1)
    entropy = torch.cat([zeros, torch.cat(ents).view(B, T - 1)], dim=1)
    return logprobs, entropy


def _masked_logprobs_from_hidden(hidden_BTD: torch.Tensor, lm_head_weight: torch.Tensor, input_ids: torch.Tensor,
                                 chunk_size: int, lm_head_fp32: bool, temperature: float,
                                 target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, T, D = hidden_BTD.shape
    # position t's log-prob comes from the hidden state at t-1
    wanted_N = target_mask[:, 1:].reshape(-1).to(device=hidden_BTD.device).bool()
    rows_M = wanted_N.nonzero()[:, 0]
    h_MD = hidden_BTD[:, :-1].reshape(-1, D).index_select(0, rows_M)
    targets_M = input_ids[:, 1:].reshape(-1).index_select(0, rows_M.to(input_ids.device)).to(hidden_BTD.device)
    recompute = torch.is_grad_enabled() and (hidden_BTD.requires_grad or lm_head_weight.requires_grad)
    lps, ents = [], []
    for s in range(0, h_MD.shape[0], chunk_size):
        args = (h_MD[s:s + chunk_size], lm_head_weight, targets_M[s:s + chunk_size], lm_head_fp32, temperature)
        lp, ent = checkpoint(_chunk_logprobs, *args, use_reentrant=False) if recompute else _chunk_logprobs(*args)
        lps.append(lp)
        ents.append(ent)
    flat_lp = torch.zeros(B * (T - 1), dtype=torch.float32, device=hidden_BTD.device)
    flat_ent = torch.zeros_like(flat_lp)
    if lps:
        flat_lp = flat_lp.index_put((rows_M,), torch.cat(lps))
        flat_ent = flat_ent.index_put((rows_M,), torch.cat(ents))
    zeros = torch.zeros(B, 1, dtype=torch.float32, device=hidden_BTD.device)
    return (torch.cat([zeros, flat_lp.view(B, T - 1)], dim=1),
            torch.cat([zeros, flat_ent.view(B, T - 1)], dim=1))


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
                                             lm_head_fp32, temperature, target_mask=target_mask)
    if attention_mask is not None:
        keep = attention_mask.to(device=logprobs.device, dtype=torch.bool)
        logprobs, entropy = logprobs * keep, entropy * keep
    return (logprobs, entropy) if return_entropy else logprobs
