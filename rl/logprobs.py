"""Per-token log-probs of a policy, as the learner needs them.

An M2 model goes through `m2rl.model.logprobs.token_logprobs` (chunked LM head, fp32 head option, never
the full [B*T, V] logits). Any other causal LM module whose forward maps input_ids [B, T] to logits
[B, T, V] (or an object with `.logits`) takes the generic path below.

Convention (both paths): out[:, t] = log pi(x_t | x_<t), out[:, 0] = 0 (nothing predicts the first token).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _m2_token_logprobs() -> Callable | None:
    try:
        from m2rl.model.logprobs import token_logprobs
    except ImportError:
        return None
    return token_logprobs


def _is_m2_model(model: nn.Module) -> bool:
    try:
        from m2rl.model import M2ForCausalLM
    except ImportError:
        return False
    return isinstance(model, M2ForCausalLM)


def generic_token_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    return_entropy: bool = False,
    chunk_size: int = 1024,
    lm_head_fp32: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """log_softmax over `model(input_ids)` logits; the softmax runs in fp32 when `lm_head_fp32`.

    The logits come from the model whole; only the softmax is chunked over time (the M2 path also
    chunks the head matmul). attention_mask is not passed: with right padding a causal model's real
    positions do not see the padding.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
    out = model(input_ids)
    logits = out.logits if hasattr(out, "logits") else out
    if not isinstance(logits, Tensor) or logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"model must return logits [B, T, V] for input_ids {tuple(input_ids.shape)}, got {shape}"
        )
    batch, length = input_ids.shape
    # fp32 at least (fp64 test models keep fp64); without lm_head_fp32 the logits' own dtype is used
    dtype = torch.promote_types(logits.dtype, torch.float32) if lm_head_fp32 else logits.dtype
    zeros = logits.new_zeros((batch, 1), dtype=dtype)
    lp_parts: list[Tensor] = [zeros]
    ent_parts: list[Tensor] = [zeros]
    targets = input_ids[:, 1:]
    # position t-1's logits predict token t
    for start in range(0, length - 1, max(1, chunk_size)):
        end = min(length - 1, start + max(1, chunk_size))
        log_p = F.log_softmax(logits[:, start:end].to(dtype), dim=-1)  # [B, c, V]
        lp_parts.append(log_p.gather(-1, targets[:, start:end].unsqueeze(-1)).squeeze(-1))
        if return_entropy:
            ent_parts.append(-(log_p.exp() * log_p).sum(-1))
    logprobs = torch.cat(lp_parts, dim=1)
    if not return_entropy:
        return logprobs
    return logprobs, torch.cat(ent_parts, dim=1)


def policy_token_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    return_entropy: bool = False,
    chunk_size: int = 1024,
    lm_head_fp32: bool = True,
    target_mask: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Dispatch to the M2 chunked implementation for M2 models, the generic one otherwise.

    `target_mask` (e.g. the loss mask) lets the M2 path skip the LM head on positions nobody needs;
    the generic path computes everything and the caller masks."""
    fn = _m2_token_logprobs() if _is_m2_model(model) else None
    kwargs = dict(attention_mask=attention_mask, return_entropy=return_entropy, chunk_size=chunk_size,
                  lm_head_fp32=lm_head_fp32)
    if fn is None:
        return generic_token_logprobs(model, input_ids, **kwargs)
    return fn(model, input_ids, target_mask=target_mask, **kwargs)
