"""MoE experts as three grouped GEMMs over the (token, slot) pairs sorted by expert: no host sync and no
data-dependent shape, so a forward (and a backward) can be captured in a CUDA graph.

    pairs p = t*K + k, stably sorted by expert e = experts[t, k]      (N = T*K rows, groups end at offs_E)
    x_ND = x_TD[token of each sorted pair]
    h_NI = silu(x_ND @ w1[e].T) * (x_ND @ w3[e].T)                    two grouped GEMMs
    y_ND = h_NI @ w2[e].T                                             one grouped GEMM
    out_TD = sum_k weights[t, k] * y[sorted position of pair t*K+k]   fp32, summed over K in a fixed order

w1 and w3 stay two GEMMs: they are separate parameters, so one [E, D, 2I] operand would copy 2*E*I*D
weights on every call (4.8 GB a layer for the released M2). `torch._grouped_mm` has autograd
(GroupedMmBackward0: the weight gradient is itself a grouped GEMM), so the backward is its own.

What `torch._grouped_mm(a [M, K], b [G, K, N], offs=int32 group ends)` does, checked on torch 2.13 (CPU)
and in torch's source (aten/src/ATen/native/GroupedMMUtils.h, cuda/GroupedBlas.cpp):
  - CPU: fp32, bf16 and fp16, forward and backward, equal to per-group `@`; empty groups are fine.
  - CUDA: a CUTLASS kernel with no host sync only for bf16 on sm90/sm100 (H100/H200/B200). Every other
    dtype or GPU takes torch's fallback, which copies `offs` to the host and loops over the groups.
  - Both: the output dtype must be the input's; the non-unit stride of each operand must be a multiple of
    16 bytes (D and I multiples of 8 in bf16, 4 in fp32); on CUDA data pointers are 16-byte aligned.
    Group sizes need no padding: offsets fall along the strided (row) dimension of every operand, forward
    and backward. The backward rejects a stride-0 gradient, which this graph never produces.
Where those hold, this module runs; elsewhere it calls the reference `moe_experts_torch` (see _fits).

One released-M2 layer (D 3072, I 1536, E 256, K 8, bf16, random routing) on an H200, torch 2.11, against
the reference in the same run: 4096 tokens forward 4.2 ms (220 TFLOP/s; reference 36 ms), forward and
backward 18 ms (reference 1.9 s); 1 token forward 0.16 ms as a CUDA graph (reference 1.75 ms). The three
grouped GEMMs are 3.1 of the 4.1 ms of kernel time at 4096 tokens.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_GROUPED_MM_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16), "cuda": (torch.bfloat16,)}


@functools.cache
def _cuda_has_grouped_gemm_kernel(index: int) -> bool:
    """torch's sync-free grouped GEMM is built for sm90 and sm100 only."""
    return torch.cuda.get_device_capability(index) in ((9, 0), (10, 0))


def _fits(x_TD: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands on its fast, sync-free path (module docstring)."""
    device = x_TD.device
    if not hasattr(torch, "_grouped_mm") or x_TD.shape[0] == 0:
        return False
    if x_TD.dtype not in _GROUPED_MM_DTYPES.get(device.type, ()) or any(w.dtype != x_TD.dtype for w in weights):
        return False
    if device.type == "cuda" and not _cuda_has_grouped_gemm_kernel(
            device.index if device.index is not None else torch.cuda.current_device()):
        return False
    align = 16 // x_TD.element_size()
    return not any(not w.is_contiguous() or w.shape[-1] % align or w.data_ptr() % 16 for w in weights)


class _GatherRows(torch.autograd.Function):
    """src.index_select(0, index_N), each row of src taken `uses` times, with a gather for a backward.

    index_select's own backward is an index_add: atomics on CUDA that land `uses` rows on each source row
    in no fixed order (the learner's gradient of x would change in its last bits from run to run), and
    slow even where each row lands once (0.84 ms against this gather's 0.1 ms for y at 4096 tokens of an
    M2 layer on an H200).
    `inverse_N` lists, for each source row's uses in turn, where they went: the gradient gathers those
    rows and sums the `uses` of each in a fixed order."""

    @staticmethod
    def forward(ctx, src: torch.Tensor, index_N: torch.Tensor, inverse_N: torch.Tensor, uses: int) -> torch.Tensor:
        ctx.save_for_backward(inverse_N)
        ctx.uses = uses
        return src.index_select(0, index_N)

    @staticmethod
    def backward(ctx, grad_N: torch.Tensor):
        (inverse_N,) = ctx.saved_tensors
        grad = grad_N.index_select(0, inverse_N)
        if ctx.uses > 1:
            grad = grad.view(-1, ctx.uses, grad_N.shape[-1]).sum(1)
        return grad, None, None, None


def moe_experts_grouped(x_TD: torch.Tensor, w1_EID: torch.Tensor, w3_EID: torch.Tensor, w2_EDI: torch.Tensor,
                        experts_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """sum_k weights[t,k] * w2_e(silu(w1_e x_t) * w3_e x_t) with e = experts[t,k], as `ops.moe_experts_torch`.

    Routing weights are fp32: the expert outputs are scaled and summed over K in fp32, then cast to x's dtype."""
    if not _fits(x_TD, w1_EID, w3_EID, w2_EDI):
        # The reference, which syncs with the host for mid-size batches: the path for fp32/fp16 on CUDA,
        # GPUs before sm90, and widths that break the 16-byte stride rule. Imported here: ops imports us.
        from m2rl.model.ops import moe_experts_torch

        return moe_experts_torch(x_TD, w1_EID, w3_EID, w2_EDI, experts_TK, weights_TK)
    T, K = experts_TK.shape
    E = w1_EID.shape[0]
    N = T * K
    expert_sorted_N, pair_N = torch.sort(experts_TK.reshape(-1), stable=True)
    # Group g's rows end at the number of pairs routed to experts <= g: counts and cumsum in one op.
    expert_ids = torch.arange(E, device=x_TD.device, dtype=expert_sorted_N.dtype)
    offs_E = torch.searchsorted(expert_sorted_N, expert_ids, right=True, out_int32=True)
    # position_N[p]: where pair p landed in the sorted order (the inverse permutation).
    position_N = torch.empty_like(pair_N).scatter_(0, pair_N, torch.arange(N, device=x_TD.device))

    x_ND = _GatherRows.apply(x_TD, pair_N // K, position_N, K)
    gate_NI = torch._grouped_mm(x_ND, w1_EID.transpose(1, 2), offs=offs_E)
    up_NI = torch._grouped_mm(x_ND, w3_EID.transpose(1, 2), offs=offs_E)
    y_ND = torch._grouped_mm(F.silu(gate_NI) * up_NI, w2_EDI.transpose(1, 2), offs=offs_E)
    y_TKD = _GatherRows.apply(y_ND, position_N, pair_N, 1).view(T, K, -1)  # back in (token, slot) order
    # bf16 * fp32 computes in fp32 without a cast copy of y; the sum over K runs in fp32 too.
    return (y_TKD * weights_TK.float().unsqueeze(-1)).sum(1).to(x_TD.dtype)
