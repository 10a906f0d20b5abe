"""Linear + log-softmax + gather with Triton: per-token log-probs (and entropy) through the LM head,
forward and backward, without ever holding the [N, V] logits.

PyTorch reference: `m2rl.model.ops.linear_logprobs_torch` (chunks of rows, checkpointed). For row n

    z_n       = h_n @ W^T / temperature        [V] fp32
    logprob_n = z_n[t_n] - logsumexp(z_n)
    entropy_n = -sum_v p_nv log p_nv,  p_n = softmax(z_n)

Two designs, picked by the row count N (`LogprobConfig.cublas_min_rows`, 512):

Small N (decode-sized): fused kernels, the "cut cross-entropy" idea (logits live in registers, one tile at a time).
  forward   one kernel over (row block, vocabulary tile) pairs. The [BLOCK_M, BLOCK_V] logits tile is a
            tl.dot over D with an fp32 accumulator; the tile's row max m_i, sum exp(z - m_i) s_i and
            sum exp(z - m_i)(z - m_i) u_i go to [V tiles, N] fp32 partials, and the program holding a row's
            target stores that logit. torch combines the partials as flash-decoding combines its splits:
            with M = max_i m_i, S = sum_i e^(m_i - M) s_i and U = sum_i e^(m_i - M) (u_i + (m_i - M) s_i),
            lse = M + log S and entropy = log S - U / S (every term relative to the max: no cancellation
            of large logits). Only lse and entropy ([N] each) are kept for backward.
  backward  dz = g_lp (onehot(t) - p) - g_ent p (log p + H), divided by the temperature (dH/dz_v =
            -p_v (log p_v + H); the entropy is differentiable too, though the learner only logs it). For
            vocabulary chunks of C columns a kernel recomputes the logits tiles and writes dz in the inputs'
            dtype into an [N, C] buffer; cuBLAS then computes dW[chunk] = dz^T @ H (the whole N reduction in
            one GEMM: fp32 accumulation, one rounding to W's dtype) and dH += dz @ W[chunk] into an fp32
            [N, D] accumulator, on a buffer of at most `grad_chunk_bytes` (256 MiB: N=16K, C=8192 in bf16).
  Below ~the GEMM's ridge point (H200: 989 TFLOP/s / 4.8 TB/s ~ 200 rows) reading W dominates, and these
  kernels read it once per row group without writing any logits: they win there.

Large N (N >= 512: the learner): cuBLAS GEMMs, Triton only for the passes over rows. Past the ridge point
  the logits GEMM is compute-bound and Triton's tl.dot GEMMs were the bottleneck (H200, 8192 tokens, bf16:
  ~470 TFLOP/s in the fused forward, ~455 in the backward's recompute, where cuBLAS runs the same shape at
  ~800), so the rows are cut into chunks (model/linear_logprobs_chunked.py's driver, shared with the torch
  `chunked` implementation) and per chunk of C rows:
  forward   cuBLAS writes the [C, V] logits (fp32, or in the inputs' dtype for fp32_logits=False), and
            `_row_stats_kernel` (one program per row, online max / sum exp / sum exp * shifted logit over
            tiles of `row_block_v` columns) reads them back: log-prob, lse (kept as max and log-sum: exact log p
            at the max), entropy per row.
  backward  cuBLAS recomputes the logits; `_row_grad_kernel` turns them into dz in W's dtype (in place when
            they already are in it); cuBLAS computes dH[chunk] = dz @ W and dW += dz^T @ H[chunk] (addmm_ in
            W's dtype: one rounding per chunk, see the driver's docstring).
  512 rows: comfortably past the ridge (compute 2.5x the time of reading W once at 512 rows) so cuBLAS's ~1.7x
  faster math outweighs the logits' round trip (below); the crossover is not measured yet (a config field).
  Chunks of `chunk_size` rows (the op's argument), fewer if the fp32 logits and dz would pass 1 GiB (768 rows
  at V=200064 in bf16).
Nothing syncs with the host. Targets outside [0, V) give a NaN log-prob in both designs.

Memory beyond the inputs and the gradients: fused forward 3 x [V/BLOCK_V, N] fp32 partials, backward one dz
chunk plus the [N, D] fp32 dH accumulator (and one [N, D] fp32 GEMM output); the large-N design one fp32 [C, V]
logits block and one dz block (<= 1 GiB) — against the naive head's [N, V] fp32 logits and their softmax
(24 GiB at N=16K, V=200064).

Cost: both designs run four GEMMs of 2*N*D*V flops (forward, the backward's recompute, dH, dW) where
materialised logits need three, so 4/3 of the bare matmuls' time is their floor (`flops`). HBM (`bytes_moved`):
the fused design moves only dz through memory (written once, read by both GEMMs); the large-N one also moves
the logits: per logit 4 bytes written by each of the two logits GEMMs and read by each row kernel (2 with
fp32_logits=False and bf16): 16 bytes forward and backward together, plus dz's 6 (bf16) — ~0.9 us per row at
M2's vocabulary (4.8 TB/s) against ~6 us per row for the four cuBLAS GEMMs (~800 TFLOP/s); and W is read once
per chunk by each GEMM. Predicted, not measured: at 8192 bf16 tokens with fp32_logits=False, 4 x 12.6 ms of
GEMMs + 2 x ~1.4 ms of row kernels ~ 53 ms forward+backward, against the fused design's measured 68.5 ms
(21.3 forward, 22 for the backward's dz kernel, 2 x 12.6 of cuBLAS).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl
from m2rl.model import linear_logprobs_chunked as chunked
from m2rl.model import ops
from torch.autograd.function import once_differentiable


@dataclasses.dataclass(frozen=True)
class LogprobConfig:
    """Tiles of the logits GEMM (forward and backward recompute) and the backward's chunking."""

    block_m: int = 128
    """token rows per program"""
    block_v: int = 128
    """vocabulary columns per program: one logits tile (its fp32 epilogue holds ~3 tiles in registers)"""
    block_k: int = 64
    """reduction step over D"""
    group_m: int = 8
    """row blocks that sweep the vocabulary tiles side by side, so each weight tile is read once from HBM"""
    num_warps: int = 8
    num_stages: int = 4
    grad_chunk_columns: int = 8192
    """vocabulary columns per backward chunk: the dz buffer is [N, columns], the GEMMs [N, C] x [C, D]"""
    grad_chunk_bytes: int = 256 << 20
    """the dz buffer's cap in bytes: fewer columns per chunk for large N"""
    cublas_min_rows: int = 512
    """rows from which the logits GEMMs run on cuBLAS and Triton does only the row passes (module docstring)"""
    row_block_v: int = 4096
    """vocabulary columns a row kernel loads at once"""
    row_num_warps: int = 8


