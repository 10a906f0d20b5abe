"""Backward of the fused MoE (kernels/fused_moe.py) in Triton: four kernels over the forward's expert-aligned
row blocks, no host sync, a fixed summation order everywhere (deterministic: no atomics).

Forward, per (token, slot) row r = t*K + k with expert e = experts[t, k] and routing weight w_r:
    gate_r = w1[e] x_t,  up_r = w3[e] x_t,  h_r = silu(gate_r) * up_r,  out_t = sum_k w_r * (w2[e] h_r)
Backward, given g = dL/dout [T, D] (PyTorch reference: autograd through `ops.moe_experts_torch`):
  1. _dgate_up_kernel, per (row block, I tile), reduction over D:
       G_r = g_t @ w2[e]                                  (w2 not transposed: [D, I])
       epilogue from the saved gate | up: h_r, d w_r partial = <G_r, h_r> over the tile, dh_r = w_r G_r,
       dgate_r = dh_r * up_r * silu'(gate_r),  dup_r = dh_r * silu(gate_r)        -> h, dgate | dup [T*K, 2I]
     d w_r = <g_t, w2[e] h_r> = <G_r, h_r>: the per-tile partials [T*K, I/BLOCK_N] are summed afterwards.
  2. _dx_kernel, per (row block, D tile), reduction over I:
       dx_r = dgate_r @ w1[e] + dup_r @ w3[e]             fp32 [T*K, D]; dx_t = sum_k dx_r in a fixed order
  3. _weight_grad_kernel, per (expert, output tile), looping over that expert's rows (contiguous in the
     aligned order, so no split-K and no atomics):
       dw1[e] = sum_r dgate_r^T x_t,  dw3[e] = sum_r dup_r^T x_t    (one launch: both share the x tile)
       dw2[e] = sum_r (w_r g_t)^T h_r                                (a second launch)
     Experts with no rows get zeros (their gradient is dense and zero).
Every GEMM accumulates in fp32 and reads 16-bit operands where the model is 16-bit; the elementwise SwiGLU
backward runs in fp32 in the epilogue of (1), so nothing but h and dgate | dup is written between the GEMMs.

Extra memory during the backward (the saved tensors are described in `FusedMoEFunction`): h [T*K, I] and
dgate | dup [T*K, 2I] in x's dtype, dx per slot [T*K, D] fp32 and the d w partials; at M2's shapes
(K 8, D 3072, I 1536) in bf16 about 170 KiB a token.
FLOPs: twice the forward's (`fused_moe.flops`): a GEMM of D*I per row for dh, 2 for dx, 3 for the weights.
Tiles are not tuned on a GPU yet; `python -m m2rl.kernels.fused_moe_backward [tokens...]` measures forward
and forward + backward against the grouped-GEMM path at M2's shapes (one JSON line per size).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from m2rl.kernels.fused_moe import MoEConfig, _bf16_rounded, _block_coords, _dot_options, launch_options


@dataclasses.dataclass(frozen=True)
class WeightGradConfig:
    """Tiles of the weight-gradient kernel: an output tile [block_p, block_q] of one expert's gradient,
    its rows reduced block_r at a time. Not tuned on a GPU yet: the forward's large-batch shape."""

    block_p: int = 128
    """rows of the output tile (D of dw2, I of dw1/dw3)"""
    block_q: int = 128
    """columns of the output tile (I of dw2, D of dw1/dw3)"""
    block_r: int = 64
    """(token, slot) rows reduced per step"""
    group_p: int = 8
    """output row tiles that walk the column tiles together (L2 reuse of the row operand)"""
    num_warps: int = 8
    num_stages: int = 3


