"""Kernel benchmark: every registered implementation of each `m2rl.model.ops` op at the released M2 shapes
(hidden 3072, 48 heads of 128 with 8 KV heads, 256 experts of 1536, top-8, vocab 200064), bf16, at 1, 64,
512, 4096 and 16384 tokens, against the best PyTorch implementation and the card's peaks measured in the
same run.

Ops, each only where `ops.available` lists it (Triton kernels register when `m2rl.kernels` imports):
  moe_experts      x [T, 3072] through 8 of 256 SwiGLU experts of 1536, random routing. The torch reference
                   loop runs forward up to 4096 tokens and forward+backward at 1 token only (1.6 s a call at 64 tokens on an H200, which spent the op's budget).
  rms_norm         x [T, 3072], weight [3072]
  qk_norm_rope     q [T, 6144], k [T, 1024], their norm weights, cos/sin [T, 64] (or with a leading batch of 1)
  route            router logits [T, 256] fp32 and the correction bias -> top-8 weights and expert ids
  linear_logprobs  hidden [T, 3072] x LM head [200064, 3072] -> log-prob of each target token
  fp8_block_linear x [T, 3072] x M2's stacked q/k/v projection [6144 + 2*1024, 3072] held as FP8 e4m3 with
                   128x128 block scales (not an `ops` op: model/fp8_linear.py calls kernels/fp8_block_linear.py
                   directly). Forward only (inference weights). Rows: `triton` (the fp8 tiles read and scaled in
                   registers), `torch` (F.linear on the weight dequantised once to bf16 and kept: the best PyTorch
                   path, at twice the weight memory) and `torch_dequant` (the reference: dequantise every call).
                   Bytes are each implementation's own least traffic (fp8 + scales for triton, the bf16 weight
                   for torch); err is against `torch`. Left out of `--smoke`'s defaults (its CPU check is
                   tests/kernels/test_fp8_block_linear.py); `--smoke --ops fp8_block_linear` runs it in fp16.
Each op runs forward (under no_grad) and, where its output is differentiable, forward+backward (random output
gradients). Inputs are passed by parameter name: the shape suffix is dropped (`x_TD` -> `x`) and the name
looked up among the inputs built for that op; the torch implementation is probed at 4 tokens, flat [T, ...]
inputs first, then with a leading batch dimension, and the first that runs is used for every implementation.
An op whose signature this cannot bind is skipped with the reason.

Forward counts come from the op's Triton module (`flops`, `bytes_moved`, called by parameter name with the
sizes at hand) where it has them, else from this script; the run prints which. Forward+backward counts 3x the
forward's FLOPs and adds the backward's least traffic: the inputs and output gradients read, the input
gradients written (the MoE: twice its forward's, the hit experts' weights read again and their gradients
written). linear_logprobs runs at its defaults (fp32_logits=True: the torch path's GEMM is fp32).

Columns:
- ms: median time of one call (triton.testing.do_bench on CUDA, L2 flushed between calls; a plain timer on CPU)
- TFLOP/s: FLOPs (2 per multiply-add) / time, for the GEMM ops (MoE, linear_logprobs)
- TB/s: least HBM traffic / time; the MoE counts only the weights of the experts its routing hits
- % roof: the roofline time max(FLOPs / matmul peak, bytes / copy bandwidth), both measured in this run (an
  8192^3 bf16 matmul, a device-to-device copy), over the measured time
- x torch: time of the fastest non-Triton implementation at the same op, mode and tokens / this time
- err: relative L2 difference of the forward output from the torch implementation's (expert ids and their
  weights compared after sorting by id; none where the torch implementation is over its token cap)
- graph ms, graph % roof (forward rows of the bandwidth-bound ops on CUDA): the same call replayed from a CUDA
  graph, each call after an L2 flush, the flushes' own time subtracted. `ms` includes the host's time to
  issue the call (Python dispatch, launch), which these small ops cannot hide; this is the GPU's time alone,
  what a decode step replayed from a graph pays.
Each op has a time budget (`--op-budget`): token counts left when it is spent are skipped, as is a case
whose one call, scaled from the last token count, would take over `--max-call-ms`.

From a bare checkout on a GPU machine (torch, triton there; no pip install):
    . scripts/device_env.sh && python3 -m m2rl.benchmarks.kernels
    ... --ops moe_experts linear_logprobs --tokens 1 4096 --op-budget 40
On the CPU, `--smoke` runs a tiny config (widths of 64) at 1 and 8 tokens in fp32, Triton kernels under its
interpreter (no speed claims):
    .venv/bin/python -m m2rl.benchmarks.kernels --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable

import torch
from m2rl.benchmarks.gpu_decode import copy_bandwidth, real_shape_config
from m2rl.model import ops
from m2rl.model.attention import rope_cos_sin
from m2rl.model.config import M2Config
from m2rl.model.fp8 import FP8_DTYPE, FP8_MAX, dequantize_fp8_blocks

KNOWN_OPS = ("moe_experts", "rms_norm", "qk_norm_rope", "route", "linear_logprobs")
"""Ops this benchmark knows how to feed; those not registered in this checkout are skipped."""
FP8_LINEAR = "fp8_block_linear"
"""A kernel with no `ops` op (inference only, forward only): benchmarked by `run_fp8_linear`."""
DEFAULT_TOKENS = (1, 64, 512, 4096, 16384)
SMOKE_TOKENS = (1, 8)


def smoke_config() -> M2Config:
    """Every M2 feature at widths of 64 (the Triton interpreter's time grows with the number of programs)."""
    return M2Config.from_preset("tiny", vocab_size=256, hidden_size=64, intermediate_size=64, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, rotary_dim=8, num_local_experts=4)


# ---- timing and the card's peaks -----------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, grad_to_none: list[torch.Tensor] | None = None,
            reps: int = 5) -> float:
    """Median milliseconds of one fn() call: triton.testing.do_bench on CUDA (it flushes L2 between calls
    and picks the repetitions from a time budget), else a warm-up call and `reps` timed ones."""
    if device == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return float(do_bench(fn, warmup=10, rep=50, grad_to_none=grad_to_none, return_mode="median"))
    times = []
    for i in range(reps + 1):
        for t in grad_to_none or ():
            t.grad = None
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if i:  # the first call is a warm-up
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def time_graph_ms(fn: Callable[[], object], calls: int = 10, replays: int = 7,
                  flush_bytes: int = 256 << 20) -> float:
    """Milliseconds of one fn() on the GPU alone: `calls` x (L2 flush, fn) captured in one CUDA graph, and
    the flushes alone in another; the median replay of each, the difference over `calls`. fn must be
    capturable (no host sync)."""
    cache = torch.empty(flush_bytes, dtype=torch.int8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture wants
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    both, flushes = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(both):
        for _ in range(calls):
            cache.zero_()
            fn()
    with torch.cuda.graph(flushes):
        for _ in range(calls):
            cache.zero_()

    def replay_ms(graph: torch.cuda.CUDAGraph) -> float:
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)

    return max(0.0, (replay_ms(both) - replay_ms(flushes)) / calls)


