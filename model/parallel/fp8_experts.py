"""One rank's MoE experts in FP8 (e4m3) with 128x128 block scales, the released checkpoint's format.

    w1, w3  [E, I, D] float8_e4m3fn     w1_scale_inv, w3_scale_inv  [E, ceil(I/128), ceil(D/128)] fp32
    w2      [E, D, I] float8_e4m3fn     w2_scale_inv                [E, ceil(D/128), ceil(I/128)] fp32
    real weight = fp8 * scale_inv, block by block (the "inverse" scale multiplies, as in model/fp8.py)

The forward reads only the experts the tokens route to. Routing arrives as local ids (`localize_experts`:
-1 where another rank owns the expert) and fp32 weights. Two implementations of one contract:

- `moe_experts_local_torch` (reference, any device; also runs `DenseExperts`, the FP8-off variant): decode-sized batches (T*K <= gather_max) gather each slot's
  expert by index and dequantise it (no host sync; a slot owned elsewhere reads expert 0 and is weighted 0);
  bigger batches dequantise each expert hit once (a host sync for the list of experts).
  Bytes per step and layer: gather reads T*K * 3*I*D fp8 and writes/reads them again as bf16 (~7 B per
  weight element moved, x2 for the slots another rank owns).
- `fp8_moe_triton` (CUDA): two grouped GEMM kernels that load each hit expert's fp8 tiles once per block of
  BLOCK_M of its rows, convert them to the activation dtype in registers and scale the partial product by
  the tile's block scale. Bytes per step and layer: n_hit * (3*I*D fp8 + scales) + activations, where
  n_hit is the number of distinct local experts the batch routes to; nothing is dequantised to memory. No
  host sync (sort by expert on device, programs of unrouted experts exit at once): graph-capturable.

Shape suffixes: T tokens, D hidden, I expert width, E local experts, K slots per token, N = T*K pairs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from m2rl.model.fp8 import FP8_DTYPE, FP8_MAX, quantize_fp8_blocks
from torch import nn

try:  # the kernels are optional: CPU-only installs run the torch reference
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None

# Up to this many (token, slot) pairs the torch path gathers per slot (sync-free, graph-capturable).
GATHER_MAX_PAIRS = 64

MATRICES = ("w1", "w3", "w2")


def fp8_expert_bytes(hidden: int, inter: int, block: tuple[int, int] = (128, 128)) -> int:
    """Bytes one expert occupies (and a step reads when the expert is hit): fp8 weights plus fp32 scales."""
    scales = 2 * math.ceil(inter / block[0]) * math.ceil(hidden / block[1]) + \
        math.ceil(hidden / block[0]) * math.ceil(inter / block[1])
    return 3 * hidden * inter + 4 * scales


class Fp8Experts(nn.Module):
    """`num_experts` SwiGLU experts, w2(silu(w1 x) * w3 x), stored as FP8 blocks; buffers, inference only."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 block: tuple[int, int] = (128, 128), device: torch.device | str | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.block = (int(block[0]), int(block[1]))
        self.backend = backend  # "auto": triton on CUDA when available, else torch
        E, D, I = num_experts, hidden_size, intermediate_size
        for name, (rows, cols) in (("w1", (I, D)), ("w3", (I, D)), ("w2", (D, I))):
            self.register_buffer(name, torch.empty(E, rows, cols, dtype=FP8_DTYPE, device=device))
            scale_shape = (E, math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1]))
            self.register_buffer(f"{name}_scale_inv", torch.empty(scale_shape, dtype=torch.float32, device=device))

    def scale_inv(self, name: str) -> torch.Tensor:
        return getattr(self, f"{name}_scale_inv")

    # ---- filling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def random_(self, std: float = 0.02, seed: int = 0, max_chunk: int = 1 << 28) -> Fp8Experts:
        """Weights ~ normal(0, std) clipped at 4 std, as fp8 codes with one scale 4*std/448 per block.

        Generated on the buffers' device in chunks of at most max_chunk elements (a bf16 temporary), so
        filling 115 GB takes seconds on a GPU; deterministic for a given seed and device."""
        gen = torch.Generator(device=self.w1.device)
        gen.manual_seed(seed)
        for name in MATRICES:
            flat = getattr(self, name).view(-1)
            for start in range(0, flat.numel(), max_chunk):
                n = min(max_chunk, flat.numel() - start)
                codes = torch.randn(n, generator=gen, device=flat.device, dtype=torch.bfloat16)
                flat[start:start + n].copy_(codes.mul_(FP8_MAX / 4).clamp_(-FP8_MAX, FP8_MAX))
                del codes
            self.scale_inv(name).fill_(4 * std / FP8_MAX)
        return self

    @torch.no_grad()
    def load_(self, name: str, weight: torch.Tensor, scale_inv: torch.Tensor | None = None) -> None:
        """Fill matrix `name` from fp8 codes and their scales, or quantise a dense [E, O, I] weight."""
        dst = getattr(self, name)
        if scale_inv is None:
            if weight.shape != dst.shape:
                raise ValueError(f"{name}: expected shape {tuple(dst.shape)}, got {tuple(weight.shape)}")
            for e in range(weight.shape[0]):
                codes, scale = quantize_fp8_blocks(weight[e].to(dst.device), self.block)
                dst[e].copy_(codes)
                self.scale_inv(name)[e].copy_(scale)
            return
        if weight.dtype != FP8_DTYPE or weight.shape != dst.shape or scale_inv.shape != self.scale_inv(name).shape:
            raise ValueError(f"{name}: expected fp8 {tuple(dst.shape)} and scales {tuple(self.scale_inv(name).shape)}, "
                             f"got {weight.dtype} {tuple(weight.shape)} and {tuple(scale_inv.shape)}")
        dst.copy_(weight)
        self.scale_inv(name).copy_(scale_inv)

    # ---- forward ----------------------------------------------------------------------------------
    def dequantized(self, name: str, idx_N: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[N, O, I] weights of experts idx_N in `dtype` (product in fp32, as model/fp8.py)."""
        return dequantize_gathered(getattr(self, name), self.scale_inv(name), idx_N, self.block, dtype)

    def resolved_backend(self, x_TD: torch.Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        usable = triton is not None and x_TD.is_cuda and x_TD.dtype in (torch.bfloat16, torch.float16)
        return "triton" if usable and triton_blocks_ok(self.block) else "torch"

    def forward(self, x_TD: torch.Tensor, local_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """This rank's share of sum_k w[t,k] * expert_k(x_t): slots with local id -1 contribute 0."""
        if self.resolved_backend(x_TD) == "triton":
            return fp8_moe_triton(x_TD, self, local_TK, weights_TK)
        return moe_experts_local_torch(x_TD, self, local_TK, weights_TK)


class DenseExperts(nn.Module):
    """The FP8-off variant (bf16 or fp32 stacked weights, as model/moe.py), same forward contract."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        E, D, I = num_experts, hidden_size, intermediate_size
        for name, shape in (("w1", (E, I, D)), ("w3", (E, I, D)), ("w2", (E, D, I))):
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))

    @torch.no_grad()
    def random_(self, std: float = 0.02, seed: int = 0) -> DenseExperts:
        gen = torch.Generator(device=self.w1.device)
        gen.manual_seed(seed)
        for name in MATRICES:
            getattr(self, name).normal_(0.0, std, generator=gen)
        return self

    @torch.no_grad()
    def load_(self, name: str, weight: torch.Tensor) -> None:
        getattr(self, name).copy_(weight)

    def dequantized(self, name: str, idx_N: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return getattr(self, name)[idx_N].to(dtype)

    def forward(self, x_TD: torch.Tensor, local_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        return moe_experts_local_torch(x_TD, self, local_TK, weights_TK)


def dequantize_gathered(w_EOI: torch.Tensor, scale_EBC: torch.Tensor, idx_N: torch.Tensor,
                        block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    _, O, I = w_EOI.shape
    w_NOI = w_EOI[idx_N].float()
    s_NBC = scale_EBC[idx_N]
    if O % block[0] == 0 and I % block[1] == 0:
        N, nb, nc = s_NBC.shape
        w_NOI = (w_NOI.view(N, nb, block[0], nc, block[1]) * s_NBC[:, :, None, :, None]).view(N, O, I)
    else:
        s_NOI = s_NBC.repeat_interleave(block[0], 1)[:, :O].repeat_interleave(block[1], 2)[:, :, :I]
        w_NOI = w_NOI * s_NOI
    return w_NOI.to(dtype)


def moe_experts_local_torch(x_TD: torch.Tensor, experts: Fp8Experts | DenseExperts, local_TK: torch.Tensor,
                            weights_TK: torch.Tensor, gather_max: int = GATHER_MAX_PAIRS) -> torch.Tensor:
    """Reference: the routed experts' weights in x's dtype (`experts.dequantized`), then the math of
    ops.moe_experts_torch on this rank's slots."""
    T, K = local_TK.shape
    mine_TK = local_TK >= 0
    if T * K <= gather_max:
        e_N = local_TK.clamp(min=0).reshape(-1)
        w_N = torch.where(mine_TK, weights_TK, torch.zeros_like(weights_TK)).reshape(-1, 1)
        x_ND1 = x_TD.repeat_interleave(K, dim=0)[:, :, None]
        h_NI1 = F.silu(torch.bmm(experts.dequantized("w1", e_N, x_TD.dtype), x_ND1)) * \
            torch.bmm(experts.dequantized("w3", e_N, x_TD.dtype), x_ND1)
        y_ND = torch.bmm(experts.dequantized("w2", e_N, x_TD.dtype), h_NI1)[..., 0] * w_N
        return y_ND.view(T, K, -1).sum(1).to(x_TD.dtype)
    out_TD = torch.zeros_like(x_TD)
    flat_local = local_TK.reshape(-1)
    pairs = torch.nonzero(flat_local >= 0).squeeze(1)  # host sync: this path is eager-only
    if pairs.numel() == 0:
        return out_TD
    order = pairs[torch.argsort(flat_local[pairs], stable=True)]
    counts = torch.bincount(flat_local[order], minlength=experts.num_experts).tolist()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[start:start + n]
        tokens = rows // K
        idx = torch.tensor([e], device=x_TD.device)
        w1, w3, w2 = (experts.dequantized(name, idx, x_TD.dtype)[0] for name in MATRICES)
        x_ND = x_TD[tokens]
        h_NI = F.silu(x_ND @ w1.t()) * (x_ND @ w3.t())
        y_ND = (h_NI @ w2.t()) * weights_TK.reshape(-1)[rows, None]
        out_TD.index_add_(0, tokens, y_ND.to(x_TD.dtype))
        start += n
    return out_TD


# ---- Triton: grouped GEMMs over FP8 block-scaled expert weights --------------------------------------
def triton_blocks_ok(block: tuple[int, int]) -> bool:
    """The kernels put each weight tile inside one scale block: block sides must be powers of two >= 16."""
    return all(b >= 16 and b & (b - 1) == 0 for b in block)


if triton is not None:

    @triton.jit
    def _fp8_gate_up_kernel(
        x_ptr, w1_ptr, w3_ptr, s1_ptr, s3_ptr, h_ptr, rows_ptr, counts_ptr, starts_ptr,
        D, I, TOP_K,
        stride_xt, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_hn,
        SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """h[r, n] = silu(x[r // K] . w1[e, n]) * (x[r // K] . w3[e, n]) for the rows r routed to expert e."""
        e = tl.program_id(0)
        pid_n = tl.program_id(1)
        count = tl.load(counts_ptr + e)
        if count == 0:  # most experts are idle at decode: their weights are never read
            return
        start = tl.load(starts_ptr + e)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_mask = offs_n < I
        e64 = e.to(tl.int64)
        w1_base = w1_ptr + e64 * stride_we
        w3_base = w3_ptr + e64 * stride_we
        s_row = e64 * stride_se + ((pid_n * BLOCK_N) // SCALE_N) * stride_sn
        for m0 in range(0, count, BLOCK_M):
            m_mask = m0 + offs_m < count
            rows = tl.load(rows_ptr + start + m0 + offs_m, mask=m_mask, other=0)
            tokens = rows // TOP_K
            acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                k_idx = k0 + offs_k
                k_mask = k_idx < D
                a = tl.load(x_ptr + tokens[:, None] * stride_xt + k_idx[None, :],
                            mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                w_offs = offs_n[None, :] * stride_wn + k_idx[:, None] * stride_wk  # [BLOCK_K, BLOCK_N]
                w_mask = n_mask[None, :] & k_mask[:, None]
                b1 = tl.load(w1_base + w_offs, mask=w_mask, other=0.0).to(a.dtype)
                b3 = tl.load(w3_base + w_offs, mask=w_mask, other=0.0).to(a.dtype)
                s_off = s_row + (k0 // SCALE_K) * stride_sk
                acc1 += tl.dot(a, b1) * tl.load(s1_ptr + s_off)
                acc3 += tl.dot(a, b3) * tl.load(s3_ptr + s_off)
            h = acc1 * tl.sigmoid(acc1) * acc3
            tl.store(h_ptr + rows[:, None] * stride_hn + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
                     mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _fp8_down_kernel(
        h_ptr, w2_ptr, s2_ptr, gate_ptr, y_ptr, rows_ptr, counts_ptr, starts_ptr,
        D, I,
        stride_hn, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_yn,
        SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """y[r, n] = gate[r] * (h[r] . w2[e, n]) for the rows r routed to expert e."""
        e = tl.program_id(0)
        pid_n = tl.program_id(1)
        count = tl.load(counts_ptr + e)
        if count == 0:
            return
        start = tl.load(starts_ptr + e)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        n_mask = offs_n < D
        e64 = e.to(tl.int64)
        w2_base = w2_ptr + e64 * stride_we
        s_row = e64 * stride_se + ((pid_n * BLOCK_N) // SCALE_N) * stride_sn
        for m0 in range(0, count, BLOCK_M):
            m_mask = m0 + offs_m < count
            rows = tl.load(rows_ptr + start + m0 + offs_m, mask=m_mask, other=0)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, I, BLOCK_K):
                k_idx = k0 + offs_k
                k_mask = k_idx < I
                a = tl.load(h_ptr + rows[:, None] * stride_hn + k_idx[None, :],
                            mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                b = tl.load(w2_base + offs_n[None, :] * stride_wn + k_idx[:, None] * stride_wk,
                            mask=n_mask[None, :] & k_mask[:, None], other=0.0).to(a.dtype)
                acc += tl.dot(a, b) * tl.load(s2_ptr + s_row + (k0 // SCALE_K) * stride_sk)
            gate = tl.load(gate_ptr + rows, mask=m_mask, other=0.0)
            y = acc * gate[:, None]
            tl.store(y_ptr + rows[:, None] * stride_yn + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
                     mask=m_mask[:, None] & n_mask[None, :])


def fp8_moe_triton(x_TD: torch.Tensor, experts: Fp8Experts, local_TK: torch.Tensor,
                   weights_TK: torch.Tensor) -> torch.Tensor:
    """Same contract as fp8_moe_torch; x in bf16 or fp16 (the dtype tl.dot runs in)."""
    assert triton is not None, "fp8_moe_triton needs triton"
    assert x_TD.dtype in (torch.bfloat16, torch.float16), f"x must be bf16 or fp16, got {x_TD.dtype}"
    assert triton_blocks_ok(experts.block), f"block {experts.block}: sides must be powers of two >= 16"
    x_TD = x_TD.contiguous()
    T, K = local_TK.shape
    E, D, I = experts.num_experts, experts.hidden_size, experts.intermediate_size
    N = T * K
    device = x_TD.device
    # Sort the (token, slot) pairs by local expert on device; pairs owned elsewhere go to bucket E (no program).
    key_N = torch.where(local_TK >= 0, local_TK, torch.full_like(local_TK, E)).reshape(-1)
    rows_N = torch.argsort(key_N, stable=True)
    counts = torch.zeros(E + 1, dtype=torch.int32, device=device)
    counts.scatter_add_(0, key_N, torch.ones(N, dtype=torch.int32, device=device))
    starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    gate_N = weights_TK.reshape(-1).float().contiguous()

    # Decode (a few rows per expert): small tiles, many programs to keep every SM streaming weights.
    few_rows = N <= 16 * E
    block_m = 16 if few_rows else 64
    block_n = min(32 if few_rows else 64, experts.block[0])
    block_k = min(128, experts.block[1])
    num_stages = 3

    h_NI = torch.empty(N, I, dtype=x_TD.dtype, device=device)
    w1, w3, w2 = experts.w1, experts.w3, experts.w2
    s1, s3, s2 = (experts.scale_inv(name) for name in MATRICES)
    _fp8_gate_up_kernel[(E, triton.cdiv(I, block_n))](
        x_TD, w1, w3, s1, s3, h_NI, rows_N, counts, starts, D, I, K,
        x_TD.stride(0), w1.stride(0), w1.stride(1), w1.stride(2), s1.stride(0), s1.stride(1), s1.stride(2),
        h_NI.stride(0),
        SCALE_N=experts.block[0], SCALE_K=experts.block[1], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4, num_stages=num_stages)
    y_ND = torch.zeros(N, D, dtype=x_TD.dtype, device=device)  # rows of other ranks' pairs stay 0
    _fp8_down_kernel[(E, triton.cdiv(D, block_n))](
        h_NI, w2, s2, gate_N, y_ND, rows_N, counts, starts, D, I,
        h_NI.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), s2.stride(0), s2.stride(1), s2.stride(2),
        y_ND.stride(0),
        SCALE_N=experts.block[0], SCALE_K=experts.block[1], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4, num_stages=num_stages)
    return y_ND.view(T, K, D).sum(1)
