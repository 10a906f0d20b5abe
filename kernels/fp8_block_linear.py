"""FP8 (e4m3) block-scaled linear in Triton: y = x @ (W * S)^T without dequantising W to memory.

PyTorch reference: `fp8_block_linear_torch` (dequantise the whole weight, then F.linear)

    x [M, K] (bf16/fp16)   W [N, K] float8_e4m3fn   S = scale_inv [ceil(N/bn), ceil(K/bk)] fp32
    y[m, n] = sum_k x[m, k] * W[n, k] * S[n // bn, k // bk]          (+ bias[n])

The released M2 checkpoint stores its attention projections this way ((bn, bk) = (128, 128)); the tiny test
models use (32, 32). Each program owns a BLOCK_M x BLOCK_N tile of y. BLOCK_N divides bn and BLOCK_K divides
bk (all powers of two), so every [BLOCK_N, BLOCK_K] tile of W lies inside one scale block: the kernel loads
the fp8 tile, converts it to x's dtype in registers (e4m3 is exact in bf16 and fp16), takes the fp32 dot
and multiplies that partial product by the tile's one scalar scale before adding it to the fp32
accumulator. Masks cover M, N and K that are not multiples of the tiles (M = 1 at decode).

Bandwidth-bound at decode: a step reads N*K fp8 bytes (half the bf16 weight) plus the scales; `bytes_moved`
counts that least traffic. Nothing syncs with the host (CUDA-graph safe). Registers no `ops` op: the
attention projections call it through `model/fp8_linear.py`'s Fp8Linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from m2rl.model.fp8 import dequantize_fp8_blocks


def flops(rows: int, out_features: int, in_features: int) -> int:
    """2 per multiply-add of [rows, in] x [in, out]."""
    return 2 * rows * out_features * in_features


def bytes_moved(rows: int, out_features: int, in_features: int, elem_bytes: int,
                block: tuple[int, int] = (128, 128)) -> int:
    """Least HBM traffic: the fp8 weight and its fp32 scales once, x read and y written in `elem_bytes`."""
    scales = triton.cdiv(out_features, block[0]) * triton.cdiv(in_features, block[1])
    return out_features * in_features + 4 * scales + rows * (in_features + out_features) * elem_bytes


def blocks_supported(block: tuple[int, int]) -> bool:
    """The kernel puts each weight tile inside one scale block: block sides must be powers of two >= 16
    (tl.dot's smallest tile side)."""
    return all(b >= 16 and b & (b - 1) == 0 for b in block)


def launch_options(rows: int, block: tuple[int, int]) -> dict[str, int]:
    """Tiles by row count, the fastest of a sweep on an H200 at M2's qkv shape (N 8192, K 3072; BLOCK_M x
    BLOCK_N x BLOCK_K x warps x stages, 2026-11-30). Decode: BLOCK_M 16 (tl.dot's least) and narrow BLOCK_N,
    so the weight streams through many programs (256 for 132 SMs); prefill: 128x128 tiles reuse each weight
    tile across 128 rows, with BLOCK_K 64 (deeper pipelining beat fewer scale loads)."""
    if rows <= 16:
        block_m, block_n, block_k, warps, stages = 16, 32, 128, 4, 4
    elif rows <= 64:
        block_m, block_n, block_k, warps, stages = 64, 32, 128, 4, 4
    else:
        block_m, block_n, block_k, warps, stages = 128, 128, 64, 8, 3
    return {"BLOCK_M": block_m, "BLOCK_N": min(block_n, block[0]), "BLOCK_K": min(block_k, block[1]),
            "num_warps": warps, "num_stages": stages}


@triton.jit
def _fp8_block_linear_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_ym, stride_yn,
    SCALE_N: tl.constexpr, SCALE_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # W tile [BLOCK_N, BLOCK_K], K contiguous
    # BLOCK_N divides SCALE_N: the whole tile's rows of W share one row of scales.
    s_row = s_ptr + ((pid_n * BLOCK_N) // SCALE_N) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_idx = k0 + offs_k
        k_mask = k_idx < K
        a = tl.load(x_rows + k_idx[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_rows + k_idx[None, :] * stride_wk, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        scale = tl.load(s_row + (k0 // SCALE_K) * stride_sk)  # BLOCK_K divides SCALE_K: one scale per tile
        # The tile is scaled before the dot, in x's dtype (the value the reference's dequantised weight
        # rounds to), so the tensor cores accumulate straight into `acc`.
        w = (w.to(tl.float32) * scale).to(a.dtype)
        acc = tl.dot(a, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# Without a GPU the tests run this module under TRITON_INTERPRET=1 (tests/kernels/conftest.py).
_INTERPRETED = not isinstance(_fp8_block_linear_kernel, triton.runtime.JITFunction)


def fp8_block_linear_torch(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                           block: tuple[int, int], bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: the whole weight dequantised (product in fp32, rounded to x's dtype), then F.linear.
    Bytes: N*K fp8 read, N*K*4 written and read again, N*K in x's dtype written and read: ~7x the kernel's
    weight traffic at decode in bf16."""
    w = dequantize_fp8_blocks(weight, scale_inv, tuple(block)).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def fp8_block_linear_2d(x_MK: torch.Tensor, weight_NK: torch.Tensor, scale_inv: torch.Tensor,
                        block: tuple[int, int], bias_N: torch.Tensor | None = None,
                        options: dict[str, int] | None = None) -> torch.Tensor:
    """y [M, N] in x's dtype from x [M, K] (bf16 or fp16: the dtype tl.dot runs in). `options` overrides
    `launch_options` (the tile sweep in benchmarks/kernels.py)."""
    M, K = x_MK.shape
    N = weight_NK.shape[0]
    assert x_MK.is_cuda or _INTERPRETED, "the Triton kernels need CUDA tensors (CPU only under TRITON_INTERPRET=1)"
    assert x_MK.dtype in (torch.bfloat16, torch.float16), f"x must be bf16 or fp16, got {x_MK.dtype}"
    assert weight_NK.dtype == torch.float8_e4m3fn and weight_NK.shape == (N, K), \
        f"weight must be float8_e4m3fn [N, {K}], got {weight_NK.dtype} {tuple(weight_NK.shape)}"
    assert blocks_supported(block), f"block {tuple(block)}: sides must be powers of two >= 16"
    assert tuple(scale_inv.shape) == (triton.cdiv(N, block[0]), triton.cdiv(K, block[1])), \
        f"scale_inv {tuple(scale_inv.shape)} does not tile a {N}x{K} weight in {tuple(block)} blocks"
    assert scale_inv.dtype == torch.float32, f"scale_inv must be fp32, got {scale_inv.dtype}"
    y_MN = torch.empty(M, N, dtype=x_MK.dtype, device=x_MK.device)
    if M == 0:
        return y_MN
    opts = options or launch_options(M, block)
    grid = (triton.cdiv(M, opts["BLOCK_M"]), triton.cdiv(N, opts["BLOCK_N"]))
    _fp8_block_linear_kernel[grid](
        x_MK, weight_NK, scale_inv, bias_N if bias_N is not None else scale_inv, y_MN,
        M, N, K,
        x_MK.stride(0), x_MK.stride(1), weight_NK.stride(0), weight_NK.stride(1),
        scale_inv.stride(0), scale_inv.stride(1), y_MN.stride(0), y_MN.stride(1),
        SCALE_N=block[0], SCALE_K=block[1], HAS_BIAS=bias_N is not None, **opts)
    return y_MN


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, W * S, bias) for x [..., K]: y [..., N] in x's dtype. Blocks the kernel cannot tile
    (a side not a power of two >= 16) run the reference, which dequantises the weight to memory."""
    block = (int(block[0]), int(block[1]))
    if not blocks_supported(block):
        return fp8_block_linear_torch(x, weight, scale_inv, block, bias)
    x_MK = x.reshape(-1, x.shape[-1])
    y_MN = fp8_block_linear_2d(x_MK, weight, scale_inv, block, bias)
    return y_MN.view(*x.shape[:-1], weight.shape[0])


OPS: dict[str, object] = {}
"""Registers nothing with `m2rl.model.ops`: Fp8Linear calls `fp8_block_linear` directly."""