def matmul_peak(device: str, n: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of one n x n x n matmul in `dtype`: the measured ceiling that MFU and % roof are taken against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, reps=3)
    return 2 * n**3 / (ms / 1e3)


# ---- inputs, bound by parameter name ------------------------------------------------------------------
_SHAPE_SUFFIX = re.compile(r"_[A-Z0-9]+$")


def base_name(parameter: str) -> str:
    """x_TD -> x, weight_VD -> weight, lm_head_weight -> lm_head_weight (shape suffixes are upper case)."""
    return _SHAPE_SUFFIX.sub("", parameter).lower()


def bind(fn: Callable[..., object], named: dict[str, object]) -> tuple[object, ...]:
    """Positional arguments calling `fn` with the values of `named` by parameter name; parameters `named`
    lacks, and keyword-only ones, keep their defaults. Positional only, so every implementation of an op
    takes the same call. Raises TypeError naming a required parameter that `named` lacks."""
    args: list[object] = []
    defaults_at_end = 0
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or (p.kind == p.KEYWORD_ONLY and p.default is not p.empty):
            continue
        key = base_name(p.name)
        if key in named and p.kind != p.KEYWORD_ONLY:
            args.append(named[key])
            defaults_at_end = 0
        elif p.default is not p.empty:
            args.append(p.default)
            defaults_at_end += 1
        else:
            raise TypeError(f"no input named {p.name!r} (looked up as {key!r}; inputs: {sorted(named)})")
    return tuple(args[:len(args) - defaults_at_end])


def aliases(value: object, *names: str) -> dict[str, object]:
    return {name: value for name in names}


def moe_inputs(c: M2Config, tokens: int, device: str, dtype: torch.dtype, batched: bool,
               expert_weights: dict[str, torch.Tensor]) -> dict[str, object]:
    """x [T, D], the layer's expert weights (built once: 7 GB at M2's shapes) and a random top-K routing."""
    x = torch.randn(tokens, c.hidden_size, device=device, dtype=dtype).requires_grad_()
    experts_TK = torch.randn(tokens, c.num_local_experts, device=device).topk(c.num_experts_per_tok).indices
    weights_TK = torch.rand(tokens, c.num_experts_per_tok, device=device) + 0.1
    weights_TK = (weights_TK / weights_TK.sum(-1, keepdim=True)).requires_grad_()
    return {"x": x, **expert_weights, **aliases(experts_TK, "experts", "expert_ids", "topk_ids"),
            **aliases(weights_TK, "weights", "routing_weights", "topk_weights")}


