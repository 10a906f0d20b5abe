"""M2's sigmoid router in Triton: scores, biased top-k and renormalised weights in one pass over the logits.

PyTorch reference: `m2rl.model.router.route` (registered as `ops.route_torch`), for each token row

    s = sigmoid(logits)                                  # fp32
    experts = topk(s + bias, k)                          # the bias only chooses
    w = s[experts] / sum(s[experts])                     # unbiased scores, renormalised

Forward: each program takes ROWS token rows of E logits (E <= 512: one block of registers per row), and
finds the top k by k rounds of max-and-mask: the largest biased score, the lowest expert index holding it
(ties go to the lower index; torch.topk leaves tie order unspecified, and ties have probability zero on
real logits), its unbiased score, then that expert masked to -inf. Expert ids come out in descending order
of biased score (torch.topk(sorted=False) promises no order; compare sets). The weights are each picked
score over the picked scores' sum, all in fp32.

Backward (torch, [T, K] work): the expert ids carry no gradient; with S = sum of the picked scores and
g the weights' gradient, dL/ds_k = (g_k - sum_j g_j w_j) / S, dL/dlogit_k = dL/ds_k * s_k (1 - s_k),
scattered into zeros [T, E] (only the chosen experts' logits get gradient, as through the reference).

softmax scoring runs the reference. Bandwidth-bound, nothing syncs with the host (CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from m2rl.model import ops, router

MAX_EXPERTS = 512
"""Most experts a row may have: every row of logits sits in registers during the k rounds."""


def bytes_moved(tokens: int, num_experts: int, top_k: int) -> int:
    """Least HBM traffic of the forward: fp32 logits read, the fp32 bias read once, fp32 weights and
    int64 expert ids written."""
    return tokens * num_experts * 4 + num_experts * 4 + tokens * top_k * (4 + 8)


@triton.jit
def _sigmoid_topk_kernel(
    logits_ptr, bias_ptr, weights_ptr, experts_ptr,
    tokens, num_experts,
    stride_logits_t, stride_weights_t, stride_experts_t,
    HAS_BIAS: tl.constexpr, TOP_K: tl.constexpr, ROWS: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < tokens
    offs_e = tl.arange(0, BLOCK_E)
    e_mask = offs_e < num_experts
    mask = row_mask[:, None] & e_mask[None, :]
    logits = tl.load(logits_ptr + rows[:, None] * stride_logits_t + offs_e[None, :], mask=mask, other=0.0)
    scores = tl.sigmoid(logits.to(tl.float32))                                          # [ROWS, E]
    choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + offs_e, mask=e_mask, other=0.0).to(tl.float32)[None, :]
    choice = tl.where(e_mask[None, :], choice, float("-inf"))

    offs_k = tl.arange(0, BLOCK_K)
    experts = tl.zeros((ROWS, BLOCK_K), dtype=tl.int32)
    picked = tl.zeros((ROWS, BLOCK_K), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        best = tl.max(choice, axis=1)
        # the lowest expert index among those holding the maximum: a deterministic tie-break
        expert = tl.min(tl.where(choice == best[:, None], offs_e[None, :], BLOCK_E), axis=1)
        is_expert = offs_e[None, :] == expert[:, None]
        score = tl.sum(tl.where(is_expert, scores, 0.0), axis=1)
        experts = tl.where(offs_k[None, :] == k, expert[:, None], experts)
        picked = tl.where(offs_k[None, :] == k, score[:, None], picked)
        choice = tl.where(is_expert, float("-inf"), choice)

    weights = picked / tl.sum(picked, axis=1)[:, None]
    out_mask = row_mask[:, None] & (offs_k[None, :] < TOP_K)
    tl.store(weights_ptr + rows[:, None] * stride_weights_t + offs_k[None, :], weights, mask=out_mask)
    tl.store(experts_ptr + rows[:, None] * stride_experts_t + offs_k[None, :], experts.to(tl.int64), mask=out_mask)


def sigmoid_topk(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward alone (no autograd): (weights_TK fp32, experts_TK int64) of fp32 logits [T, E]."""
    T, E = logits_TE.shape
    assert logits_TE.dtype == torch.float32 and logits_TE.stride(-1) == 1, "fp32 logits with unit stride along E"
    assert 0 < k <= E <= MAX_EXPERTS, f"need 0 < k <= E <= {MAX_EXPERTS}, got k={k}, E={E}"
    weights_TK = torch.empty(T, k, dtype=torch.float32, device=logits_TE.device)
    experts_TK = torch.empty(T, k, dtype=torch.int64, device=logits_TE.device)
    if T == 0:
        return weights_TK, experts_TK
    block_e = triton.next_power_of_2(E)
    rows = max(1, min(16, 1024 // block_e))  # ~1K logits per program: 4 rows of M2's 256 experts
    bias = logits_TE if bias_E is None else bias_E.float().contiguous()  # any pointer when there is none
    _sigmoid_topk_kernel[(triton.cdiv(T, rows),)](
        logits_TE, bias, weights_TK, experts_TK, T, E,
        logits_TE.stride(0), weights_TK.stride(0), experts_TK.stride(0),
        HAS_BIAS=bias_E is not None, TOP_K=k, ROWS=rows, BLOCK_E=block_e, BLOCK_K=max(2, triton.next_power_of_2(k)),
        num_warps=4,
    )
    return weights_TK, experts_TK


class _SigmoidRoute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE: torch.Tensor, bias_E: torch.Tensor | None, k: int):  # type: ignore[override]
        weights_TK, experts_TK = sigmoid_topk(logits_TE, bias_E, k)
        ctx.mark_non_differentiable(experts_TK)
        ctx.save_for_backward(logits_TE, weights_TK, experts_TK)
        return weights_TK, experts_TK

    @staticmethod
    def backward(ctx, grad_weights_TK: torch.Tensor, _grad_experts: torch.Tensor | None):  # type: ignore[override]
        logits_TE, weights_TK, experts_TK = ctx.saved_tensors
        scores_TK = torch.sigmoid(logits_TE.gather(1, experts_TK))
        grad_scores_TK = ((grad_weights_TK - (grad_weights_TK * weights_TK).sum(-1, keepdim=True))
                          / scores_TK.sum(-1, keepdim=True))
        grad_logits_TE = torch.zeros_like(logits_TE)
        grad_logits_TE.scatter_(1, experts_TK, grad_scores_TK * scores_TK * (1 - scores_TK))
        return grad_logits_TE, None, None


# Without a GPU the tests run this module under TRITON_INTERPRET=1 (tests/kernels/conftest.py).
_INTERPRETED = not isinstance(_sigmoid_topk_kernel, triton.runtime.JITFunction)


def route(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, k: int,
          scoring_func: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor]:
    """`ops.route` in Triton for sigmoid scoring, with autograd for the weights; softmax scoring and more
    than MAX_EXPERTS experts run the reference. Returns (weights_TK fp32, experts_TK int64)."""
    if scoring_func != "sigmoid" or logits_TE.shape[-1] > MAX_EXPERTS:
        return router.route(logits_TE, bias_E, k, scoring_func)
    assert logits_TE.is_cuda or _INTERPRETED, "the Triton kernels need CUDA tensors (CPU only under TRITON_INTERPRET=1)"
    logits_TE = logits_TE.float()
    if logits_TE.stride(-1) != 1:
        logits_TE = logits_TE.contiguous()
    return _SigmoidRoute.apply(logits_TE, bias_E, k)


OPS = {"route": route}
"""What this module registers under the implementation name "triton"."""


def register() -> list[tuple[str, str]]:
    """Register OPS with `m2rl.model.ops` (done on import); registering never changes which one is selected."""
    return ops.register_implementations("triton", OPS)


register()