def default_config(num_rows: int, elem_bytes: int = 2) -> LogprobConfig:
    """128 x 128 x 64 tiles, 4 stages, 8 warps: a Hopper GEMM shape of Triton's tutorials, its 128 x 256 halved
    so the softmax epilogue's fp32 tiles fit in registers; 64-row blocks when there are few rows. Not tuned
    on a GPU yet. 4-byte inputs (fp32) halve block_k so the pipeline stages
    still fit the 227 KiB of shared memory an H100/H200 block may use."""
    config = LogprobConfig(block_m=64 if num_rows <= 64 else 128)
    if elem_bytes > 2:
        config = dataclasses.replace(config, block_k=config.block_k * 2 // elem_bytes)
    return config


def shared_memory_bytes(config: LogprobConfig, elem_bytes: int) -> int:
    """The logits GEMM's pipeline: stages x (hidden tile + weight tile)."""
    return config.num_stages * (config.block_m + config.block_v) * config.block_k * elem_bytes


def grad_chunk_columns(num_rows: int, vocab: int, elem_bytes: int, config: LogprobConfig) -> int:
    """Vocabulary columns per backward chunk: `grad_chunk_columns`, fewer if the [N, C] dz buffer would pass
    `grad_chunk_bytes`, a multiple of block_v, at least one tile, at most V."""
    columns = min(config.grad_chunk_columns, config.grad_chunk_bytes // max(1, num_rows * elem_bytes))
    columns = max(config.block_v, columns // config.block_v * config.block_v)
    return min(columns, vocab)


def flops(num_rows: int, hidden: int, vocab: int, backward: bool = False) -> int:
    """Multiply-adds x 2 of the GEMMs run: the logits (forward); with backward also their recompute, dH
    and dW. The bare matmuls' count is 2*N*D*V forward and twice that backward."""
    return 2 * num_rows * hidden * vocab * (4 if backward else 1)


def bytes_moved(num_rows: int, hidden: int, vocab: int, elem_bytes: int, backward: bool = False,
                config: LogprobConfig | None = None, *, fp32_logits: bool = True, chunk_size: int = 1024) -> int:
    """Least HBM traffic of the design `num_rows` takes (module docstring). Fused: a pass of the logits GEMM
    reads W once per group of `group_m` row blocks (the group's H rows stay in L2) and H once; forward also
    writes and reads the three fp32 partials. Backward: another pass (the recompute), dz written once and read
    by both GEMMs, H read by each chunk's dW GEMM, W read by the dH GEMMs, dW and dH written, and per chunk
    the fp32 dH product written and added (read, accumulator read and written). Large N: `_chunked_bytes_moved`."""
    config = config or default_config(num_rows, elem_bytes)
    if num_rows >= config.cublas_min_rows:
        return _chunked_bytes_moved(num_rows, hidden, vocab, elem_bytes, backward, fp32_logits, chunk_size)
    w_bytes, h_bytes = vocab * hidden * elem_bytes, num_rows * hidden * elem_bytes
    row_groups = -(-num_rows // (config.block_m * config.group_m))
    logits_pass = row_groups * w_bytes + h_bytes
    tiles = -(-vocab // config.block_v)
    forward = logits_pass + 2 * 3 * tiles * num_rows * 4 + num_rows * (8 + 4 + 4 + 4)
    if not backward:
        return forward
    chunks = -(-vocab // grad_chunk_columns(num_rows, vocab, elem_bytes, config))
    dz = 3 * num_rows * vocab * elem_bytes
    gemms = chunks * (h_bytes + 4 * num_rows * hidden * 4) + 2 * w_bytes + h_bytes
    return forward + logits_pass + dz + gemms


def _chunked_bytes_moved(num_rows: int, hidden: int, vocab: int, elem_bytes: int, backward: bool,
                         fp32_logits: bool, chunk_size: int) -> int:
    """The large-N design: each GEMM reads W once per chunk (a chunk's H rows stay in L2) and its H rows once;
    the logits are written by the GEMM and read by the row kernel; backward also writes dz (in W's dtype),
    reads it in both GEMMs, reads H again in the dW GEMMs, writes dH, and writes dW once then reads and
    writes it per further chunk (addmm_)."""
    rows = chunked.chunk_rows(chunk_size, vocab, elem_bytes, fp32_blocks=1)
    chunks = -(-num_rows // rows)
    w_bytes, h_bytes = vocab * hidden * elem_bytes, num_rows * hidden * elem_bytes
    logit_bytes = 4 if fp32_logits else elem_bytes
    logits_pass = chunks * w_bytes + h_bytes + 2 * num_rows * vocab * logit_bytes
    forward = logits_pass + num_rows * (8 + 4 + 4 + 4)  # targets; log-prob, lse, entropy written
    if not backward:
        return forward
    dz = 3 * num_rows * vocab * elem_bytes
    gemms = chunks * w_bytes + 2 * h_bytes + (2 * chunks - 1) * w_bytes  # dH: W, dH; dW: H, dW updates
    return forward + logits_pass + dz + gemms


@triton.jit
def _tile_coords(pid, num_blocks_m, num_blocks_v, GROUP_M: tl.constexpr):
    """Program id -> (row block, vocabulary tile), GROUP_M row blocks sweeping the tiles side by side."""
    programs_per_group = GROUP_M * num_blocks_v
    first_m = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_rows
    pid_v = (pid % programs_per_group) // group_rows
    return pid_m, pid_v


@triton.jit
def _bf16_rounded(x, BF16_INTERPRETED: tl.constexpr):
    """fp32 x, which is about to be cast to bf16, already rounded to a bf16 value (nearest, ties to even)
    where the kernel is interpreted: the interpreter's fp32 -> bf16 cast truncates, compiled kernels round."""
    if BF16_INTERPRETED:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _logits_tile(h_ptr, w_ptr, offs_m, offs_v, num_rows, vocab_end, hidden, temperature,
                 stride_hn, stride_hd, stride_wv, stride_wd,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BF16_INTERPRETED: tl.constexpr,
                 ROUND_LOGITS: tl.constexpr, SCALED: tl.constexpr):
    """z[m, v] = h[m] . w[v] in fp32 ([BLOCK_M, BLOCK_V]; 0 where m or v is out of range), rounded through
    the inputs' dtype if ROUND_LOGITS, divided by the temperature if SCALED."""
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < num_rows
    v_mask = offs_v < vocab_end
    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hn + offs_k[None, :] * stride_hd  # [M, K]
    w_ptrs = w_ptr + offs_v[None, :].to(tl.int64) * stride_wv + offs_k[:, None] * stride_wd  # [K, V]
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_mask = offs_k < hidden - k0
        h = tl.load(h_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & v_mask[None, :], other=0.0)
        if BF16_INTERPRETED:
            h, w = h.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_K * stride_hd
        w_ptrs += BLOCK_K * stride_wd
    if ROUND_LOGITS:  # fp32_logits=False: the reference's F.linear(h, w).float()
        acc = _bf16_rounded(acc, BF16_INTERPRETED).to(h_ptr.dtype.element_ty).to(tl.float32)
    if SCALED:
        acc = acc / temperature
    return acc


@triton.jit
def _forward_kernel(
    h_ptr, w_ptr, targets_ptr, part_max_ptr, part_sum_ptr, part_ent_ptr, target_logit_ptr,
    num_rows, vocab, hidden, temperature,
    stride_hn, stride_hd, stride_wv, stride_wd,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BF16_INTERPRETED: tl.constexpr, ROUND_LOGITS: tl.constexpr, SCALED: tl.constexpr,
    ENTROPY: tl.constexpr,
):
    """One logits tile -> per-row (max, sum exp, sum exp * shifted logit) partials and the target logits."""
    pid_m, pid_v = _tile_coords(tl.program_id(0), tl.cdiv(num_rows, BLOCK_M), tl.cdiv(vocab, BLOCK_V), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    z = _logits_tile(h_ptr, w_ptr, offs_m, offs_v, num_rows, vocab, hidden, temperature,
                     stride_hn, stride_hd, stride_wv, stride_wd,
                     BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION, BF16_INTERPRETED, ROUND_LOGITS, SCALED)
    m_mask = offs_m < num_rows
    v_mask = offs_v < vocab
    z = tl.where(v_mask[None, :], z, float("-inf"))  # every tile has a real column: the max is finite

    targets = tl.load(targets_ptr + offs_m, mask=m_mask, other=-1)
    target_logit = tl.sum(tl.where(offs_v[None, :] == targets[:, None], z, 0.0), axis=1)
    in_tile = (targets >= pid_v * BLOCK_V) & (targets < pid_v * BLOCK_V + BLOCK_V) & (targets < vocab)
    tl.store(target_logit_ptr + offs_m, target_logit, mask=m_mask & in_tile)

    tile_max = tl.max(z, axis=1)
    shifted = z - tile_max[:, None]
    e = tl.exp(shifted)  # 0 in the padding columns
    part = pid_v * num_rows + offs_m.to(tl.int64)
    tl.store(part_max_ptr + part, tile_max, mask=m_mask)
    tl.store(part_sum_ptr + part, tl.sum(e, axis=1), mask=m_mask)
    if ENTROPY:
        # e * shifted is 0 * -inf in the padding columns: zero the logit there, not the product
        tl.store(part_ent_ptr + part, tl.sum(e * tl.where(v_mask[None, :], shifted, 0.0), axis=1), mask=m_mask)


@triton.jit
def _grad_logits_kernel(
    h_ptr, w_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_lp_ptr, grad_ent_ptr, dz_ptr,
    num_rows, vocab_start, vocab_end, hidden, temperature,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_dzn, stride_dzv,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BF16_INTERPRETED: tl.constexpr, ROUND_LOGITS: tl.constexpr, SCALED: tl.constexpr,
    ENTROPY_GRAD: tl.constexpr,
):
    """dz[m, v - vocab_start] for one logits tile of the chunk [vocab_start, vocab_end), recomputed."""
    pid_m, pid_v = _tile_coords(tl.program_id(0), tl.cdiv(num_rows, BLOCK_M),
                                tl.cdiv(vocab_end - vocab_start, BLOCK_V), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = vocab_start + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    z = _logits_tile(h_ptr, w_ptr, offs_m, offs_v, num_rows, vocab_end, hidden, temperature,
                     stride_hn, stride_hd, stride_wv, stride_wd,
                     BLOCK_M, BLOCK_V, BLOCK_K, DOT_PRECISION, BF16_INTERPRETED, ROUND_LOGITS, SCALED)
    m_mask = offs_m < num_rows
    v_mask = offs_v < vocab_end

    lse = tl.load(lse_ptr + offs_m, mask=m_mask, other=0.0)
    log_p = z - lse[:, None]
    p = tl.exp(log_p)
    g_lp = tl.load(grad_lp_ptr + offs_m, mask=m_mask, other=0.0)
    targets = tl.load(targets_ptr + offs_m, mask=m_mask, other=-1)
    dz = tl.where(offs_v[None, :] == targets[:, None], g_lp[:, None], 0.0) - g_lp[:, None] * p
    if ENTROPY_GRAD:
        entropy = tl.load(entropy_ptr + offs_m, mask=m_mask, other=0.0)
        g_ent = tl.load(grad_ent_ptr + offs_m, mask=m_mask, other=0.0)
        dz -= g_ent[:, None] * p * (log_p + entropy[:, None])
    if SCALED:
        dz = dz / temperature
    dz_ptrs = dz_ptr + offs_m[:, None].to(tl.int64) * stride_dzn + (offs_v - vocab_start)[None, :] * stride_dzv
    tl.store(dz_ptrs, _bf16_rounded(dz, BF16_INTERPRETED).to(dz_ptr.dtype.element_ty),
             mask=m_mask[:, None] & v_mask[None, :])


@triton.jit
def _row_stats_kernel(
    logits_ptr, targets_ptr, logprob_ptr, max_ptr, log_sum_ptr, entropy_ptr,
    vocab, stride_row, temperature,
    BLOCK_V: tl.constexpr, SCALED: tl.constexpr, ENTROPY: tl.constexpr,
):
    """One row of a cuBLAS logits chunk (fp32 or the inputs' dtype) -> its log-prob, lse as max and log-sum
    (`chunked.BackwardRows` says why), and entropy: an online max / sum exp / sum exp * shifted logit over
    BLOCK_V tiles, each tile's sums rescaled to the running max."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK_V)
    # finite, below any logit: the first rescale is exp(-huge) = 0 and (m - m_new) * 0 stays 0 (-inf would give NaN)
    m = -3.0e38
    s = 0.0
    u = 0.0
    for v0 in range(0, vocab, BLOCK_V):
        mask = offs < vocab - v0
        z = tl.load(row_ptr + v0 + offs, mask=mask, other=float("-inf")).to(tl.float32)
        if SCALED:
            z = z / temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        shifted = z - m_new
        e = tl.exp(shifted)  # 0 in the padding columns
        if ENTROPY:
            # e * shifted is 0 * -inf in the padding columns: zero the logit there, not the product
            u = alpha * (u + (m - m_new) * s) + tl.sum(e * tl.where(mask, shifted, 0.0), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    log_sum = tl.log(s)
    target = tl.load(targets_ptr + row)
    valid = (target >= 0) & (target < vocab)  # else NaN, as the fused kernel: no program stores a logit
    target_logit = tl.load(row_ptr + target, mask=valid, other=float("nan")).to(tl.float32)
    if SCALED:
        target_logit = target_logit / temperature
    tl.store(logprob_ptr + row, (target_logit - m) - log_sum)
    tl.store(max_ptr + row, m)
    tl.store(log_sum_ptr + row, log_sum)
    if ENTROPY:
        tl.store(entropy_ptr + row, log_sum - u / s)


@triton.jit
def _row_grad_kernel(
    logits_ptr, dz_ptr, targets_ptr, max_ptr, log_sum_ptr, entropy_ptr, grad_lp_ptr, grad_ent_ptr,
    vocab, stride_row, stride_dz_row, temperature,
    BLOCK_V: tl.constexpr, SCALED: tl.constexpr, ENTROPY_GRAD: tl.constexpr, BF16_INTERPRETED: tl.constexpr,
):
    """dz for one BLOCK_V tile of one row of a recomputed cuBLAS logits chunk; elementwise, so dz_ptr may be
    logits_ptr (same dtype: in place)."""
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < vocab
    z = tl.load(logits_ptr + row.to(tl.int64) * stride_row + offs, mask=mask, other=0.0).to(tl.float32)
    if SCALED:
        z = z / temperature
    log_p = (z - tl.load(max_ptr + row)) - tl.load(log_sum_ptr + row)  # exact at the max
    p = tl.exp(log_p)
    g_lp = tl.load(grad_lp_ptr + row)
    dz = tl.where(offs == tl.load(targets_ptr + row), g_lp, 0.0) - g_lp * p
    if ENTROPY_GRAD:
        dz -= tl.load(grad_ent_ptr + row) * p * (log_p + tl.load(entropy_ptr + row))
    if SCALED:
        dz = dz / temperature
    tl.store(dz_ptr + row.to(tl.int64) * stride_dz_row + offs,
             _bf16_rounded(dz, BF16_INTERPRETED).to(dz_ptr.dtype.element_ty), mask=mask)


# Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) gets bf16 wrong twice: tl.dot multiplies bf16 bit
# patterns (triton-lang/triton#11584), so interpreted kernels upcast bf16 tiles to fp32 first (exact), and
# fp32 -> bf16 casts truncate, so they round by hand (`_bf16_rounded`). Compiled kernels do neither.
_INTERPRETED = not isinstance(_forward_kernel, triton.runtime.JITFunction)


def _launch_options(hidden_ND: torch.Tensor, config: LogprobConfig, fp32_logits: bool,
                    temperature: float) -> dict[str, object]:
    dtype = hidden_ND.dtype
    bf16_interpreted = _INTERPRETED and dtype == torch.bfloat16
    # fp32 GEMMs follow torch's own choice (TF32 only where torch allows it), as the reference's F.linear
    ieee = bf16_interpreted or (dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32)
    return {"BLOCK_M": config.block_m, "BLOCK_V": config.block_v, "BLOCK_K": config.block_k,
            "GROUP_M": config.group_m, "DOT_PRECISION": "ieee" if ieee else "tf32",
            "BF16_INTERPRETED": bf16_interpreted,
            "ROUND_LOGITS": not fp32_logits and dtype != torch.float32, "SCALED": temperature != 1.0,
            "num_warps": config.num_warps, "num_stages": config.num_stages}


def _forward(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, with_entropy: bool,
             fp32_logits: bool, temperature: float,
             config: LogprobConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logprob_N, lse_N, entropy_N or None), fp32."""
    N, D = hidden_ND.shape
    V = weight_VD.shape[0]
    num_tiles = triton.cdiv(V, config.block_v)
    f32 = {"dtype": torch.float32, "device": hidden_ND.device}
    part_max, part_sum = torch.empty(num_tiles, N, **f32), torch.empty(num_tiles, N, **f32)
    part_ent = torch.empty(num_tiles, N, **f32) if with_entropy else part_sum  # unused without ENTROPY
    target_logit = torch.full((N,), float("nan"), **f32)
    grid = (triton.cdiv(N, config.block_m) * num_tiles,)
    _forward_kernel[grid](
        hidden_ND, weight_VD, targets_N, part_max, part_sum, part_ent, target_logit,
        N, V, D, float(temperature), *hidden_ND.stride(), *weight_VD.stride(),
        ENTROPY=with_entropy, **_launch_options(hidden_ND, config, fp32_logits, temperature),
    )
    # combine the tiles' partials, each rescaled to the row's max
    max_N = part_max.max(0).values
    scale = torch.exp(part_max - max_N)
    sum_N = (part_sum * scale).sum(0)
    lse_N = max_N + torch.log(sum_N)
    entropy_N = None
    if with_entropy:
        shifted_sum_N = ((part_ent + (part_max - max_N) * part_sum) * scale).sum(0)
        entropy_N = torch.log(sum_N) - shifted_sum_N / sum_N
    return target_logit - lse_N, lse_N, entropy_N


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()  # CPU tensors: the interpreted tests


def _backward(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor, lse_N: torch.Tensor,
              entropy_N: torch.Tensor | None, grad_lp_N: torch.Tensor | None, grad_ent_N: torch.Tensor | None,
              need_hidden: bool, need_weight: bool, fp32_logits: bool, temperature: float,
              config: LogprobConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dH, dW) in the inputs' dtypes, vocabulary chunk by chunk (module docstring)."""
    N, D = hidden_ND.shape
    V = weight_VD.shape[0]
    if grad_lp_N is None:
        grad_lp_N = torch.zeros(N, dtype=torch.float32, device=hidden_ND.device)
    entropy_grad = grad_ent_N is not None
    grad_lp_N = grad_lp_N.float().contiguous()
    grad_ent_N = grad_ent_N.float().contiguous() if entropy_grad else grad_lp_N
    entropy_N = entropy_N if entropy_grad else lse_N  # unused without ENTROPY_GRAD

    columns = grad_chunk_columns(N, V, hidden_ND.element_size(), config)
    dz_NC = torch.empty(N, columns, dtype=hidden_ND.dtype, device=hidden_ND.device)
    grad_h32 = torch.zeros(N, D, dtype=torch.float32, device=hidden_ND.device) if need_hidden else None
    # contiguous whatever W's strides: each chunk's GEMM writes its rows in place
    grad_w = torch.empty(V, D, dtype=weight_VD.dtype, device=weight_VD.device) if need_weight else None
    launch = _launch_options(hidden_ND, config, fp32_logits, temperature)
    for start in range(0, V, columns):
        end = min(V, start + columns)
        dz = dz_NC[:, :end - start]
        grid = (triton.cdiv(N, config.block_m) * triton.cdiv(end - start, config.block_v),)
        _grad_logits_kernel[grid](
            hidden_ND, weight_VD, targets_N, lse_N, entropy_N, grad_lp_N, grad_ent_N, dz,
            N, start, end, D, float(temperature),
            *hidden_ND.stride(), *weight_VD.stride(), *dz.stride(),
            ENTROPY_GRAD=entropy_grad, **launch,
        )
        if need_weight:
            torch.mm(dz.t(), hidden_ND, out=grad_w[start:end])
        if need_hidden:
            grad_h32 += _mm_fp32(dz, weight_VD[start:end])
    return (grad_h32.to(hidden_ND.dtype) if need_hidden else None), grad_w


def _forward_rows(logits_CV: torch.Tensor, targets_C: torch.Tensor, temperature: float, with_entropy: bool,
                  config: LogprobConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`chunked.ForwardRows`: one program per row of the cuBLAS logits chunk."""
    C, V = logits_CV.shape
    logprob_C = torch.empty(C, dtype=torch.float32, device=logits_CV.device)
    max_C, log_sum_C = torch.empty_like(logprob_C), torch.empty_like(logprob_C)
    entropy_C = torch.empty_like(logprob_C) if with_entropy else max_C  # unused without ENTROPY
    _row_stats_kernel[(C,)](
        logits_CV, targets_C, logprob_C, max_C, log_sum_C, entropy_C, V, logits_CV.stride(0), float(temperature),
        BLOCK_V=config.row_block_v, SCALED=temperature != 1.0, ENTROPY=with_entropy, num_warps=config.row_num_warps,
    )
    return logprob_C, max_C, log_sum_C, entropy_C if with_entropy else None


def _backward_rows(logits_CV: torch.Tensor, targets_C: torch.Tensor, max_C: torch.Tensor, log_sum_C: torch.Tensor,
                   entropy_C: torch.Tensor | None, grad_lp_C: torch.Tensor, grad_ent_C: torch.Tensor | None,
                   temperature: float, dtype: torch.dtype, config: LogprobConfig) -> torch.Tensor:
    """`chunked.BackwardRows`: dz in place when the logits are already in W's dtype (fp32_logits=False, or fp32
    weights), else into a new [C, V] block in W's dtype."""
    C, V = logits_CV.shape
    dz_CV = logits_CV if logits_CV.dtype == dtype else torch.empty(C, V, dtype=dtype, device=logits_CV.device)
    entropy_grad = grad_ent_C is not None
    grad_lp_C = grad_lp_C.contiguous()
    grad_ent_C = grad_ent_C.contiguous() if entropy_grad else grad_lp_C  # unused without ENTROPY_GRAD
    entropy_C = entropy_C if entropy_grad else max_C
    _row_grad_kernel[(C, triton.cdiv(V, config.row_block_v))](
        logits_CV, dz_CV, targets_C, max_C, log_sum_C, entropy_C, grad_lp_C, grad_ent_C,
        V, logits_CV.stride(0), dz_CV.stride(0), float(temperature),
        BLOCK_V=config.row_block_v, SCALED=temperature != 1.0, ENTROPY_GRAD=entropy_grad,
        BF16_INTERPRETED=_INTERPRETED and dtype == torch.bfloat16, num_warps=config.row_num_warps,
    )
    return dz_CV


def row_pass(config: LogprobConfig) -> chunked.RowPass:
    """The Triton row kernels as the chunk driver's row passes; they hold one fp32 [C, V] block (the logits)
    besides dz."""
    return chunked.RowPass(functools.partial(_forward_rows, config=config),
                           functools.partial(_backward_rows, config=config), fp32_blocks=1)


class LinearLogprobs(torch.autograd.Function):
    """(logprob_N, entropy_N) of `linear_logprobs_triton`; entropy is an empty tensor unless requested."""

    @staticmethod
    def forward(ctx, hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                return_entropy: bool, fp32_logits: bool, temperature: float,
                config: LogprobConfig) -> tuple[torch.Tensor, torch.Tensor]:
        logprob_N, lse_N, entropy_N = _forward(hidden_ND, weight_VD, targets_N, return_entropy, fp32_logits,
                                               temperature, config)
        if entropy_N is None:
            entropy_N = logprob_N.new_empty(0)
            ctx.mark_non_differentiable(entropy_N)
        ctx.save_for_backward(hidden_ND, weight_VD, targets_N, lse_N, entropy_N)
        ctx.options = (fp32_logits, temperature, config)
        ctx.set_materialize_grads(False)
        return logprob_N, entropy_N

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lp_N: torch.Tensor | None, grad_ent_N: torch.Tensor | None):
        hidden_ND, weight_VD, targets_N, lse_N, entropy_N = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        if grad_lp_N is None and grad_ent_N is None:
            return None, None, None, None, None, None, None
        grad_h, grad_w = _backward(hidden_ND, weight_VD, targets_N, lse_N, entropy_N, grad_lp_N,
                                   grad_ent_N if entropy_N.numel() else None, need_hidden, need_weight,
                                   *ctx.options)
        return grad_h, grad_w, None, None, None, None, None


def linear_logprobs_triton(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                           return_entropy: bool = False, *, fp32_logits: bool = True, temperature: float = 1.0,
                           chunk_size: int = 1024,
                           config: LogprobConfig | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`ops.linear_logprobs` through Triton: the signature and results of `linear_logprobs_torch`. From
    `config.cublas_min_rows` rows, cuBLAS GEMMs on chunks of at most `chunk_size` rows and the Triton row
    kernels (the chunk driver of model/linear_logprobs_chunked.py); below, the fused kernels (`chunk_size`
    unused). Inputs of different dtypes, or no rows, run the torch reference. The logits are fp32
    accumulations whatever `fp32_logits` says; False rounds them through the inputs' dtype as the
    reference's half-precision head does."""
    assert hidden_ND.dim() == 2 and weight_VD.dim() == 2 and hidden_ND.shape[1] == weight_VD.shape[1], \
        f"hidden [N, D] and weight [V, D] expected, got {tuple(hidden_ND.shape)} and {tuple(weight_VD.shape)}"
    assert targets_N.shape == hidden_ND.shape[:1] and not targets_N.is_floating_point()
    if hidden_ND.dtype != weight_VD.dtype or hidden_ND.shape[0] == 0:
        return ops.linear_logprobs_torch(hidden_ND, weight_VD, targets_N, return_entropy, fp32_logits=fp32_logits,
                                         temperature=temperature, chunk_size=chunk_size)
    assert hidden_ND.is_cuda or _INTERPRETED, \
        "the Triton kernels need CUDA tensors (CPU only under TRITON_INTERPRET=1)"
    config = config or default_config(hidden_ND.shape[0], hidden_ND.element_size())
    if hidden_ND.shape[0] >= config.cublas_min_rows:
        return chunked.linear_logprobs_rows(hidden_ND, weight_VD, targets_N, return_entropy, fp32_logits,
                                            temperature, chunk_size, row_pass(config))
    logprob_N, entropy_N = LinearLogprobs.apply(hidden_ND, weight_VD, targets_N.contiguous(), return_entropy,
                                                fp32_logits, float(temperature), config)
    return logprob_N, entropy_N if return_entropy else None


OPS = {"linear_logprobs": linear_logprobs_triton}
"""What this module registers under the implementation name "triton"."""


def register() -> list[tuple[str, str]]:
    """Register OPS with `m2rl.model.ops` (done on import); registering never changes which one is selected."""
    return ops.register_implementations("triton", OPS)


register()