def rms_norm_inputs(c: M2Config, tokens: int, device: str, dtype: torch.dtype, batched: bool) -> dict[str, object]:
    lead = (1, tokens) if batched else (tokens,)
    x = torch.randn(*lead, c.hidden_size, device=device, dtype=dtype).requires_grad_()
    weight = (1 + 0.1 * torch.randn(c.hidden_size, device=device, dtype=dtype)).requires_grad_()
    return {**aliases(x, "x", "hidden", "hidden_states", "input"), **aliases(weight, "weight", "w"),
            **aliases(c.rms_norm_eps, "eps", "epsilon")}


def qk_norm_rope_inputs(c: M2Config, tokens: int, device: str, dtype: torch.dtype,
                        batched: bool) -> dict[str, object]:
    lead = (1, tokens) if batched else (tokens,)
    q = torch.randn(*lead, c.q_dim, device=device, dtype=dtype).requires_grad_()
    k = torch.randn(*lead, c.kv_dim, device=device, dtype=dtype).requires_grad_()
    q_weight = (1 + 0.1 * torch.randn(c.q_dim, device=device, dtype=dtype)).requires_grad_()
    k_weight = (1 + 0.1 * torch.randn(c.kv_dim, device=device, dtype=dtype)).requires_grad_()
    positions = torch.arange(tokens, device=device).view(lead)
    cos, sin = rope_cos_sin(positions.view(1, tokens), c.rotary_dim, c.rope_theta, dtype)  # [1, T, R]
    cos, sin = (cos, sin) if batched else (cos[0], sin[0])
    return {**aliases(q, "q", "query"), **aliases(k, "k", "key"),
            **aliases(q_weight, "q_weight", "q_norm_weight", "weight_q", "wq", "q_w"),
            **aliases(k_weight, "k_weight", "k_norm_weight", "weight_k", "wk", "k_w"),
            "cos": cos, "sin": sin, "cos_sin": (cos, sin), **aliases(positions, "positions", "position_ids"),
            **aliases(c.rms_norm_eps, "eps", "epsilon"),
            **aliases(c.num_attention_heads, "n_heads", "num_heads", "heads", "num_attention_heads"),
            **aliases(c.num_key_value_heads, "n_kv", "n_kv_heads", "num_kv_heads", "kv_heads",
                      "num_key_value_heads"),
            "head_dim": c.head_dim, "rotary_dim": c.rotary_dim, **aliases(c.rope_theta, "theta", "rope_theta")}


def route_inputs(c: M2Config, tokens: int, device: str, dtype: torch.dtype, batched: bool) -> dict[str, object]:
    """Router logits as the gate GEMM leaves them (fp32), or, for a route that does the GEMM itself, its
    input and weight."""
    logits = torch.randn(tokens, c.num_local_experts, device=device, dtype=torch.float32).requires_grad_()
    bias = 0.01 * torch.randn(c.num_local_experts, device=device, dtype=torch.float32)
    x = torch.randn(tokens, c.hidden_size, device=device, dtype=dtype).requires_grad_()
    gate = (0.02 * torch.randn(c.num_local_experts, c.hidden_size, device=device)).requires_grad_()
    return {**aliases(logits, "logits", "router_logits", "scores", "gate_logits"),
            **aliases(bias, "bias", "correction_bias", "e_score_correction_bias", "routing_bias"),
            **aliases(c.num_experts_per_tok, "k", "top_k", "topk", "num_experts_per_tok"),
            "scoring_func": c.scoring_func, **aliases(x, "x", "hidden", "hidden_states"),
            **aliases(gate, "weight", "gate_weight", "router_weight")}


