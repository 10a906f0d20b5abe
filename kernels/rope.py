"""M2's q/k RMSNorm fused with its partial NeoX RoPE in Triton, forward and backward.

PyTorch reference: `m2rl.model.ops.qk_norm_rope_torch`, what attention.py computed inline before:

    q = rms_norm(q_BTQ, q_weight)           # ONE norm over the whole projection (Q = 48 heads x 128)
    q_BHTD = q.view(B, T, H, Dh).transpose(1, 2)
    q_BHTD = apply_partial_rope(q_BHTD, cos, sin)      # dims [0, R) of each head rotate, [R, Dh) pass
    (k likewise, with its own weight and Hkv heads)

Forward: one program per token row (6144 wide for q, 1024 for k) loads the row, sums squares in fp32,
normalises and multiplies by the weight, rounding where the reference rounds (to the row's dtype after
the normalisation, after the weight, after each of x*cos and rotate_half(x)*sin, after their sum); then
the first R dims of each head rotate with cos/sin at the token's position. Rotate-half pairs dim i with
i +- R/2 of the same head: the program loads the row a second time at those partner offsets (from cache)
and normalises them with the same 1/rms, so no register shuffles are needed. Each head's Dh values are
stored straight into a contiguous [B, H, T, Dh] output, the reference's layout (its torch.cat makes one).

Backward, in Triton as well: the rotation's transpose applied to dy in registers (partner dims loaded
like the forward's), then RMSNorm's backward as in kernels/rms_norm.py (dweight in per-program fp32
partial rows, summed by torch). cos/sin are not differentiated (positions carry no gradient; where they
require grad the torch reference runs). Nothing syncs with the host (CUDA-graph safe).

One dtype throughout (activations, norm weights and cos/sin: the model's case); a mix runs the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from m2rl.kernels.rms_norm import backward_programs, launch_options
from m2rl.model import ops


def bytes_moved(tokens: int, q_width: int, k_width: int, rotary_dim: int, elem_bytes: int,
                backward: bool = False, programs: int = 0) -> int:
    """Least HBM traffic of q and k together, one dtype of `elem_bytes`. Forward: rows read and written,
    weights and one cos/sin row per token read, 1/rms (fp32) written. Backward: dy and x read, dx written,
    cos/sin, weights and 1/rms read, `programs` fp32 partial dweight rows per projection written and read
    back, dweight written."""
    width = q_width + k_width
    rope = 2 * tokens * rotary_dim * elem_bytes
    if not backward:
        return 2 * tokens * width * elem_bytes + width * elem_bytes + rope + 2 * tokens * 4
    return (3 * tokens * width * elem_bytes + rope + 2 * tokens * 4 + 2 * width * elem_bytes
            + 2 * programs * width * 4)


@triton.jit
def _rope_layout(offs_d, width, HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr):
    """Per element of a row: its dim within its head, whether it rotates, whether it is in the first
    half of the rotary dims, and the row offset of its rotate-half partner."""
    dim = offs_d % HEAD_DIM
    rotates = (dim < ROTARY_DIM) & (offs_d < width)
    first_half = dim < ROTARY_DIM // 2
    partner = tl.where(first_half, offs_d + ROTARY_DIM // 2, offs_d - ROTARY_DIM // 2)
    return dim, rotates, first_half, partner


@triton.jit
def _qk_norm_rope_fwd_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, y_ptr, rstd_ptr,
    width, seq_len, eps,
    stride_x_row, stride_y_b, stride_y_h, stride_y_t,
    stride_cos_b, stride_cos_t, stride_sin_b, stride_sin_t,
    HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b, t = row // seq_len, row % seq_len
    dt = y_ptr.dtype.element_ty
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs_d < width
    dim, rotates, first_half, partner = _rope_layout(offs_d, width, HEAD_DIM, ROTARY_DIM)

    x_row = x_ptr + row * stride_x_row
    x = tl.load(x_row + offs_d, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / width + eps)
    w = tl.load(w_ptr + offs_d, mask=mask, other=0.0).to(tl.float32)
    normed = ((x * rstd).to(dt).to(tl.float32) * w).to(dt).to(tl.float32)

    x_partner = tl.load(x_row + partner, mask=rotates, other=0.0).to(tl.float32)
    w_partner = tl.load(w_ptr + partner, mask=rotates, other=0.0).to(tl.float32)
    normed_partner = ((x_partner * rstd).to(dt).to(tl.float32) * w_partner).to(dt).to(tl.float32)
    rotated = tl.where(first_half, -normed_partner, normed_partner)  # rotate_half: cat(-x2, x1)
    cos = tl.load(cos_ptr + b * stride_cos_b + t * stride_cos_t + dim, mask=rotates, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + b * stride_sin_b + t * stride_sin_t + dim, mask=rotates, other=0.0).to(tl.float32)
    y = (normed * cos).to(dt).to(tl.float32) + (rotated * sin).to(dt).to(tl.float32)
    y = tl.where(rotates, y, normed)

    y_offs = b * stride_y_b + (offs_d // HEAD_DIM) * stride_y_h + t * stride_y_t + dim  # [B, H, T, Dh]
    tl.store(y_ptr + y_offs, y.to(dt), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _qk_norm_rope_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, cos_ptr, sin_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
    rows, width, seq_len, rows_per_program,
    stride_dy_b, stride_dy_h, stride_dy_t, stride_x_row, stride_dx_row,
    stride_cos_b, stride_cos_t, stride_sin_b, stride_sin_t,
    HEAD_DIM: tl.constexpr, ROTARY_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """With n the normed row before the rotation: y_i = n_i cos_i - n_p sin_i (first half, p = i + R/2) and
    y_p = n_p cos_p + n_i sin_p, so dn_i = dy_i cos_i + dy_p sin_p (first half), dy_i cos_i - dy_p sin_p
    (second half), dy_i past R; then dx and dweight as RMSNorm's backward."""
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    mask = offs_d < width
    dim, rotates, first_half, partner = _rope_layout(offs_d, width, HEAD_DIM, ROTARY_DIM)
    head, partner_dim = offs_d // HEAD_DIM, partner % HEAD_DIM
    sign = tl.where(first_half, 1.0, -1.0)
    w = tl.load(w_ptr + offs_d, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), dtype=tl.float32)

    first_row = pid.to(tl.int64) * rows_per_program
    for i in range(tl.minimum(rows - first_row, rows_per_program)):
        row = first_row + i
        b, t = row // seq_len, row % seq_len
        dy_token = dy_ptr + b * stride_dy_b + t * stride_dy_t + head * stride_dy_h  # [B, H, T, Dh]
        dy = tl.load(dy_token + dim, mask=mask, other=0.0).to(tl.float32)
        dy_partner = tl.load(dy_token + partner_dim, mask=rotates, other=0.0).to(tl.float32)
        cos_row = cos_ptr + b * stride_cos_b + t * stride_cos_t
        sin_row = sin_ptr + b * stride_sin_b + t * stride_sin_t
        cos = tl.load(cos_row + dim, mask=rotates, other=0.0).to(tl.float32)
        sin_partner = tl.load(sin_row + partner_dim, mask=rotates, other=0.0).to(tl.float32)
        dn = tl.where(rotates, dy * cos + sign * dy_partner * sin_partner, dy)

        x = tl.load(x_ptr + row * stride_x_row + offs_d, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        n = x * rstd
        g = dn * w
        dx = rstd * (g - n * (tl.sum(g * n, axis=0) / width))
        tl.store(dx_ptr + row * stride_dx_row + offs_d, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dn * n.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(dw_partial_ptr + pid * width + offs_d, dw, mask=mask)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    t = t.reshape(-1, width)
    return t if t.stride(-1) == 1 else t.contiguous()


def _rope_table(table_BTR: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """cos or sin broadcast to [B, T, R] (stride 0 where it was broadcast), unit stride along R."""
    table = table_BTR.expand(B, T, table_BTR.shape[-1])
    return table if table.stride(-1) == 1 else table.contiguous()


def norm_rope_forward(x_BTX: torch.Tensor, weight: torch.Tensor, eps: float, cos_BTR: torch.Tensor,
                      sin_BTR: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One projection x [B, T, H*Dh] -> (y [B, H, T, Dh] contiguous, normed and rotated; 1/rms [B*T] fp32).
    cos/sin [B, T, R] (`_rope_table`)."""
    B, T, X = x_BTX.shape
    x_NX = _rows(x_BTX, X)
    y_BHTD = torch.empty(B, n_heads, T, X // n_heads, dtype=x_BTX.dtype, device=x_BTX.device)
    rstd_N = torch.empty(B * T, dtype=torch.float32, device=x_BTX.device)
    if B * T:
        _qk_norm_rope_fwd_kernel[(B * T,)](
            x_NX, weight, cos_BTR, sin_BTR, y_BHTD, rstd_N, X, T, eps,
            x_NX.stride(0), *y_BHTD.stride()[:3], *cos_BTR.stride()[:2], *sin_BTR.stride()[:2],
            HEAD_DIM=X // n_heads, ROTARY_DIM=cos_BTR.shape[-1], **launch_options(X),
        )
    return y_BHTD, rstd_N


def norm_rope_backward(dy_BHTD: torch.Tensor, x_NX: torch.Tensor, weight: torch.Tensor, cos_BTR: torch.Tensor,
                       sin_BTR: torch.Tensor, rstd_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx [B*T, X] in x's dtype, dweight [X] in the weight's dtype); dy [B, H, T, Dh] in any strides with
    unit stride along Dh."""
    N, X = x_NX.shape
    dx_NX = torch.empty_like(x_NX)
    if N == 0:
        return dx_NX, torch.zeros_like(weight)
    if dy_BHTD.stride(-1) != 1:
        dy_BHTD = dy_BHTD.contiguous()
    programs, rows_per_program = backward_programs(N, x_NX.device)
    dw_partial_PX = torch.empty(programs, X, dtype=torch.float32, device=x_NX.device)
    _qk_norm_rope_bwd_kernel[(programs,)](
        dy_BHTD, x_NX, weight, cos_BTR, sin_BTR, rstd_N, dx_NX, dw_partial_PX,
        N, X, cos_BTR.shape[1], rows_per_program,
        *dy_BHTD.stride()[:3], x_NX.stride(0), dx_NX.stride(0), *cos_BTR.stride()[:2], *sin_BTR.stride()[:2],
        HEAD_DIM=dy_BHTD.shape[-1], ROTARY_DIM=cos_BTR.shape[-1], **launch_options(X),
    )
    return dx_NX, dw_partial_PX.sum(0).to(weight.dtype)


class _NormRope(torch.autograd.Function):
    """RMSNorm over the whole row then partial RoPE per head, for one projection [B, T, H*Dh] -> [B, H, T, Dh]."""

    @staticmethod
    def forward(ctx, x_BTX: torch.Tensor, weight: torch.Tensor, eps: float, cos_BTR: torch.Tensor,  # type: ignore[override]
                sin_BTR: torch.Tensor, n_heads: int) -> torch.Tensor:
        B, T, X = x_BTX.shape
        cos_BTR, sin_BTR = _rope_table(cos_BTR, B, T), _rope_table(sin_BTR, B, T)
        y_BHTD, rstd_N = norm_rope_forward(x_BTX, weight, eps, cos_BTR, sin_BTR, n_heads)
        ctx.save_for_backward(_rows(x_BTX, X), weight, cos_BTR, sin_BTR, rstd_N)
        return y_BHTD

    @staticmethod
    def backward(ctx, dy_BHTD: torch.Tensor):  # type: ignore[override]
        x_NX, weight, cos_BTR, sin_BTR, rstd_N = ctx.saved_tensors
        dx_NX, dweight = norm_rope_backward(dy_BHTD, x_NX, weight, cos_BTR, sin_BTR, rstd_N)
        B, T = cos_BTR.shape[:2]
        return dx_NX.view(B, T, x_NX.shape[1]), dweight, None, None, None, None


# Without a GPU the tests run this module under TRITON_INTERPRET=1 (tests/kernels/conftest.py).
_INTERPRETED = not isinstance(_qk_norm_rope_fwd_kernel, triton.runtime.JITFunction)


def qk_norm_rope(q_BTQ: torch.Tensor, k_BTK: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 eps: float, cos_BTR: torch.Tensor, sin_BTR: torch.Tensor, n_heads: int,
                 n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`ops.qk_norm_rope` in Triton, with autograd: same signature, results and layout as
    `qk_norm_rope_torch` (q [B, H, T, Dh] and k [B, Hkv, T, Dh], contiguous)."""
    B, T, Q = q_BTQ.shape
    head_dim, rotary_dim = Q // n_heads, cos_BTR.shape[-1]
    assert Q == n_heads * head_dim and k_BTK.shape == (B, T, n_kv * head_dim), \
        f"q [B, T, {n_heads} x Dh] and k [B, T, {n_kv} x Dh] expected, got {tuple(q_BTQ.shape)}, {tuple(k_BTK.shape)}"
    assert rotary_dim % 2 == 0 and rotary_dim <= head_dim and sin_BTR.shape == cos_BTR.shape
    assert q_BTQ.is_cuda or _INTERPRETED, "the Triton kernels need CUDA tensors (CPU only under TRITON_INTERPRET=1)"
    one_dtype = len({t.dtype for t in (q_BTQ, k_BTK, q_weight, k_weight, cos_BTR, sin_BTR)}) == 1
    if not one_dtype or cos_BTR.requires_grad or sin_BTR.requires_grad:
        return ops.qk_norm_rope_torch(q_BTQ, k_BTK, q_weight, k_weight, eps, cos_BTR, sin_BTR, n_heads, n_kv)
    return (_NormRope.apply(q_BTQ, q_weight, eps, cos_BTR, sin_BTR, n_heads),
            _NormRope.apply(k_BTK, k_weight, eps, cos_BTR, sin_BTR, n_kv))


OPS = {"qk_norm_rope": qk_norm_rope}
"""What this module registers under the implementation name "triton"."""


def register() -> list[tuple[str, str]]:
    """Register OPS with `m2rl.model.ops` (done on import); registering never changes which one is selected."""
    return ops.register_implementations("triton", OPS)


register()
