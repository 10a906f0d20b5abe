"""Fused MoE experts forward in Triton: two grouped GEMMs over expert-aligned blocks of (token, slot) rows.

PyTorch reference: `m2rl.model.ops.moe_experts_torch`, for each token t

    y_t = sum_k weights[t,k] * w2[e] @ (silu(w1[e] @ x_t) * (w3[e] @ x_t)),   e = experts[t,k]

Design (vLLM's fused_moe): `moe_align_block_size` groups the T*K rows by expert in blocks of BLOCK_M, so
one program multiplies a block of rows by one tile of one expert's weights and no expert's weights are
read by programs of another. Then
  1. gate/up: h[row] = silu(x[t] @ w1[e]^T) * (x[t] @ w3[e]^T), w1 and w3 tiles loaded by the same program,
     both accumulated in fp32, the SwiGLU applied in fp32 and h stored in x's dtype      [T*K, I]
  2. down:    y[row] = weights[row] * (h[row] @ w2[e]^T), the routing weight applied in fp32  [T*K, D] fp32
  3. combine: out[t] = sum_k y[t*K + k] in fp32, then cast to x's dtype (a fixed-order sum: deterministic,
     where atomics into out would not be)
Blocks past the used ones (expert -1) exit at once, so the static grid costs nothing for them. Nothing
syncs with the host, so the forward can be captured in a CUDA graph.

For the learner, `FusedMoEFunction` runs this forward saving the gate | up pre-activations, and the Triton
backward of kernels/fused_moe_backward.py; `fused_moe_experts` (the op "triton") takes it whenever autograd
needs a gradient.

Memory traffic: the weights of the experts hit dominate, 3*D*I elements each (`bytes_moved`); a decode
step reads all of them for a handful of rows, so it is bandwidth-bound and BLOCK_M is kept small.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from m2rl.kernels.moe_align import AlignedRouting, moe_align_block_size
from m2rl.model import ops


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Tile sizes of both GEMMs; `default_config` picks them, tuning on the GPU may replace it."""

    block_m: int = 16
    """rows (token, slot) per program; every block holds one expert's rows, so small when experts get few rows"""
    block_n: int = 64
    """output columns per program (I for gate/up, D for down)"""
    block_k: int = 128
    """reduction step (D for gate/up, I for down)"""
    group_m: int = 8
    """row blocks that walk the column tiles together, so their weight tiles are reused from L2"""
    num_warps: int = 4
    num_stages: int = 3