def linear_logprobs_inputs(c: M2Config, tokens: int, device: str, dtype: torch.dtype,
                           batched: bool) -> dict[str, object]:
    lead = (1, tokens) if batched else (tokens,)
    hidden = torch.randn(*lead, c.hidden_size, device=device, dtype=dtype).requires_grad_()
    weight = (0.02 * torch.randn(c.vocab_size, c.hidden_size, device=device, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, c.vocab_size, lead, device=device)
    return {**aliases(hidden, "hidden", "h", "x", "hidden_states", "input"),
            **aliases(weight, "weight", "w", "lm_head_weight", "head_weight", "lm_head"),
            **aliases(targets, "targets", "target", "labels", "ids", "input_ids", "tokens"),
            "temperature": 1.0}


@dataclasses.dataclass(frozen=True)
class OpBench:
    """How to feed one op, and what one forward call must compute and move where its kernel module does not
    say (a Triton module's `flops` / `bytes_moved`, called with `sizes` by parameter name, win)."""

    op: str
    inputs: Callable[..., dict[str, object]]
    """(config, tokens, device, dtype, batched) -> inputs by every name an implementation may give them"""
    flops: Callable[[M2Config, int, tuple], float] = lambda c, tokens, args: 0.0
    """(config, tokens, args) -> forward FLOPs (0 for the memory-bound ops)"""
    forward_bytes: Callable[[tuple, object], float] = lambda args, out: float(
        sum(t.nbytes for t in tensors(args)) + sum(t.nbytes for t in tensors(out)))
    """(args, output) -> least bytes of a forward: every input read and every output written once"""
    backward_bytes: Callable[[tuple, object, float], float] = lambda args, out, forward: float(
        sum(t.nbytes for t in tensors(args)) + sum(t.nbytes for t in tensors(out) if t.is_floating_point())
        + sum(t.nbytes for t in tensors(args) if t.requires_grad))
    """(args, output, forward bytes) -> least bytes of the backward alone: the inputs and output gradients
    read, the input gradients written"""
    max_tokens: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)
    """(implementation, mode) -> most tokens it runs at (the slow references)"""
    graph_forward: bool = False
    """also time the forward replayed from a CUDA graph (the bandwidth-bound ops, whose host time shows)"""


def moe_flops(c: M2Config, tokens: int, args: tuple) -> float:
    """The three expert GEMMs over the T*K routed rows."""
    return 6.0 * tokens * c.num_experts_per_tok * c.hidden_size * c.intermediate_size


def moe_bytes(args: tuple, out: object) -> float:
    """The weights of the experts the routing hits, once, and x in and out (the expert weight tensors hold
    every expert: counting them whole would overstate a small batch's traffic 30 times)."""
    x_TD, w1_EID, experts_TK = args[0], args[1], args[4]
    hit = int(torch.unique(experts_TK).numel())
    return float(3 * hit * w1_EID[0].nbytes + 2 * x_TD.nbytes)


def route_flops(c: M2Config, tokens: int, args: tuple) -> float:
    """A route that takes hidden states does the gate GEMM [T, D] x [D, E] itself."""
    takes_hidden = any(isinstance(a, torch.Tensor) and a.shape[-1] == c.hidden_size for a in args)
    return 2.0 * tokens * c.hidden_size * c.num_local_experts if takes_hidden else 0.0


BENCHES = {
    "moe_experts": OpBench("moe_experts", moe_inputs, flops=moe_flops, forward_bytes=moe_bytes,
                           # reads the hit experts' weights again and writes their gradients
                           backward_bytes=lambda args, out, forward: 2 * forward,
                           max_tokens={("torch", "fwd"): 4096, ("torch", "fwd+bwd"): 1}),
    "rms_norm": OpBench("rms_norm", rms_norm_inputs, graph_forward=True),
    "qk_norm_rope": OpBench("qk_norm_rope", qk_norm_rope_inputs, graph_forward=True),
    "route": OpBench("route", route_inputs, flops=route_flops, graph_forward=True),
    "linear_logprobs": OpBench("linear_logprobs", linear_logprobs_inputs,
                               flops=lambda c, tokens, args: 2.0 * tokens * c.hidden_size * c.vocab_size),
}


def sizes(c: M2Config, tokens: int, args: tuple, experts_TK: torch.Tensor | None) -> dict[str, object]:
    """The sizes a kernel module's `flops` / `bytes_moved` may ask for, by the names they use."""
    named: dict[str, object] = {
        **aliases(tokens, "tokens", "num_tokens", "rows", "num_rows"),
        **aliases(c.hidden_size, "hidden", "hidden_size", "width"), "inner": c.intermediate_size,
        **aliases(c.num_experts_per_tok, "top_k", "k"), "num_experts": c.num_local_experts,
        "vocab": c.vocab_size, "q_width": c.q_dim, "k_width": c.kv_dim, "rotary_dim": c.rotary_dim,
        "elem_bytes": next(t.element_size() for t in tensors(args) if t.is_floating_point()),
    }
    if experts_TK is not None:
        named["num_active_experts"] = int(torch.unique(experts_TK).numel())
    return named


def kernel_count(module: object, helper: str, named: dict[str, object]) -> float | None:
    """module.helper(...) bound by parameter name, for one forward (backward left at its default); None
    where the module has no such helper or asks for a size this script does not know."""
    fn = getattr(module, helper, None)
    if fn is None:
        return None
    try:
        return float(fn(*bind(fn, named)))
    except (TypeError, ValueError, KeyError):  # a helper this script cannot call: count here instead
        return None


def tensors(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors(v)]
    return []