def default_weight_grad_config(elem_bytes: int = 2) -> WeightGradConfig:
    """4-byte elements halve block_r, so the stages fit Hopper's 227 KiB of shared memory per block."""
    config = WeightGradConfig()
    if elem_bytes > 2:
        config = dataclasses.replace(config, block_r=config.block_r * 2 // elem_bytes)
    return config


def backward_row_config(config: MoEConfig) -> MoEConfig:
    """Tiles of the dh and dx kernels: the forward's (its block_m is the alignment's) with at most 64 columns.
    dh's epilogue, the SwiGLU backward, keeps about eight fp32 tiles live: ptxas for sm90 (Triton 3.9,
    compiled without a GPU) reports a 2.7 KB stack a thread for 128x128 tiles at 8 warps, 0.4 KB at 128x64.
    Not yet measured on a GPU."""
    return dataclasses.replace(config, block_n=min(config.block_n, 64))


def shared_memory_bytes(config: MoEConfig, weight_config: WeightGradConfig, elem_bytes: int) -> int:
    """The largest pipeline of the backward kernels, for the forward's `config`: stages x the tiles each
    loads per step (dx: dgate, dup, w1, w3; weight gradients: dgate, dup, x)."""
    config = backward_row_config(config)
    dx = config.num_stages * 2 * (config.block_m + config.block_n) * config.block_k
    weights = weight_config.num_stages * (2 * weight_config.block_p + weight_config.block_q) * weight_config.block_r
    return max(dx, weights) * elem_bytes


@triton.jit
def _dgate_up_kernel(
    grad_ptr, w2_ptr, gate_up_ptr, routing_weight_ptr, sorted_rows_ptr, block_expert_ptr,
    h_ptr, dgate_up_ptr, dweight_ptr,
    num_rows, hidden, inner, num_blocks_m,
    stride_gt, stride_gd,
    stride_w2e, stride_w2d, stride_w2i,
    stride_pr, stride_pi,
    stride_hr, stride_hi,
    stride_wr, stride_wn,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16_INTERPRETED: tl.constexpr,
):
    """For one block of rows and one I tile: G = g[row // K] @ w2[e], then h, the routing weight's partial
    gradient <G, h>, and dgate | dup (gate_up and dgate_up share their strides: both [rows, 2I])."""
    pid_m, pid_n = _block_coords(tl.program_id(0), num_blocks_m, tl.cdiv(inner, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return

    rows = tl.load(sorted_rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < num_rows  # padding rows hold num_rows
    tokens = rows // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inner
    offs_k = tl.arange(0, BLOCK_K)

    g_ptrs = grad_ptr + tokens[:, None] * stride_gt + offs_k[None, :] * stride_gd                 # [M, K]
    w2_ptrs = w2_ptr + expert * stride_w2e + offs_k[:, None] * stride_w2d + offs_n[None, :] * stride_w2i  # [K, N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_mask = offs_k < hidden - k0
        g = tl.load(g_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w2 = tl.load(w2_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if BF16_INTERPRETED:
            g, w2 = g.to(tl.float32), w2.to(tl.float32)
        acc = tl.dot(g, w2, acc, input_precision=DOT_PRECISION)
        g_ptrs += BLOCK_K * stride_gd
        w2_ptrs += BLOCK_K * stride_w2d

    # SwiGLU backward in fp32 from the saved pre-activations; h rounded as the forward stored it
    mask = row_mask[:, None] & n_mask[None, :]
    gate_offs = rows[:, None] * stride_pr + offs_n[None, :] * stride_pi
    gate = tl.load(gate_up_ptr + gate_offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + gate_offs + inner * stride_pi, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    h = _bf16_rounded(silu * up, BF16_INTERPRETED).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + rows[:, None] * stride_hr + offs_n[None, :] * stride_hi, h, mask=mask)

    dweight = tl.sum(acc * h.to(tl.float32), axis=1)  # this tile's share of <g_t, w2[e] h_r>
    tl.store(dweight_ptr + rows * stride_wr + pid_n * stride_wn, dweight, mask=row_mask)

    routing_weight = tl.load(routing_weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    dh = acc * routing_weight[:, None]
    dgate = dh * up * sig * (1.0 + gate * (1.0 - sig))  # silu'(x) = s + x s (1 - s)
    dup = dh * silu
    dgate_ptrs = dgate_up_ptr + gate_offs
    tl.store(dgate_ptrs, _bf16_rounded(dgate, BF16_INTERPRETED).to(dgate_up_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate_ptrs + inner * stride_pi, _bf16_rounded(dup, BF16_INTERPRETED).to(dgate_up_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _dx_kernel(
    dgate_up_ptr, w1_ptr, w3_ptr, dx_ptr, sorted_rows_ptr, block_expert_ptr,
    num_rows, hidden, inner, num_blocks_m,
    stride_pr, stride_pi,
    stride_w1e, stride_w1i, stride_w1d,
    stride_w3e, stride_w3i, stride_w3d,
    stride_xr, stride_xd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16_INTERPRETED: tl.constexpr,
):
    """dx[row, n-tile] = dgate[row] @ w1[e] + dup[row] @ w3[e] in fp32 for one block of rows (one
    accumulator: the two products share the reduction over I)."""
    pid_m, pid_n = _block_coords(tl.program_id(0), num_blocks_m, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return

    rows = tl.load(sorted_rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < num_rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)

    dgate_ptrs = dgate_up_ptr + rows[:, None] * stride_pr + offs_k[None, :] * stride_pi               # [M, K]
    w1_ptrs = w1_ptr + expert * stride_w1e + offs_k[:, None] * stride_w1i + offs_n[None, :] * stride_w1d  # [K, N]
    w3_ptrs = w3_ptr + expert * stride_w3e + offs_k[:, None] * stride_w3i + offs_n[None, :] * stride_w3d
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inner, BLOCK_K):
        k_mask = offs_k < inner - k0
        a_mask = row_mask[:, None] & k_mask[None, :]
        dgate = tl.load(dgate_ptrs, mask=a_mask, other=0.0)
        dup = tl.load(dgate_ptrs + inner * stride_pi, mask=a_mask, other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        w1 = tl.load(w1_ptrs, mask=w_mask, other=0.0)
        w3 = tl.load(w3_ptrs, mask=w_mask, other=0.0)
        if BF16_INTERPRETED:
            dgate, dup, w1, w3 = dgate.to(tl.float32), dup.to(tl.float32), w1.to(tl.float32), w3.to(tl.float32)
        acc = tl.dot(dgate, w1, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(dup, w3, acc, input_precision=DOT_PRECISION)
        dgate_ptrs += BLOCK_K * stride_pi
        w1_ptrs += BLOCK_K * stride_w1i
        w3_ptrs += BLOCK_K * stride_w3i

    tl.store(dx_ptr + rows[:, None] * stride_xr + offs_n[None, :] * stride_xd, acc,
             mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def _weight_grad_kernel(
    a_ptr, a2_ptr, b_ptr, dw_ptr, dw2_ptr, row_scale_ptr, sorted_rows_ptr, expert_bounds_ptr,
    num_rows, size_p, size_q,
    stride_ar, stride_ap,
    stride_br, stride_bq,
    stride_we, stride_wp, stride_wq,
    TOP_K: tl.constexpr, A_BY_TOKEN: tl.constexpr, B_BY_TOKEN: tl.constexpr, SCALE_A: tl.constexpr,
    PAIR: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_P: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16_INTERPRETED: tl.constexpr,
):
    """dw[e][p-tile, q-tile] = sum over expert e's rows r of A[r]^T B[r] (and dw2[e] from a2 with PAIR).

    A and B rows are read at the row r, or at its token r // K (BY_TOKEN); SCALE_A multiplies A's row by
    row_scale[r] in fp32 first. The expert's rows are sorted_rows[bounds[e]:bounds[e+1]]; padding entries
    hold num_rows and are masked. dw and dw2 share their strides."""
    expert = tl.program_id(1)
    pid_p, pid_q = _block_coords(tl.program_id(0), tl.cdiv(size_p, BLOCK_P), tl.cdiv(size_q, BLOCK_Q), GROUP_P)
    start = tl.load(expert_bounds_ptr + expert)
    end = tl.load(expert_bounds_ptr + expert + 1)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_mask = offs_p < size_p
    q_mask = offs_q < size_q
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        pos = r0 + tl.arange(0, BLOCK_R)
        rows = tl.load(sorted_rows_ptr + pos, mask=pos < end, other=num_rows).to(tl.int64)
        row_mask = rows < num_rows
        a_rows = rows
        if A_BY_TOKEN:
            a_rows = rows // TOP_K
        b_rows = rows
        if B_BY_TOKEN:
            b_rows = rows // TOP_K
        a_offs = a_rows[:, None] * stride_ar + offs_p[None, :] * stride_ap                      # [R, P]
        a_mask = row_mask[:, None] & p_mask[None, :]
        a = tl.load(a_ptr + a_offs, mask=a_mask, other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * stride_br + offs_q[None, :] * stride_bq,            # [R, Q]
                    mask=row_mask[:, None] & q_mask[None, :], other=0.0)
        if SCALE_A:
            scale = tl.load(row_scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            a = _bf16_rounded(a.to(tl.float32) * scale[:, None], BF16_INTERPRETED).to(a_ptr.dtype.element_ty)
        if BF16_INTERPRETED:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=DOT_PRECISION)
        if PAIR:
            a2 = tl.load(a2_ptr + a_offs, mask=a_mask, other=0.0)
            if BF16_INTERPRETED:
                a2 = a2.to(tl.float32)
            acc2 = tl.dot(tl.trans(a2), b, acc2, input_precision=DOT_PRECISION)

    dw_offs = expert.to(tl.int64) * stride_we + offs_p[:, None] * stride_wp + offs_q[None, :] * stride_wq
    mask = p_mask[:, None] & q_mask[None, :]
    tl.store(dw_ptr + dw_offs, _bf16_rounded(acc, BF16_INTERPRETED).to(dw_ptr.dtype.element_ty), mask=mask)
    if PAIR:
        tl.store(dw2_ptr + dw_offs, _bf16_rounded(acc2, BF16_INTERPRETED).to(dw2_ptr.dtype.element_ty), mask=mask)


def expert_row_bounds(block_expert: torch.Tensor, num_experts: int, block_m: int) -> torch.Tensor:
    """[E + 1] int32: expert e's rows are sorted_rows[bounds[e]:bounds[e + 1]] (empty experts: equal bounds).
    Its blocks are contiguous in block_expert (unused blocks, -1, last): a sorted search, no host sync."""
    ordered = torch.where(block_expert < 0, num_experts, block_expert)
    experts = torch.arange(num_experts + 1, device=block_expert.device, dtype=ordered.dtype)
    return (torch.searchsorted(ordered, experts) * block_m).to(torch.int32)


def _weight_grad(a: torch.Tensor, a2: torch.Tensor | None, b: torch.Tensor, row_scale: torch.Tensor | None,
                 sorted_rows: torch.Tensor, bounds: torch.Tensor, num_rows: int, top_k: int,
                 a_by_token: bool, b_by_token: bool, config: WeightGradConfig) -> list[torch.Tensor]:
    """[E, P, Q] = per expert, sum over its rows of a[r]^T b[r] (and the same for a2), in a's dtype."""
    E = bounds.numel() - 1
    P, Q = a.shape[1], b.shape[1]
    dw = torch.empty(E, P, Q, dtype=b.dtype, device=b.device)
    dw2 = torch.empty_like(dw) if a2 is not None else dw
    grid = (triton.cdiv(P, config.block_p) * triton.cdiv(Q, config.block_q), E)
    _weight_grad_kernel[grid](
        a, a2 if a2 is not None else a, b, dw, dw2, row_scale if row_scale is not None else a, sorted_rows, bounds,
        num_rows, P, Q,
        *a.stride(), *b.stride(), *dw.stride(),
        TOP_K=top_k, A_BY_TOKEN=a_by_token, B_BY_TOKEN=b_by_token, SCALE_A=row_scale is not None,
        PAIR=a2 is not None, BLOCK_P=config.block_p, BLOCK_Q=config.block_q, BLOCK_R=config.block_r,
        GROUP_P=config.group_p, **_dot_options(b.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return [dw, dw2] if a2 is not None else [dw]


def fused_moe_backward(grad_TD: torch.Tensor, x_TD: torch.Tensor, w1_EID: torch.Tensor, w3_EID: torch.Tensor,
                       w2_EDI: torch.Tensor, weights_TK: torch.Tensor, gate_up_NI2: torch.Tensor,
                       sorted_rows: torch.Tensor, block_expert: torch.Tensor, config: MoEConfig,
                       needs_x: bool = True, needs_expert_weights: bool = True,
                       weight_config: WeightGradConfig | None = None):
    """(dx [T, D], dw1, dw3, dw2, d weights [T, K]) from the forward's saved tensors (`FusedMoEFunction`);
    dx is None unless needs_x, the expert weights' gradients None unless needs_expert_weights. `config` is
    the forward's: its block_m is the alignment's."""
    T, D = x_TD.shape
    E, I, _ = w1_EID.shape
    K = weights_TK.shape[1]
    num_rows = T * K
    num_blocks_m = block_expert.numel()
    weight_N = weights_TK.reshape(-1).contiguous()
    row_config = backward_row_config(config)
    launch = launch_options(row_config, x_TD.dtype)
    dtype, device = x_TD.dtype, x_TD.device

    h_NI = torch.empty(num_rows, I, dtype=dtype, device=device)
    dgate_up_NI2 = torch.empty_like(gate_up_NI2)
    tiles_i = triton.cdiv(I, row_config.block_n)
    dweight_partial = torch.empty(num_rows, tiles_i, dtype=torch.float32, device=device)
    _dgate_up_kernel[(num_blocks_m * tiles_i,)](
        grad_TD, w2_EDI, gate_up_NI2, weight_N, sorted_rows, block_expert,
        h_NI, dgate_up_NI2, dweight_partial,
        num_rows, D, I, num_blocks_m,
        *grad_TD.stride(), *w2_EDI.stride(), *gate_up_NI2.stride(), *h_NI.stride(), *dweight_partial.stride(),
        TOP_K=K, **launch,
    )
    dweights_TK = dweight_partial.sum(1).view(T, K).to(weights_TK.dtype)

    dx_TD = None
    if needs_x:
        dx_ND = torch.empty(num_rows, D, dtype=torch.float32, device=device)
        _dx_kernel[(num_blocks_m * triton.cdiv(D, row_config.block_n),)](
            dgate_up_NI2, w1_EID, w3_EID, dx_ND, sorted_rows, block_expert,
            num_rows, D, I, num_blocks_m,
            *dgate_up_NI2.stride(), *w1_EID.stride(), *w3_EID.stride(), *dx_ND.stride(),
            **launch,
        )
        dx_TD = dx_ND.view(T, K, D).sum(1).to(dtype)  # fp32, the K slots in a fixed order

    dw1_EID = dw3_EID = dw2_EDI = None
    if needs_expert_weights:
        weight_config = weight_config or default_weight_grad_config(x_TD.element_size())
        bounds = expert_row_bounds(block_expert, E, config.block_m)
        dgate_NI, dup_NI = dgate_up_NI2[:, :I], dgate_up_NI2[:, I:]
        dw1_EID, dw3_EID = _weight_grad(dgate_NI, dup_NI, x_TD, None, sorted_rows, bounds, num_rows, K,
                                        a_by_token=False, b_by_token=True, config=weight_config)
        (dw2_EDI,) = _weight_grad(grad_TD, None, h_NI, weight_N, sorted_rows, bounds, num_rows, K,
                                  a_by_token=True, b_by_token=False, config=weight_config)
    return dx_TD, dw1_EID, dw3_EID, dw2_EDI, dweights_TK


def benchmark(tokens: int, seed: int = 0) -> dict[str, object]:
    """One released-M2 MoE layer (D 3072, I 1536, E 256, K 8, bf16, random routing) on this GPU: forward, and
    forward + backward with every gradient, in ms and TFLOP/s; the Triton kernels against the grouped-GEMM
    path (`moe_experts_grouped`) measured in the same run."""
    from m2rl.kernels.fused_moe import FusedMoEFunction, flops, fused_moe
    from m2rl.model.moe_grouped import moe_experts_grouped
    from triton.testing import do_bench

    D, I, E, K = 3072, 1536, 256, 8
    gen = torch.Generator("cuda").manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).bfloat16().requires_grad_()

    x = randn(tokens, D)
    w1, w3, w2 = randn(E, I, D, scale=D**-0.5), randn(E, I, D, scale=D**-0.5), randn(E, D, I, scale=I**-0.5)
    experts = torch.rand(tokens, E, generator=gen, device="cuda").topk(K, dim=1).indices
    weights = (torch.rand(tokens, K, generator=gen, device="cuda") + 0.1).requires_grad_()
    grad = torch.randn(tokens, D, generator=gen, device="cuda").bfloat16()
    args = (x, w1, w3, w2, experts, weights)
    forward_flops = flops(tokens, K, D, I)
    result: dict[str, object] = {"device": torch.cuda.get_device_name(), "tokens": tokens}
    for name, forward, train in (("triton", fused_moe, FusedMoEFunction.apply),
                                 ("grouped_mm", moe_experts_grouped, moe_experts_grouped)):
        with torch.no_grad():
            ms = do_bench(lambda forward=forward: forward(*args))
        result[f"{name}_forward_ms"], result[f"{name}_forward_tflops"] = ms, forward_flops / ms / 1e9
        ms = do_bench(lambda train=train: train(*args).backward(grad), grad_to_none=[x, w1, w3, w2, weights])
        # the backward is two forwards' worth of GEMMs (dh, dx, and the three weight gradients)
        result[f"{name}_train_ms"], result[f"{name}_train_tflops"] = ms, 3 * forward_flops / ms / 1e9
    return result


if __name__ == "__main__":
    import json
    import sys

    for tokens in [int(arg) for arg in sys.argv[1:]] or [4096, 16384]:
        print(json.dumps(benchmark(tokens)), flush=True)
