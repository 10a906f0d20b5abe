"""`linear_logprobs` in row chunks with cuBLAS GEMMs and a few in-place passes per chunk: per-token log-probs
(and entropy) through the LM head without holding the [N, V] logits or an autograd graph over them.

For row n, z_n = h_n @ W^T / temperature [V] fp32, and

    logprob_n = z_n[t_n] - lse_n,   lse_n = logsumexp(z_n),   entropy_n = -sum_v p_nv log p_nv,  p_n = softmax(z_n)

A `torch.autograd.Function` walks the rows in chunks of C:
  forward   logits_CV = one GEMM (fp32 accumulation; fp32_logits=False rounds them through the inputs' dtype,
            as the reference's F.linear(h, W).float()), then the row pass -> logprob, lse, entropy per row.
            Only lse (as max and log-sum, `BackwardRows`) and entropy are saved ([N] each), never the logits.
  backward  per chunk the GEMM again (the recompute), the row pass turns the logits into
            dz = g_lp (onehot(t) - p) - g_ent p (log p + H), divided by the temperature, in W's dtype
            (dH/dz_v = -p_v (log p_v + H)), then dH[chunk] = dz @ W (one GEMM over the whole V) and
            dW += dz^T @ h[chunk].
The row passes are pluggable (`RowPass`): here torch in-place ops, in m2rl/kernels/linear_logprob.py one
Triton kernel each way, which shares this driver for large N.

dW accumulates in W's dtype with addmm_ (beta=1: cuBLAS adds the old value in fp32 and rounds once per chunk):
an fp32 [V, D] accumulator would be 2.3 GiB at M2's head (V=200064, D=3072), twice the chunk budget below,
plus a cast pass. The cost is one bf16 rounding per chunk on each dW element (k chunks: ~sqrt(k)/2 ulp, e.g.
11 at 8192 tokens in 768-row chunks) where a single GEMM over all rows would round once; fp32 weights lose
nothing.

Cost for N rows: four GEMMs of 2*N*D*V flops (forward, recompute, dH, dW) where materialised logits need
three. HBM beyond the GEMMs' operands, per logit (fp32_logits=True, bf16 W): the two logits GEMMs write 4 bytes
each, dz is written once and read by both backward GEMMs (3 x 2 bytes), and the torch row passes here read and
write the block a few times: forward max, shift, exp, sum (24 bytes; the entropy 20 more), backward shift, exp,
dz (22 bytes; a temperature adds a division pass each way). Estimated on an H200 at M2's vocabulary: ~2.5 us a row of traffic against ~6 us a row for the
four GEMMs (~800 TFLOP/s); the Triton row kernels, one read and one write each way, cut it to ~0.9 us.

Memory: chunks of at most `chunk_size` rows, fewer so the [C, V] blocks a row pass holds stay under
`CHUNK_BUDGET_BYTES` (1 GiB): at V=200064 in bf16 the torch pass (two fp32 blocks and a bf16 one) runs 512
rows, the Triton one (one fp32 block and dz) 768. Mixed input dtypes run the torch reference (as the Triton
implementation does). Autocast is off inside: the GEMMs run in the inputs' dtypes as fp32_logits says.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

CHUNK_BUDGET_BYTES = 1 << 30
"""Most bytes of [C, V] blocks (logits, their temporaries, dz) a chunk holds at once."""
CHUNK_ROW_MULTIPLE = 256
"""A chunk shrunk to fit the budget is rounded down to this many rows: whole GEMM tiles of 128 or 256 rows."""

ForwardRows = Callable[[torch.Tensor, torch.Tensor, float, bool],
                       tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]]
"""(logits_CV, targets_C, temperature, with_entropy) -> (logprob_C, max_C, log_sum_C, entropy_C or None), fp32,
where lse = max + log_sum (why two numbers: below). The logits are the raw GEMM output (fp32, or the inputs' dtype for
fp32_logits=False), not yet divided by the temperature; the pass may overwrite them."""
BackwardRows = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
                         torch.Tensor, torch.Tensor | None, float, torch.dtype], torch.Tensor]
"""(logits_CV, targets_C, max_C, log_sum_C, entropy_C, grad_lp_C, grad_ent_C, temperature, dtype) -> dz_CV in
`dtype`, divided by the temperature; entropy_C and grad_ent_C are None when no entropy gradient flows. The
logits are recomputed as in forward, and divided by the temperature as forward did, bit for bit. The pass may
overwrite them (and return them as dz)."""
# Why lse travels as two numbers, max and log_sum: log p = (z - max) - log_sum is exact at the max, while
# z - lse with one rounded lse shifts every log p by up to half its ulp (~2e-6 at lse ~ 50). That shift is all
# of 1 - p for a confident token (p = 0.999...), so its gradient g (1 - p) would be off by whole percents; the
# reference (autograd through log_softmax) has no such error and neither has this.


@dataclasses.dataclass(frozen=True)
class RowPass:
    """The elementwise work between the GEMMs, one call per chunk each way."""

    forward: ForwardRows
    backward: BackwardRows
    fp32_blocks: int
    """[C, V] fp32 blocks the pass holds at once besides one in the weight's dtype (dz, or the half-precision
    logits of fp32_logits=False): sizes the chunk"""


def chunk_rows(chunk_size: int, vocab: int, elem_bytes: int, fp32_blocks: int,
               budget_bytes: int = CHUNK_BUDGET_BYTES) -> int:
    """Rows per chunk: `chunk_size`, or fewer (a multiple of CHUNK_ROW_MULTIPLE when that many fit) so that
    `fp32_blocks` fp32 [C, V] blocks and one in `elem_bytes` fit in `budget_bytes`; at least one."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    fit = budget_bytes // max(1, vocab * (4 * fp32_blocks + elem_bytes))
    if chunk_size <= fit:
        return chunk_size
    return max(1, fit // CHUNK_ROW_MULTIPLE * CHUNK_ROW_MULTIPLE or fit)


def chunk_logits(hidden_CD: torch.Tensor, weight_VD: torch.Tensor, fp32_logits: bool) -> torch.Tensor:
    """hidden @ weight^T, accumulated in fp32: returned in fp32, or (fp32_logits=False) rounded to the inputs'
    dtype as F.linear(h, W) returns it."""
    if not fp32_logits or hidden_CD.dtype == torch.float32:
        return F.linear(hidden_CD, weight_VD)  # the reference's call: its rounding, TF32 where torch allows it
    if hidden_CD.is_cuda:  # cuBLAS accumulates in fp32 anyway: keep its result instead of rounding it
        return torch.mm(hidden_CD, weight_VD.t(), out_dtype=torch.float32)
    return F.linear(hidden_CD.float(), weight_VD.float())  # CPU has no mm with out_dtype


# ---- the torch row passes -------------------------------------------------------------------------------
def torch_forward_rows(logits_CV: torch.Tensor, targets_C: torch.Tensor, temperature: float, with_entropy: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`ForwardRows` in place on the fp32 logits: max, shift, exp, sum (the entropy keeps the shifted logits
    and exponentiates into a second block)."""
    z = logits_CV.float()  # a new block only for half-precision logits
    if temperature != 1.0:
        z.div_(temperature)  # divided, not multiplied by 1/T: the reference's rounding
    max_C = z.amax(-1)
    shifted = z.sub_(max_C[:, None])  # <= 0: exp cannot overflow
    target_C = shifted.gather(1, targets_C[:, None])[:, 0]
    if with_entropy:
        e = torch.exp(shifted)
        sum_C = e.sum(-1)
        # H = log S - sum e (z - max) / S: every term relative to the max, no cancellation of large logits
        entropy_C = torch.log(sum_C) - e.mul_(shifted).sum(-1) / sum_C
    else:
        sum_C = shifted.exp_().sum(-1)
        entropy_C = None
    log_sum_C = torch.log(sum_C)
    return target_C - log_sum_C, max_C, log_sum_C, entropy_C


def torch_backward_rows(logits_CV: torch.Tensor, targets_C: torch.Tensor, max_C: torch.Tensor,
                        log_sum_C: torch.Tensor, entropy_C: torch.Tensor | None, grad_lp_C: torch.Tensor,
                        grad_ent_C: torch.Tensor | None, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """`BackwardRows` in three full passes over the fp32 logits (one more with a temperature, one more with the
    entropy's gradient): z - max in place, its exp in place, and a per-row scale written straight into dz's
    dtype; log p = (z - max) - log_sum and p = e^(z - max) / S enter only through per-row constants. The
    target column's value is computed apart from the [C] gathered log p and written last, rounded once."""
    z = logits_CV.float()
    if temperature != 1.0:
        z.div_(temperature)  # as forward did: z - max is then exactly 0 at the max
    shifted = z.sub_(max_C[:, None])
    log_p_t = shifted.gather(1, targets_C[:, None])[:, 0] - log_sum_C
    p_t = torch.exp(log_p_t)
    inv_sum_C = torch.exp(-log_sum_C)
    # off the target column dz = p (a + b log p) with a, b per row, the temperature folded in
    a_C = -grad_lp_C / temperature
    dz_t = grad_lp_C * (1.0 - p_t) / temperature
    # dz overwrites the fp32 block, or the half-precision logits (fp32_logits=False), or else a new block
    dz = z if dtype == torch.float32 else logits_CV if logits_CV.dtype == dtype else \
        torch.empty_like(z, dtype=dtype)
    if grad_ent_C is None:
        torch.mul(shifted.exp_(), (a_C * inv_sum_C)[:, None], out=dz)
    else:
        assert entropy_C is not None
        b_C = -grad_ent_C / temperature
        a_C = a_C + b_C * entropy_C
        e = torch.exp(shifted)
        # p (a + b log p) = e (a + b (shifted - log_sum)) / S = e ((a - b log_sum) / S + (b / S) shifted)
        scale = torch.addcmul(((a_C - b_C * log_sum_C) * inv_sum_C)[:, None], shifted, (b_C * inv_sum_C)[:, None],
                              out=shifted)
        torch.mul(scale, e, out=dz)
        dz_t = dz_t - grad_ent_C * p_t * (log_p_t + entropy_C) / temperature
    return dz.scatter_(1, targets_C[:, None], dz_t[:, None].to(dtype))


TORCH_ROWS = RowPass(torch_forward_rows, torch_backward_rows, fp32_blocks=2)


# ---- the chunk driver ------------------------------------------------------------------------------------
class ChunkedLinearLogprobs(torch.autograd.Function):
    """(logprob_N, entropy_N) through `row_pass` on chunks of `rows` rows; entropy is an empty tensor unless
    requested. Inputs of one dtype, targets int64."""

    @staticmethod
    def forward(ctx, hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                return_entropy: bool, fp32_logits: bool, temperature: float, rows: int,
                row_pass: RowPass) -> tuple[torch.Tensor, torch.Tensor]:
        N = hidden_ND.shape[0]
        logprob_N = torch.empty(N, dtype=torch.float32, device=hidden_ND.device)
        max_N, log_sum_N = torch.empty_like(logprob_N), torch.empty_like(logprob_N)
        entropy_N = torch.empty_like(logprob_N) if return_entropy else logprob_N.new_empty(0)
        with torch.autocast(hidden_ND.device.type, enabled=False):
            for s in range(0, N, rows):
                rows_C = slice(s, s + rows)
                lp_C, max_C, log_sum_C, ent_C = row_pass.forward(
                    chunk_logits(hidden_ND[rows_C], weight_VD, fp32_logits), targets_N[rows_C], temperature,
                    return_entropy)
                logprob_N[rows_C], max_N[rows_C], log_sum_N[rows_C] = lp_C, max_C, log_sum_C
                if ent_C is not None:
                    entropy_N[rows_C] = ent_C
        if not return_entropy:
            ctx.mark_non_differentiable(entropy_N)
        ctx.save_for_backward(hidden_ND, weight_VD, targets_N, max_N, log_sum_N, entropy_N)
        ctx.options = (fp32_logits, temperature, rows, row_pass)
        ctx.set_materialize_grads(False)
        return logprob_N, entropy_N

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_lp_N: torch.Tensor | None, grad_ent_N: torch.Tensor | None):
        hidden_ND, weight_VD, targets_N, max_N, log_sum_N, entropy_N = ctx.saved_tensors
        fp32_logits, temperature, rows, row_pass = ctx.options
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        if entropy_N.numel() == 0:
            grad_ent_N = None  # not returned: nothing flows through it
        if (grad_lp_N is None and grad_ent_N is None) or not (need_hidden or need_weight):
            return None, None, None, None, None, None, None, None
        N, V = hidden_ND.shape[0], weight_VD.shape[0]
        grad_lp_N = torch.zeros_like(max_N) if grad_lp_N is None else grad_lp_N.float()
        grad_ent_N = None if grad_ent_N is None else grad_ent_N.float()
        grad_h = torch.empty_like(hidden_ND, memory_format=torch.contiguous_format) if need_hidden else None
        # contiguous whatever W's strides; zeros only for N=0, where no chunk writes it
        grad_w = (torch.zeros if N == 0 else torch.empty)(V, weight_VD.shape[1], dtype=weight_VD.dtype,
                                                          device=weight_VD.device) if need_weight else None
        with torch.autocast(hidden_ND.device.type, enabled=False):
            for s in range(0, N, rows):
                rows_C = slice(s, s + rows)
                h_CD = hidden_ND[rows_C]
                dz_CV = row_pass.backward(
                    chunk_logits(h_CD, weight_VD, fp32_logits), targets_N[rows_C], max_N[rows_C],
                    log_sum_N[rows_C], None if grad_ent_N is None else entropy_N[rows_C], grad_lp_N[rows_C],
                    None if grad_ent_N is None else grad_ent_N[rows_C], temperature, weight_VD.dtype)
                if grad_h is not None:
                    torch.mm(dz_CV, weight_VD, out=grad_h[rows_C])
                if grad_w is not None:  # beta=0 on the first chunk: the empty buffer is ignored, not added
                    grad_w.addmm_(dz_CV.t(), h_CD, beta=0.0 if s == 0 else 1.0)
                del dz_CV  # before the next chunk's GEMM allocates its logits
        return grad_h, grad_w, None, None, None, None, None, None


def linear_logprobs_rows(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                         return_entropy: bool, fp32_logits: bool, temperature: float, chunk_size: int,
                         row_pass: RowPass) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`ops.linear_logprobs` through the chunk driver with `row_pass` (shared by the torch and Triton ones)."""
    assert hidden_ND.dim() == 2 and weight_VD.dim() == 2 and hidden_ND.shape[1] == weight_VD.shape[1], \
        f"hidden [N, D] and weight [V, D] expected, got {tuple(hidden_ND.shape)} and {tuple(weight_VD.shape)}"
    assert targets_N.shape == hidden_ND.shape[:1] and not targets_N.is_floating_point()
    if hidden_ND.dtype != weight_VD.dtype:
        from m2rl.model import ops  # ops imports this module at its end

        return ops.linear_logprobs_torch(hidden_ND, weight_VD, targets_N, return_entropy, fp32_logits=fp32_logits,
                                         temperature=temperature, chunk_size=chunk_size)
    rows = chunk_rows(chunk_size, weight_VD.shape[0], weight_VD.element_size(), row_pass.fp32_blocks)
    logprob_N, entropy_N = ChunkedLinearLogprobs.apply(hidden_ND, weight_VD, targets_N.long().contiguous(),
                                                       return_entropy, fp32_logits, float(temperature), rows,
                                                       row_pass)
    return logprob_N, entropy_N if return_entropy else None


def linear_logprobs_chunked(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                            return_entropy: bool = False, *, fp32_logits: bool = True, temperature: float = 1.0,
                            chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`ops.linear_logprobs` with the torch row passes: the signature and results of `linear_logprobs_torch`,
    its ~10 autograd passes over each [chunk, V] block replaced by three to five in-place ones. Targets must lie in
    [0, V) (torch's gather raises, on CUDA as a device-side assert; the Triton implementation gives NaN)."""
    return linear_logprobs_rows(hidden_ND, weight_VD, targets_N, return_entropy, fp32_logits, temperature,
                                chunk_size, TORCH_ROWS)