def relative_error(out: object, ref: object) -> float:
    """Largest relative L2 difference over the float outputs; an integer output of the same shape as float
    ones (expert ids beside their weights) orders both by id first, so top-k order does not count."""
    got, want = tensors(out), tensors(ref)
    if len(got) != len(want):
        return float("inf")
    order_got = next((t.argsort(-1) for t in got if not t.is_floating_point()), None)
    order_want = next((t.argsort(-1) for t in want if not t.is_floating_point()), None)
    worst = 0.0
    for a, b in zip(got, want):
        if order_got is not None and order_want is not None and a.shape == order_got.shape:
            a, b = a.gather(-1, order_got), b.gather(-1, order_want)
        if not a.is_floating_point():
            worst = max(worst, float((a != b).float().mean()))
            continue
        a, b = a.detach().float(), b.detach().float()
        worst = max(worst, float((a - b).norm() / b.norm().clamp(min=1e-30)))
    return worst


# ---- one op --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    op: str
    implementation: str
    mode: str
    tokens: int
    ms: float = float("nan")
    tflop_s: float = float("nan")
    tb_s: float = float("nan")
    roofline_pct: float = float("nan")
    vs_best_torch: float = float("nan")
    rel_err: float = float("nan")
    note: str = ""
    graph_ms: float = float("nan")
    graph_roofline_pct: float = float("nan")


@dataclasses.dataclass(frozen=True)
class Peaks:
    flop_s: float
    bytes_s: float


def implementation(op: str, name: str) -> Callable[..., object]:
    with ops.using(**{op: name}):
        return ops.get(op)


def is_pytorch(name: str) -> bool:
    return not name.startswith("triton")


def probe_layout(bench: OpBench, fn: Callable[..., object], c: M2Config, device: str, dtype: torch.dtype,
                 extra: dict) -> bool:
    """Whether the op takes a leading batch dimension: the first layout the reference implementation `fn`
    runs at 4 tokens (flat first). Raises TypeError with every attempt's error when neither does."""
    errors = []
    for batched in (False, True):
        try:
            args = bind(fn, bench.inputs(c, 4, device, dtype, batched, **extra))
            with torch.no_grad():
                fn(*args)
            return batched
        except Exception as e:  # noqa: BLE001 - any failure: try the next layout, report all if none runs
            errors.append(f"{'batched' if batched else 'flat'}: {type(e).__name__}: {e}")
    raise TypeError(f"cannot feed {bench.op}{inspect.signature(fn)}: " + "; ".join(errors))


@dataclasses.dataclass(frozen=True)
class Counts:
    """What one forward call must do, and who counted it."""

    flops: float
    bytes: float | None
    """None: counted from the call's own tensors (`OpBench.forward_bytes`)"""
    flops_source: str
    bytes_source: str


def forward_counts(bench: OpBench, c: M2Config, tokens: int, args: tuple, module: object) -> Counts:
    """The kernel module's `flops` and `bytes_moved` where it has them, else this script's counts."""
    named = sizes(c, tokens, args, args[4] if bench.op == "moe_experts" else None)
    flops, nbytes = kernel_count(module, "flops", named), kernel_count(module, "bytes_moved", named)
    name = getattr(module, "__name__", "")
    return Counts(bench.flops(c, tokens, args) if flops is None else flops, nbytes,
                  f"{name}.flops" if flops is not None else "this script",
                  f"{name}.bytes_moved" if nbytes is not None else "this script")