def default_config(num_tokens: int, top_k: int, num_experts: int, elem_bytes: int = 2) -> MoEConfig:
    """Defaults by rows per expert, picked on one H200 at M2's shapes (bf16, E=256, K=8, D=3072, I=1536).

    Up to ~32 rows per expert the GEMMs are bound by reading the hit experts' weights (about 4 TB/s
    measured from 16 to 512 tokens), so small row blocks waste least padding and tile shape barely
    matters; past that they become compute-bound and larger blocks reuse each weight tile more
    (4096 tokens: 128-row blocks 3.15 ms vs 64-row 3.6 ms).

    Each pipeline stage holds an x tile and a w1 and a w3 tile in shared memory; 4-byte elements (fp32)
    halve block_k so the stages still fit the 227 KiB an H100/H200 block may use (128/128/64 x 3 stages is
    288 KiB in fp32: "out of resource: shared memory")."""
    rows_per_expert = num_tokens * top_k / num_experts
    if rows_per_expert < 8:
        config = MoEConfig(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=3)
    elif rows_per_expert <= 32:
        config = MoEConfig(block_m=32, block_n=64, block_k=128, group_m=8, num_warps=4, num_stages=3)
    elif rows_per_expert <= 96:
        config = MoEConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=4)
    else:
        config = MoEConfig(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)
    if elem_bytes > 2:
        config = dataclasses.replace(config, block_k=config.block_k * 2 // elem_bytes)
    return config


def shared_memory_bytes(config: MoEConfig, elem_bytes: int) -> int:
    """Shared memory of the gate/up kernel's pipeline (the larger of the two): stages x (x + w1 + w3 tiles)."""
    return config.num_stages * (config.block_m + 2 * config.block_n) * config.block_k * elem_bytes


def flops(num_tokens: int, top_k: int, hidden: int, inner: int) -> int:
    """Multiply-adds of the three expert GEMMs (gate, up, down) over the T*K routed rows, times two."""
    return 2 * num_tokens * top_k * hidden * inner * 3


def bytes_moved(num_tokens: int, top_k: int, hidden: int, inner: int, num_active_experts: int,
                elem_bytes: int) -> int:
    """Least HBM traffic of one forward: each hit expert's w1, w3, w2 read once; x read and the output
    written once; h written and read back, the fp32 per-slot outputs written and read back by the sum;
    routing ids (int64) and weights (fp32) read. `active_experts` counts the experts hit."""
    rows = num_tokens * top_k
    weights = num_active_experts * 3 * hidden * inner * elem_bytes
    activations = 2 * num_tokens * hidden * elem_bytes + 2 * rows * inner * elem_bytes + 2 * rows * hidden * 4
    return weights + activations + rows * (8 + 4)


def active_experts(experts_TK: torch.Tensor) -> int:
    """How many distinct experts a routing hits (for `bytes_moved`; syncs with the host, benchmarks only)."""
    return int(torch.unique(experts_TK).numel())


@triton.jit
def _block_coords(pid, num_blocks_m, num_blocks_n, GROUP_M: tl.constexpr):
    """Program id -> (row block, column tile), GROUP_M row blocks sweeping the column tiles side by side."""
    programs_per_group = GROUP_M * num_blocks_n
    first_m = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _bf16_rounded(x, BF16_INTERPRETED: tl.constexpr):
    """fp32 x, about to be cast to bf16, already rounded to a bf16 value (nearest, ties to even) where the
    kernel is interpreted: the interpreter's fp32 -> bf16 cast truncates (twice the error), compiled kernels
    round. The same trick as kernels/linear_logprob.py's."""
    if BF16_INTERPRETED:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _gate_up_kernel(
    x_ptr, w1_ptr, w3_ptr, h_ptr, gate_up_ptr, sorted_rows_ptr, block_expert_ptr,
    num_rows, hidden, inner, num_blocks_m,
    stride_xt, stride_xd,
    stride_w1e, stride_w1i, stride_w1d,
    stride_w3e, stride_w3i, stride_w3d,
    stride_hr, stride_hi,
    stride_pr, stride_pi,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16_INTERPRETED: tl.constexpr, SAVE_PREACT: tl.constexpr,
):
    """h[row, n-tile] = silu(x[row // K] @ w1[e]^T) * (x[row // K] @ w3[e]^T) for one block of rows; with
    SAVE_PREACT also the pre-activations gate | up into gate_up [rows, 2I] (what the backward reads)."""
    pid_m, pid_n = _block_coords(tl.program_id(0), num_blocks_m, tl.cdiv(inner, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return

    # int64: rows * stride passes 2**31 from ~87K tokens at M2's shapes (y is [T*K, D])
    rows = tl.load(sorted_rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < num_rows  # padding rows hold num_rows
    tokens = rows // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inner
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xd                  # [M, K]
    w1_ptrs = w1_ptr + expert * stride_w1e + offs_n[None, :] * stride_w1i + offs_k[:, None] * stride_w1d  # [K, N]
    w3_ptrs = w3_ptr + expert * stride_w3e + offs_n[None, :] * stride_w3i + offs_k[:, None] * stride_w3d
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_mask = offs_k < hidden - k0
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = k_mask[:, None] & n_mask[None, :]
        w1 = tl.load(w1_ptrs, mask=w_mask, other=0.0)
        w3 = tl.load(w3_ptrs, mask=w_mask, other=0.0)
        if BF16_INTERPRETED:
            x, w1, w3 = x.to(tl.float32), w1.to(tl.float32), w3.to(tl.float32)
        gate = tl.dot(x, w1, gate, input_precision=DOT_PRECISION)
        up = tl.dot(x, w3, up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        w1_ptrs += BLOCK_K * stride_w1d
        w3_ptrs += BLOCK_K * stride_w3d

    out_mask = row_mask[:, None] & n_mask[None, :]
    if SAVE_PREACT:
        gate_ptrs = gate_up_ptr + rows[:, None] * stride_pr + offs_n[None, :] * stride_pi
        tl.store(gate_ptrs, _bf16_rounded(gate, BF16_INTERPRETED).to(gate_up_ptr.dtype.element_ty), mask=out_mask)
        tl.store(gate_ptrs + inner * stride_pi, _bf16_rounded(up, BF16_INTERPRETED).to(gate_up_ptr.dtype.element_ty),
                 mask=out_mask)
    h = gate * tl.sigmoid(gate) * up
    h_ptrs = h_ptr + rows[:, None] * stride_hr + offs_n[None, :] * stride_hi
    tl.store(h_ptrs, _bf16_rounded(h, BF16_INTERPRETED).to(h_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _down_kernel(
    h_ptr, w2_ptr, y_ptr, routing_weight_ptr, sorted_rows_ptr, block_expert_ptr,
    num_rows, hidden, inner, num_blocks_m,
    stride_hr, stride_hi,
    stride_w2e, stride_w2d, stride_w2i,
    stride_yr, stride_yd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16_INTERPRETED: tl.constexpr,
):
    """y[row, n-tile] = weight[row] * (h[row] @ w2[e]^T) in fp32 for one block of rows."""
    pid_m, pid_n = _block_coords(tl.program_id(0), num_blocks_m, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return

    rows = tl.load(sorted_rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_mask = rows < num_rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)

    h_ptrs = h_ptr + rows[:, None] * stride_hr + offs_k[None, :] * stride_hi                     # [M, K]
    w2_ptrs = w2_ptr + expert * stride_w2e + offs_n[None, :] * stride_w2d + offs_k[:, None] * stride_w2i  # [K, N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inner, BLOCK_K):
        k_mask = offs_k < inner - k0
        h = tl.load(h_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w2 = tl.load(w2_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if BF16_INTERPRETED:
            h, w2 = h.to(tl.float32), w2.to(tl.float32)
        acc = tl.dot(h, w2, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K * stride_hi
        w2_ptrs += BLOCK_K * stride_w2i

    # routing weights are fp32: scale the fp32 accumulator, as the reference scales before casting
    routing_weight = tl.load(routing_weight_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    acc = acc * routing_weight[:, None]
    y_ptrs = y_ptr + rows[:, None] * stride_yr + offs_n[None, :] * stride_yd
    tl.store(y_ptrs, acc, mask=row_mask[:, None] & n_mask[None, :])


# Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) gets bf16 wrong twice: it stores bf16 as uint16
# and its tl.dot multiplies those bit patterns (triton-lang/triton#11584, "not supported yet"), so
# interpreted kernels upcast bf16 tiles to fp32 before the dot (exact: a bf16 product fits in fp32); and its
# fp32 -> bf16 casts truncate, so they round by hand first (`_bf16_rounded`). Compiled kernels do neither.
_INTERPRETED = not isinstance(_gate_up_kernel, triton.runtime.JITFunction)


def _dot_options(dtype: torch.dtype) -> dict[str, object]:
    bf16_interpreted = _INTERPRETED and dtype == torch.bfloat16
    # fp32 GEMMs follow torch's own choice (TF32 only where torch allows it), so fp32 matches the reference
    ieee = bf16_interpreted or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)
    return {"DOT_PRECISION": "ieee" if ieee else "tf32", "BF16_INTERPRETED": bf16_interpreted}


def launch_options(config: MoEConfig, dtype: torch.dtype) -> dict[str, object]:
    """The constexprs and launch settings every row-block kernel (forward and backward) takes from `config`."""
    return {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
            "GROUP_M": config.group_m, **_dot_options(dtype),
            "num_warps": config.num_warps, "num_stages": config.num_stages}


_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_inputs(x_TD: torch.Tensor, w1_EID: torch.Tensor, w3_EID: torch.Tensor, w2_EDI: torch.Tensor,
                  experts_TK: torch.Tensor, weights_TK: torch.Tensor) -> None:
    T, D = x_TD.shape
    E, I, _ = w1_EID.shape
    K = experts_TK.shape[1]
    assert w1_EID.shape == w3_EID.shape == (E, I, D), f"w1/w3 must be [E, I, D] = {(E, I, D)}"
    assert w2_EDI.shape == (E, D, I), f"w2 must be [E, D, I] = {(E, D, I)}, got {tuple(w2_EDI.shape)}"
    assert experts_TK.shape == weights_TK.shape == (T, K), "experts_TK and weights_TK must both be [T, K]"
    assert x_TD.dtype == w1_EID.dtype == w3_EID.dtype == w2_EDI.dtype, "x and expert weights must share a dtype"
    # accumulators and per-slot buffers are fp32: fp64 would lose its precision (the interpreter even
    # returns garbage for an fp64 dot into an fp32 accumulator)
    assert x_TD.dtype in _DTYPES, f"the kernels take {_DTYPES}, got {x_TD.dtype}"
    assert not experts_TK.is_floating_point() and weights_TK.is_floating_point()
    assert x_TD.is_cuda or _INTERPRETED, "the Triton kernels need CUDA tensors (CPU only under TRITON_INTERPRET=1)"


def _forward(x_TD: torch.Tensor, w1_EID: torch.Tensor, w3_EID: torch.Tensor, w2_EDI: torch.Tensor,
             experts_TK: torch.Tensor, weights_TK: torch.Tensor, config: MoEConfig, save_preact: bool,
             ) -> tuple[torch.Tensor, AlignedRouting, torch.Tensor | None]:
    """out [T, D], the alignment, and (with save_preact) gate | up [T*K, 2I]; T*K > 0."""
    T, D = x_TD.shape
    E, I, _ = w1_EID.shape
    K = experts_TK.shape[1]
    routing = moe_align_block_size(experts_TK, E, config.block_m)
    num_blocks_m = routing.block_expert.numel()
    num_rows = T * K
    weight_N = weights_TK.reshape(-1).contiguous()
    launch = launch_options(config, x_TD.dtype)

    h_NI = torch.empty(num_rows, I, dtype=x_TD.dtype, device=x_TD.device)
    gate_up_NI2 = torch.empty(num_rows, 2 * I, dtype=x_TD.dtype, device=x_TD.device) if save_preact else None
    preact = gate_up_NI2 if save_preact else h_NI  # not written without SAVE_PREACT
    grid = (num_blocks_m * triton.cdiv(I, config.block_n),)
    _gate_up_kernel[grid](
        x_TD, w1_EID, w3_EID, h_NI, preact, routing.sorted_rows, routing.block_expert,
        num_rows, D, I, num_blocks_m,
        *x_TD.stride(), *w1_EID.stride(), *w3_EID.stride(), *h_NI.stride(), *preact.stride(),
        TOP_K=K, SAVE_PREACT=save_preact, **launch,
    )
    y_ND = torch.empty(num_rows, D, dtype=torch.float32, device=x_TD.device)
    grid = (num_blocks_m * triton.cdiv(D, config.block_n),)
    _down_kernel[grid](
        h_NI, w2_EDI, y_ND, weight_N, routing.sorted_rows, routing.block_expert,
        num_rows, D, I, num_blocks_m,
        *h_NI.stride(), *w2_EDI.stride(), *y_ND.stride(),
        **launch,
    )
    return y_ND.view(T, K, D).sum(1).to(x_TD.dtype), routing, gate_up_NI2


def fused_moe(x_TD: torch.Tensor, w1_EID: torch.Tensor, w3_EID: torch.Tensor, w2_EDI: torch.Tensor,
              experts_TK: torch.Tensor, weights_TK: torch.Tensor, config: MoEConfig | None = None) -> torch.Tensor:
    """The Triton forward of `moe_experts_torch` (no autograd), with tile sizes `config` or the defaults."""
    _check_inputs(x_TD, w1_EID, w3_EID, w2_EDI, experts_TK, weights_TK)
    T, K = experts_TK.shape
    if T * K == 0:
        return torch.zeros_like(x_TD)
    config = config or default_config(T, K, w1_EID.shape[0], x_TD.element_size())
    return _forward(x_TD, w1_EID, w3_EID, w2_EDI, experts_TK, weights_TK, config, save_preact=False)[0]


# The backward kernels use the helpers above, so their module is imported here, after them, and always with
# this one (under the same TRITON_INTERPRET: the interpreted tests need every kernel interpreted or none).
from m2rl.kernels.fused_moe_backward import WeightGradConfig, fused_moe_backward


class FusedMoEFunction(torch.autograd.Function):
    """`fused_moe` with the Triton backward of kernels/fused_moe_backward.py: gradients of x, w1, w3, w2 and
    the routing weights, sync-free; `apply(x, w1, w3, w2, experts, weights, config=None, weight_config=None)`
    (the tiles of the forward and the backward's row-block kernels, and of the weight-gradient kernel).

    Saved for the backward, besides the inputs themselves: the alignment (int32, about T*K + E*block_m
    entries) and the gate | up pre-activations [T*K, 2I] in x's dtype, the forward's GEMM outputs rounded
    once: 2*K*I elements a token, 48 KiB in bf16 at M2's shapes (K 8, I 1536), 0.8 GB a layer at 16K tokens.
    Recomputing them would cost the gate/up GEMMs again (2/3 of the forward's FLOPs). h is not kept: the
    backward's first kernel rebuilds it from gate | up in its epilogue. The grouped-GEMM path keeps
    2*K*D + 4*K*I elements a token (gathered x, gate, up, silu(gate), h and the per-slot outputs): 4x this."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, w1_EID: torch.Tensor, w3_EID: torch.Tensor, w2_EDI: torch.Tensor,
                experts_TK: torch.Tensor, weights_TK: torch.Tensor, config: MoEConfig | None = None,
                weight_config: WeightGradConfig | None = None) -> torch.Tensor:
        _check_inputs(x_TD, w1_EID, w3_EID, w2_EDI, experts_TK, weights_TK)
        T, K = experts_TK.shape
        ctx.empty = T * K == 0
        if ctx.empty:  # the output depends on nothing: zero gradients
            ctx.save_for_backward(x_TD, w1_EID, w3_EID, w2_EDI, weights_TK)
            return torch.zeros_like(x_TD)
        config = config or default_config(T, K, w1_EID.shape[0], x_TD.element_size())
        out_TD, routing, gate_up_NI2 = _forward(x_TD, w1_EID, w3_EID, w2_EDI, experts_TK, weights_TK, config,
                                                save_preact=True)
        ctx.config, ctx.weight_config = config, weight_config
        ctx.save_for_backward(x_TD, w1_EID, w3_EID, w2_EDI, weights_TK, gate_up_NI2, routing.sorted_rows,
                              routing.block_expert)
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD: torch.Tensor):
        needs = ctx.needs_input_grad
        if ctx.empty:
            x_TD, w1_EID, w3_EID, w2_EDI, weights_TK = ctx.saved_tensors
            zeros = [torch.zeros_like(t) if need else None
                     for t, need in zip((x_TD, w1_EID, w3_EID, w2_EDI, weights_TK), needs[:4] + needs[5:6])]
            return *zeros[:4], None, zeros[4], None, None
        x_TD, w1_EID, w3_EID, w2_EDI, weights_TK, gate_up_NI2, sorted_rows, block_expert = ctx.saved_tensors
        # the routing weights' gradient is always computed: it is a by-product of dh's epilogue
        dx_TD, dw1_EID, dw3_EID, dw2_EDI, dweights_TK = fused_moe_backward(
            grad_TD, x_TD, w1_EID, w3_EID, w2_EDI, weights_TK, gate_up_NI2, sorted_rows, block_expert, ctx.config,
            needs_x=needs[0], needs_expert_weights=any(needs[1:4]), weight_config=ctx.weight_config)
        return dx_TD, dw1_EID, dw3_EID, dw2_EDI, None, dweights_TK, None, None


def fused_moe_experts(x_TD: torch.Tensor, w1_EID: torch.Tensor, w3_EID: torch.Tensor, w2_EDI: torch.Tensor,
                      experts_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """`ops.moe_experts` through the Triton kernels: same signature and result as `moe_experts_torch`; the
    autograd Function where gradients are needed (the learner), else the plain forward (generation)."""
    inputs = (x_TD, w1_EID, w3_EID, w2_EDI, weights_TK)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return FusedMoEFunction.apply(x_TD, w1_EID, w3_EID, w2_EDI, experts_TK, weights_TK)
    return fused_moe(x_TD, w1_EID, w3_EID, w2_EDI, experts_TK, weights_TK)


OPS = {"moe_experts": fused_moe_experts}
"""What this module registers under the implementation name "triton"."""


def register() -> list[tuple[str, str]]:
    """Register OPS with `m2rl.model.ops` (done on import); registering never changes which one is selected."""
    return ops.register_implementations("triton", OPS)


register()
