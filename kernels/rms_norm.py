"""RMSNorm forward and backward in Triton: one program per row, the whole row in registers.

PyTorch reference: `m2rl.model.ops.rms_norm_torch`

    y = weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)        # statistics in fp32

Forward: one program per row loads the row in one block (BLOCK_D = the power of two >= D), sums squares in
fp32, rounds the normalised row to x's dtype and multiplies by the weight in fp32 with one rounding to the
output dtype (torch.promote_types(x, weight), as the reference: a product of two 16-bit floats is exact in
fp32, so this rounds as torch's own 16-bit multiply). It also stores the row's 1/rms for the backward.

Backward, with n = x * rstd in fp32 and g = dy * weight:

    dx      = rstd * (g - n * mean(g * n))
    dweight = sum over rows of dy * n.to(x.dtype)

Each backward program walks a contiguous block of rows and keeps its share of dweight in fp32 registers,
then writes it as one row of a [programs, D] fp32 buffer that torch sums: no atomics, deterministic. The
rounding of n to x's dtype counts as the identity for dx, as autograd treats the reference's cast.

Bandwidth-bound: `bytes_moved` counts the least traffic (a decoder layer reads 2 x 3072 bf16 per token).
Nothing syncs with the host (CUDA-graph safe).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from m2rl.model import ops

MAX_WIDTH = 16384
"""Widest row a program holds in registers (M2's widest norm is the q projection, 6144)."""


def bytes_moved(rows: int, width: int, elem_bytes: int, backward: bool = False, programs: int = 0) -> int:
    """Least HBM traffic, all tensors in one dtype of `elem_bytes`. Forward: x read, y written, the weight
    read, 1/rms (fp32) written. Backward: dy, x and 1/rms read, dx written, the weight read, `programs`
    partial fp32 dweight rows written and read back, dweight written."""
    if not backward:
        return 2 * rows * width * elem_bytes + width * elem_bytes + rows * 4
    return 3 * rows * width * elem_bytes + rows * 4 + 2 * width * elem_bytes + 2 * programs * width * 4


def launch_options(width: int) -> dict[str, int]:
    """BLOCK_D covers the row; warps as Liger-Kernel's row kernels (a 3072 row: 4096-block, 8 warps; q's
    6144: 8192, 16 warps), so a thread holds 4 to 16 fp32 elements of each row-sized tensor."""
    assert width <= MAX_WIDTH, f"rows wider than {MAX_WIDTH} do not fit one program's registers, got {width}"
    block = triton.next_power_of_2(width)
    return {"BLOCK_D": block, "num_warps": 16 if block >= 8192 else 8 if block >= 2048 else 4}


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def backward_programs(rows: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows per program) of a backward: two programs per SM on a GPU (four where interpreted, so
    the CPU tests cover several partial dweight rows), each a contiguous block of rows, none empty."""
    most = 2 * _multiprocessors(device.index or 0) if device.type == "cuda" else 4
    rows_per_program = triton.cdiv(rows, min(rows, most))
    return triton.cdiv(rows, rows_per_program), rows_per_program


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr,
    width, eps,
    stride_x_row, stride_y_row,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs_d < width
    x = tl.load(x_ptr + row * stride_x_row + offs_d, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / width + eps)
    w = tl.load(w_ptr + offs_d, mask=mask, other=0.0).to(tl.float32)
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)  # the reference casts before the weight
    tl.store(y_ptr + row * stride_y_row + offs_d, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
    rows, width, rows_per_program,
    stride_dy_row, stride_x_row, stride_dx_row,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs_d < width
    w = tl.load(w_ptr + offs_d, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)
    first_row = pid.to(tl.int64) * rows_per_program
    for i in range(tl.minimum(rows - first_row, rows_per_program)):
        row = first_row + i
        x = tl.load(x_ptr + row * stride_x_row + offs_d, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dy_row + offs_d, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        n = x * rstd
        g = dy * w
        dx = rstd * (g - n * (tl.sum(g * n, axis=0) / width))
        tl.store(dx_ptr + row * stride_dx_row + offs_d, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * n.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dw_partial_ptr + pid * width + offs_d, dw, mask=mask)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """[..., width] -> [rows, width] with unit stride along the row (a copy only where needed)."""
    t = t.reshape(-1, width)
    return t if t.stride(-1) == 1 else t.contiguous()


def rms_norm_forward(x_ND: torch.Tensor, weight_D: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y [N, D] (dtype promote(x, weight)) and 1/rms [N] fp32 of rows x [N, D]."""
    N, D = x_ND.shape
    y_ND = torch.empty(N, D, dtype=torch.promote_types(x_ND.dtype, weight_D.dtype), device=x_ND.device)
    rstd_N = torch.empty(N, dtype=torch.float32, device=x_ND.device)
    if N:
        _rms_norm_fwd_kernel[(N,)](x_ND, weight_D, y_ND, rstd_N, D, eps, x_ND.stride(0), y_ND.stride(0),
                                   **launch_options(D))
    return y_ND, rstd_N


def rms_norm_backward(dy_ND: torch.Tensor, x_ND: torch.Tensor, weight_D: torch.Tensor,
                      rstd_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [N, D] in x's dtype, dweight [D] in the weight's dtype)."""
    N, D = x_ND.shape
    dx_ND = torch.empty_like(x_ND)
    if N == 0:
        return dx_ND, torch.zeros_like(weight_D)
    programs, rows_per_program = backward_programs(N, x_ND.device)
    dw_partial_PD = torch.empty(programs, D, dtype=torch.float32, device=x_ND.device)
    _rms_norm_bwd_kernel[(programs,)](
        dy_ND, x_ND, weight_D, rstd_N, dx_ND, dw_partial_PD,
        N, D, rows_per_program, dy_ND.stride(0), x_ND.stride(0), dx_ND.stride(0),
        **launch_options(D),
    )
    return dx_ND, dw_partial_PD.sum(0).to(weight_D.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        x_ND = _rows(x, x.shape[-1])
        y_ND, rstd_N = rms_norm_forward(x_ND, weight, eps)
        ctx.save_for_backward(x_ND, weight, rstd_N)
        return y_ND.view(*x.shape[:-1], y_ND.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x_ND, weight, rstd_N = ctx.saved_tensors
        dx_ND, dweight = rms_norm_backward(_rows(dy, x_ND.shape[1]), x_ND, weight, rstd_N)
        return dx_ND.view(dy.shape), dweight, None


# Without a GPU the tests run this module under TRITON_INTERPRET=1 (tests/kernels/conftest.py).
_INTERPRETED = not isinstance(_rms_norm_fwd_kernel, triton.runtime.JITFunction)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`ops.rms_norm` in Triton, with autograd: same signature and result dtype as `rms_norm_torch`."""
    assert x.shape[-1] == weight.shape[-1] and weight.dim() == 1, "weight must be [D] for x [..., D]"
    assert x.is_cuda or _INTERPRETED, "the Triton kernels need CUDA tensors (CPU only under TRITON_INTERPRET=1)"
    return _RMSNorm.apply(x, weight, eps)


OPS = {"rms_norm": rms_norm}
"""What this module registers under the implementation name "triton"."""


def register() -> list[tuple[str, str]]:
    """Register OPS with `m2rl.model.ops` (done on import); registering never changes which one is selected."""
    return ops.register_implementations("triton", OPS)


register()