def moe_expert_weights(c: M2Config, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One layer's w1, w3 [E, I, D] and w2 [E, D, I], shared by every token count (7 GB at M2's shapes)."""
    E, I, D = c.num_local_experts, c.intermediate_size, c.hidden_size
    shapes = {"w1": (E, I, D), "w3": (E, I, D), "w2": (E, D, I)}
    return {name: (0.02 * torch.randn(shape, device=device, dtype=dtype)).requires_grad_()
            for name, shape in shapes.items()}


def skip_reason(bench: OpBench, row: Row, last: dict[tuple[str, str], tuple[int, float]], spent_s: float,
                budget_s: float, max_call_ms: float) -> str:
    """Why `row` is not run ("" when it is): over its implementation's token cap, past the op's budget, or
    one call expected (linearly in tokens from the last run of the same implementation and mode) too slow."""
    key = (row.implementation, row.mode)
    if row.tokens > bench.max_tokens.get(key, row.tokens):
        return f"skipped: over {bench.max_tokens[key]} tokens (slow reference)"
    if spent_s > budget_s:
        return f"skipped: the op's {budget_s:.0f} s budget is spent"
    expected_ms = last[key][1] * row.tokens / last[key][0] if key in last else 0.0
    if expected_ms > max_call_ms:
        return f"skipped: ~{expected_ms / 1e3:.1f} s a call expected"
    return ""


def run_op(bench: OpBench, c: M2Config, token_counts: list[int], device: str, dtype: torch.dtype, peaks: Peaks,
           budget_s: float, max_call_ms: float, reps: int) -> list[Row]:
    """Every implementation of one op at every token count, forward and forward+backward."""
    impls = ops.available(bench.op)
    reference_name = "torch" if "torch" in impls else impls[0]
    impls = [reference_name] + [name for name in impls if name != reference_name]
    reference_fn = implementation(bench.op, reference_name)
    kernel_module = sys.modules.get(getattr(implementation(bench.op, "triton"), "__module__", "")) \
        if "triton" in impls else None
    extra = {"expert_weights": moe_expert_weights(c, device, dtype)} if bench.op == "moe_experts" else {}
    try:
        batched = probe_layout(bench, reference_fn, c, device, dtype, extra)
    except TypeError as e:
        print(f"  skipped: {e}", flush=True)
        return [Row(bench.op, "-", "-", 0, note=f"skipped: {str(e)[:300]}")]
    rows: list[Row] = []
    start = time.perf_counter()
    last: dict[tuple[str, str], tuple[int, float]] = {}  # (impl, mode) -> (tokens, ms) of its last run
    for tokens in token_counts:
        try:
            args = bind(reference_fn, bench.inputs(c, tokens, device, dtype, batched, **extra))
            counts = forward_counts(bench, c, tokens, args, kernel_module)
            reference = None
            if tokens <= bench.max_tokens.get((reference_name, "fwd"), tokens):
                with torch.no_grad():
                    reference = reference_fn(*args)
        except Exception as e:  # noqa: BLE001 - out of memory, most likely: the next token count may fit
            rows.append(Row(bench.op, reference_name, "-", tokens, note=f"error: {type(e).__name__}: {str(e)[:200]}"))
            print(f"  {rows[-1]}", flush=True)
            continue
        grad_inputs = [t for t in tensors(args) if t.requires_grad]
        if tokens == token_counts[0]:
            print(f"  forward counts: FLOPs from {counts.flops_source}, bytes from {counts.bytes_source}", flush=True)
        for mode in ("fwd", "fwd+bwd"):
            group = [Row(bench.op, name, mode, tokens) for name in impls]
            for row in group:
                row.note = skip_reason(bench, row, last, time.perf_counter() - start, budget_s, max_call_ms)
                if not row.note:
                    try:
                        measure(row, bench, implementation(bench.op, row.implementation), args, grad_inputs,
                                reference, counts, peaks, device, reps)
                    except torch.cuda.OutOfMemoryError:
                        row.note = "out of memory"
                    except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
                        row.note = f"error: {type(e).__name__}: {str(e)[:200]}"
                    for t in grad_inputs:
                        t.grad = None
                    if math.isfinite(row.ms):
                        last[(row.implementation, mode)] = (tokens, row.ms)
                print(f"  {row}", flush=True)
            best = min((r.ms for r in group if is_pytorch(r.implementation) and math.isfinite(r.ms)),
                       default=math.nan)
            for row in group:
                row.vs_best_torch = best / row.ms
            rows += group
        del args, grad_inputs, reference
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def measure(row: Row, bench: OpBench, fn: Callable[..., object], args: tuple, grad_inputs: list[torch.Tensor],
            reference: object, counts: Counts, peaks: Peaks, device: str, reps: int) -> None:
    """Fill `row` with the time of fn(*args) (forward, or forward+backward with fixed random output
    gradients), its rates and roofline fraction, and its forward's difference from `reference`."""
    with torch.no_grad():
        out = fn(*args)
    if reference is not None:
        row.rel_err = relative_error(out, reference)
    nbytes = bench.forward_bytes(args, out) if counts.bytes is None else counts.bytes
    flops = counts.flops
    if row.mode == "fwd":
        def forward() -> None:
            with torch.no_grad():
                fn(*args)
        row.ms = time_ms(forward, device, reps=reps)
        if bench.graph_forward and device == "cuda":
            try:
                row.graph_ms = time_graph_ms(forward)
                row.graph_roofline_pct = 100 * max(flops / peaks.flop_s, nbytes / peaks.bytes_s) / (row.graph_ms / 1e3)
            except RuntimeError as e:  # not capturable (a host sync): the row keeps its plain time
                row.note = f"no graph: {str(e)[:80]}"
    else:
        differentiable = [t for t in tensors(fn(*args)) if t.requires_grad]
        if not differentiable:
            row.note = "no differentiable output"
            return
        grads = [torch.randn_like(t) for t in differentiable]
        row.note = f"backward: {type(differentiable[0].grad_fn).__name__}"
        del differentiable  # frees this forward's saved activations before timing

        def forward_backward() -> None:
            torch.autograd.backward([t for t in tensors(fn(*args)) if t.requires_grad], grads)
        row.ms = time_ms(forward_backward, device, grad_to_none=grad_inputs, reps=reps)
        flops, nbytes = 3 * flops, nbytes + bench.backward_bytes(args, out, nbytes)
    seconds = row.ms / 1e3
    row.tflop_s = flops / seconds / 1e12 if flops else math.nan
    row.tb_s = nbytes / seconds / 1e12
    row.roofline_pct = 100 * max(flops / peaks.flop_s, nbytes / peaks.bytes_s) / seconds


# ---- the FP8 block linear (no ops op) ------------------------------------------------------------------
def run_fp8_linear(c: M2Config, token_counts: list[int], device: str, dtype: torch.dtype, peaks: Peaks,
                   budget_s: float, max_call_ms: float, reps: int) -> list[Row]:
    """x [T, hidden] through the stacked q/k/v projection held in FP8 with block scales, forward only:
    triton (fp8 read in the kernel) against F.linear on the bf16 weight dequantised once, and the reference
    that dequantises every call."""
    try:
        kernel = importlib.import_module("m2rl.kernels.fp8_block_linear")
    except Exception as e:  # noqa: BLE001 - no Triton: the torch rows alone
        print(f"  no triton row ({type(e).__name__}: {e})", flush=True)
        kernel = None
    N, K = c.q_dim + 2 * c.kv_dim, c.hidden_size
    block = (128, 128) if min(N, K) >= 128 else (32, 32)  # the smoke config's widths of 64 hold 32-blocks
    codes = (torch.randn(N, K, device=device) * FP8_MAX / 4).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    scales = (4 * 0.02 / FP8_MAX) * (0.5 + torch.rand(-(-N // block[0]), -(-K // block[1]), device=device))
    dense = dequantize_fp8_blocks(codes, scales, block).to(dtype)
    impls: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "torch": lambda x: torch.nn.functional.linear(x, dense),
        # kernels/fp8_block_linear.py's reference, inlined so the row runs where Triton is missing
        "torch_dequant": lambda x: torch.nn.functional.linear(x, dequantize_fp8_blocks(codes, scales, block).to(x.dtype)),
    }
    if kernel is not None:
        impls["triton"] = lambda x: kernel.fp8_block_linear(x, codes, scales, block)
    elem = torch.finfo(dtype).bits // 8
    weight_bytes = {"torch": N * K * elem, "torch_dequant": N * K * (1 + 4 + 4 + 2 * elem),
                    "triton": N * K + 4 * scales.numel()}  # the reference: fp8 read, fp32 written + read, cast
    print(f"  [{N}, {K}] weight, {block[0]}x{block[1]} blocks; bytes: each implementation's own least traffic",
          flush=True)
    bench = OpBench(FP8_LINEAR, inputs=lambda *args: {})
    rows: list[Row] = []
    start = time.perf_counter()
    last: dict[tuple[str, str], tuple[int, float]] = {}
    for tokens in token_counts:
        x = torch.randn(tokens, K, device=device, dtype=dtype)
        with torch.no_grad():
            reference = impls["torch"](x)
        group = [Row(FP8_LINEAR, name, "fwd", tokens) for name in impls]
        for row in group:
            row.note = skip_reason(bench, row, last, time.perf_counter() - start, budget_s, max_call_ms)
            if row.note:
                print(f"  {row}", flush=True)
                continue
            fn = impls[row.implementation]
            try:
                with torch.no_grad():
                    row.rel_err = relative_error(fn(x), reference)
                    row.ms = time_ms(lambda fn=fn, x=x: fn(x), device, reps=reps)
            except Exception as e:  # noqa: BLE001 - one failing implementation must not end the run
                row.note = f"error: {type(e).__name__}: {str(e)[:200]}"
            if math.isfinite(row.ms):
                last[(row.implementation, "fwd")] = (tokens, row.ms)
                flops = 2.0 * tokens * N * K
                nbytes = weight_bytes[row.implementation] + tokens * (K + N) * elem
                row.tflop_s = flops / (row.ms / 1e3) / 1e12
                row.tb_s = nbytes / (row.ms / 1e3) / 1e12
                row.roofline_pct = 100 * max(flops / peaks.flop_s, nbytes / peaks.bytes_s) / (row.ms / 1e3)
            print(f"  {row}", flush=True)
        best = min((r.ms for r in group if is_pytorch(r.implementation) and math.isfinite(r.ms)), default=math.nan)
        for row in group:
            row.vs_best_torch = best / row.ms
        rows += group
    return rows


# ---- main ----------------------------------------------------------------------------------------------
def import_kernels(interpret: bool) -> None:
    """Register the Triton kernels; on the CPU under Triton's interpreter, which must be on before Triton
    is first imported."""
    if interpret:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        importlib.import_module("m2rl.kernels")
    except Exception as e:  # noqa: BLE001 - no Triton, or a kernel module that fails: torch paths only
        print(f"m2rl.kernels not imported ({type(e).__name__}: {e}): no Triton rows", flush=True)


def registered_ops(wanted: list[str]) -> dict[str, list[str]]:
    found = {}
    for op in wanted:
        try:
            found[op] = ops.available(op)
        except KeyError:
            print(f"{op}: not registered in this checkout, skipped", flush=True)
    return found


def print_table(rows: list[Row]) -> None:
    def num(x: float, fmt: str) -> str:
        return format(x, fmt) if math.isfinite(x) else "-"

    print("| op | impl | mode | tokens | ms | TFLOP/s | TB/s | % roof | x torch | err | graph ms | graph % roof | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.op} | {r.implementation} | {r.mode} | {r.tokens} | {num(r.ms, '.3f')} | {num(r.tflop_s, '.1f')} "
              f"| {num(r.tb_s, '.2f')} | {num(r.roofline_pct, '.1f')} | {num(r.vs_best_torch, '.2f')} "
              f"| {num(r.rel_err, '.1e')} | {num(r.graph_ms, '.3f')} | {num(r.graph_roofline_pct, '.1f')} | {r.note} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="+", choices=(*KNOWN_OPS, FP8_LINEAR),
                        help=f"default: all ({FP8_LINEAR} only on the GPU: forward only, the smoke test wants both modes)")
    parser.add_argument("--tokens", type=int, nargs="+", help=f"token counts (default {DEFAULT_TOKENS})")
    parser.add_argument("--op-budget", type=float, default=40.0,
                        help="seconds per op; its token counts left when they are spent are skipped")
    parser.add_argument("--max-call-ms", type=float, default=2000.0,
                        help="skip a case whose one call is expected (from the last token count) to take longer")
    parser.add_argument("--smoke", action="store_true", help="tiny config on the CPU: proves the script runs")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        parser.error("no CUDA device here: run with --smoke")
    config = smoke_config() if args.smoke else real_shape_config(1)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    token_counts = args.tokens or list(SMOKE_TOKENS if args.smoke else DEFAULT_TOKENS)
    import_kernels(interpret=device == "cpu")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"{dtype}; hidden {config.hidden_size}, experts {config.num_local_experts} of {config.intermediate_size}, "
          f"top-{config.num_experts_per_tok}, vocab {config.vocab_size}", flush=True)
    wanted = args.ops or [*KNOWN_OPS, *(() if args.smoke else (FP8_LINEAR,))]
    found = registered_ops([op for op in wanted if op != FP8_LINEAR])
    print("registered: " + ", ".join(f"{op}={'/'.join(impls)}" for op, impls in found.items()), flush=True)
    peaks = Peaks(matmul_peak(device, 256 if args.smoke else 8192, dtype),
                  copy_bandwidth(device) if device == "cuda" else float("nan"))
    print(f"measured peaks: {dtype} matmul {peaks.flop_s / 1e12:.3g} TFLOP/s, copy {peaks.bytes_s / 1e12:.3g} TB/s",
          flush=True)
    rows: list[Row] = []
    for op in found:
        started = time.perf_counter()
        print(f"{op}:", flush=True)
        try:
            # the token caps of the slow references are for the released shapes; the smoke run's are tiny
            bench = dataclasses.replace(BENCHES[op], max_tokens={}) if args.smoke else BENCHES[op]
            rows += run_op(bench, config, token_counts, device, dtype, peaks, args.op_budget,
                           math.inf if args.smoke else args.max_call_ms, reps=1 if args.smoke else 5)
        except Exception as e:  # noqa: BLE001 - one op must not end the run
            rows.append(Row(op, "-", "-", 0, note=f"error: {type(e).__name__}: {str(e)[:200]}"))
            print(f"  {rows[-1]}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"{op}: {time.perf_counter() - started:.1f} s", flush=True)
    if FP8_LINEAR in wanted:
        started = time.perf_counter()
        print(f"{FP8_LINEAR}:", flush=True)
        # tl.dot runs in bf16/fp16: the smoke run's fp32 becomes fp16 here
        fp8_dtype = torch.float16 if dtype == torch.float32 else dtype
        rows += run_fp8_linear(config, token_counts, device, fp8_dtype, peaks, args.op_budget,
                               math.inf if args.smoke else args.max_call_ms, reps=1 if args.smoke else 5)
        print(f"{FP8_LINEAR}: {time.perf_counter() - started:.1f} s", flush=True)
    print()
    print_table(rows)
    print(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                      "matmul_peak_tflop_s": peaks.flop_s / 1e12, "copy_bandwidth_tb_s": peaks.bytes_s / 1e12,
                      "rows": [dataclasses.asdict(r) for r in rows]}))


if __name__ == "__main__":
    main()
