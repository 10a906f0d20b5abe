"""Learner step benchmark: one forward + backward of per-token log-probs through m2rl's learner against
transformers' MiniMaxM2ForCausalLM (cross-entropy on labels) on the same weights and card, in one run.

The model has the released M2 layer shapes (hidden 3072, 48 heads of 128 with 8 KV heads, 256 experts of
1536, top-8, vocab 200064) and `--layers` of them (default 2), random bf16 weights, train mode, no gradient
checkpointing. The batch is `--batch` rows of `--seq` random tokens, in three layouts:
- full:   every row `--seq` tokens long (the issue's 4 x 2048);
- padded: rows of random lengths in [seq/2, seq], right-padded (the learner trims to the longest row);
- packed: the same rows laid end to end (`LearnerConfig.packing`; skipped where the learner has no packing).
transformers runs full and padded (labels -100 on padding); it has no packed path.

Rows (`--rows`), each in each layout:
- transformers: `model(input_ids, attention_mask, labels).loss.backward()`, its default attention and experts
  implementations (printed);
- m2rl torch / fast_torch / triton / default: `Learner.compute_gradients` on a RolloutBatch, the learner's
  own code (m2rl.model.logprobs through the learner's micro-batching, one micro-batch here), with its CISPO loss
  over every real token, entropy off, the LM head in bf16 unless `--lm-head-fp32` (the learner's default is
  fp32; transformers' head is bf16). torch: every op forced to its torch reference; fast_torch: the fast
  PyTorch path (`FAST_TORCH`: the MoE through torch._grouped_mm, the LM head's chunked autograd Function, the
  rest torch); triton: every op with a Triton implementation forced to it; default: nothing forced, the
  device's defaults as a learner gets them (`ops.select_defaults`: on CUDA the Triton kernels, and under
  autograd the MoE on cuBLAS grouped GEMMs, `ops.PREFERRED_TRAINING`). The run prints each row's choices.

Columns:
- step ms: mean of `--steps` timed steps after `--warmup` warm-up ones. The first step (compilation) is free;
  when the others do not fit `--row-budget` seconds, one warm-up and as many timed steps as fit (at least
  one); a row whose first step passes `--first-step-limit` seconds is not timed;
- tok/s: real (unpadded) tokens / step time;
- MFU: model FLOPs of the real tokens (`M2Config.flops_per_token` x3 for forward+backward, active experts only,
  LM head included, causal attention at each row's length) / step time / 989 TFLOP/s (dense bf16 of an
  H100/H200 SXM), and the same over the bf16 matmul peak measured in this run (8192^3);
- peak GiB: torch.cuda.max_memory_allocated over the row's steps; step GiB: that peak less what was allocated
  when the row began (weights), i.e. gradients and activations, comparable between the two models;
- x hf: transformers' step time in the same layout (padded for packed) / this one.

From a bare checkout on a GPU machine (torch, triton, transformers there; no pip install):
    . scripts/device_env.sh && python3 -m m2rl.benchmarks.learner_gpu
    ... --layers 2 --batch 4 --seq 2048 --rows transformers fast_torch triton default --layouts full padded packed
On the CPU, `--smoke` runs a tiny config in fp32 (Triton kernels under its interpreter), no speed claims:
    .venv/bin/python -m m2rl.benchmarks.learner_gpu --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable

import torch
from m2rl.benchmarks.gpu_decode import random_model, real_shape_config, timed, to_transformers
from m2rl.benchmarks.kernels import KNOWN_OPS, import_kernels, matmul_peak, smoke_config
from m2rl.model import ops
from m2rl.model.config import M2Config
from m2rl.model.logprobs import token_logprobs
from m2rl.model.m2 import M2ForCausalLM
from m2rl.rl.batch import RolloutBatch
from m2rl.rl.learner import Learner, LearnerConfig

H100_BF16_PEAK = 989e12
"""Dense bf16 tensor-core FLOP/s of an H100/H200 SXM (the spec sheet's figure without sparsity)."""
IMPLS = ("torch", "fast_torch", "triton", "default")
LAYOUTS = ("full", "padded", "packed")


# ---- batches -------------------------------------------------------------------------------------------
def row_lengths(layout: str, rows: int, seq: int, gen: torch.Generator) -> list[int]:
    if layout == "full":
        return [seq] * rows
    return torch.randint(seq // 2, seq + 1, (rows,), generator=gen).tolist()


def rollout_batch(lengths: list[int], seq: int, vocab: int, device: str, gen: torch.Generator) -> RolloutBatch:
    """Right-padded random rows, every real token a loss token; generator log-probs near a uniform policy's
    (so the CISPO ratios are near 1) and advantages of +-1."""
    ids = torch.randint(0, vocab, (len(lengths), seq), generator=gen)
    real = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    old = torch.full((len(lengths), seq), -math.log(vocab)) * real
    advantages = torch.where(torch.rand(len(lengths), 1, generator=gen) < 0.5, -1.0, 1.0) * real
    return RolloutBatch(input_ids=(ids * real).to(device), loss_mask=real.long().to(device),
                        old_logprobs=old.to(device), advantages=advantages.to(device),
                        attention_mask=real.long().to(device))


# ---- accounting ----------------------------------------------------------------------------------------
def model_flops(config: M2Config, lengths: list[int]) -> float:
    """Forward+backward FLOPs of the real tokens: a token at position p attends to p + 1 tokens, so a row
    of n tokens costs n tokens at an average context of (n + 1) / 2."""
    return float(sum(n * config.flops_per_token(context_len=(n + 1) / 2, training=True) for n in lengths))


FAST_TORCH = {"moe_experts": "grouped_mm", "linear_logprobs": "chunked"}
"""The fast PyTorch path's implementation of each op that has one besides the reference (cuBLAS grouped
GEMMs for the MoE, a chunked autograd Function for the LM head); every other op runs its torch reference."""


def op_choices(impl: str) -> dict[str, str]:
    """The ops.using(...) choices of one m2rl row, over the ops registered here; {} for `default` (the
    device's defaults, `ops.select_defaults`: what a learner on this device runs, training choices included)."""
    if impl == "default":
        return {}
    registered = {}
    for op in KNOWN_OPS:
        try:
            registered[op] = ops.available(op)
        except KeyError:
            continue
    choices = {op: "torch" for op in registered}
    if impl == "fast_torch":
        choices.update({op: name for op, name in FAST_TORCH.items() if name in registered.get(op, ())})
    elif impl == "triton":
        choices.update({op: "triton" for op, impls in registered.items() if "triton" in impls})
    return choices


def describe_choices(impl: str, device: str) -> str:
    """`op=implementation, ...` of a row as it runs on `device` (the training choice where it differs)."""
    if impl != "default":
        return ", ".join(f"{op}={name}" for op, name in op_choices(impl).items())
    parts = []
    for op in KNOWN_OPS:
        try:
            name, training = ops.selected(op, device), ops.selected_training(op, device)
        except KeyError:
            continue
        parts.append(f"{op}={name}" + (f" (under autograd: {training})" if training != name else ""))
    return ", ".join(parts)


# ---- timing --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    implementation: str
    layout: str
    tokens: int
    padded_tokens: int
    step_ms: float = float("nan")
    tok_per_s: float = float("nan")
    mfu_pct: float = float("nan")
    mfu_measured_pct: float = float("nan")
    peak_gib: float = float("nan")
    step_gib: float = float("nan")
    vs_transformers: float = float("nan")
    steps_timed: int = 0
    note: str = ""


def time_steps(step: Callable[[], object], device: str, warmup: int, steps: int, budget_s: float,
               first_step_limit_s: float) -> tuple[list[float], str]:
    """(timed step seconds, note). The first step compiles (Triton, FlexAttention) and is not counted; a row
    whose first step passes `first_step_limit_s` stops there. The second step sets the pace: if the remaining
    warm-ups and `steps` timed steps fit `budget_s` they all run, else the second step is timed and more
    follow while they fit."""
    first = timed(step, device)
    if first > first_step_limit_s:
        return [], f"not timed: the first step took {first:.0f} s (limit {first_step_limit_s:.0f} s)"
    start = time.perf_counter()
    pace = timed(step, device)
    if pace * (max(warmup - 2, 0) + steps) <= budget_s - pace:
        for _ in range(warmup - 2):
            timed(step, device)
        return [timed(step, device) for _ in range(steps)], ""
    times = [pace]
    while len(times) < steps and time.perf_counter() - start + times[-1] <= budget_s:
        times.append(timed(step, device))
    return times, f"{len(times)} step{'s' if len(times) > 1 else ''} timed after 1 warm-up ({budget_s:.0f} s budget)"


def run_row(row: Row, step: Callable[[], object], zero_grad: Callable[[], None], device: str, flops: float,
            peak_flops: float, args: argparse.Namespace) -> None:
    """Time `step`, filling `row` with its time, rates and memory; an exception becomes the row's note."""
    zero_grad()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if device == "cuda" else 0
    try:
        times, row.note = time_steps(step, device, args.warmup, args.steps, args.row_budget,
                                     args.first_step_limit)
    except torch.cuda.OutOfMemoryError:
        times, row.note = [], "out of memory"
    except Exception as e:  # noqa: BLE001 - one failing row must not end the run
        times, row.note = [], f"error: {type(e).__name__}: {str(e)[:200]}"
    if device == "cuda":
        row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        row.step_gib = (torch.cuda.max_memory_allocated() - resident) / 2**30
    if times and args.profile:
        print_profile(row, step, device)
    zero_grad()
    if not times:
        return
    seconds = sum(times) / len(times)
    row.steps_timed = len(times)
    row.step_ms = 1e3 * seconds
    row.tok_per_s = row.tokens / seconds
    row.mfu_pct = 100 * flops / seconds / H100_BF16_PEAK if device == "cuda" else math.nan
    row.mfu_measured_pct = 100 * flops / seconds / peak_flops


def print_profile(row: Row, step: Callable[[], object], device: str, top: int = 25) -> None:
    """One more step under torch.profiler: the `top` kernels by their own device time (where the step goes)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device == "cuda":
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"profile of one step, {row.implementation} {row.layout}:", flush=True)
    print(prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=70), flush=True)


# ---- the two learners ----------------------------------------------------------------------------------
def m2rl_learner(model: M2ForCausalLM, packed: bool, tokens: int, args: argparse.Namespace) -> Learner | str:
    """The learner over `model` with one micro-batch of `tokens`, packed or padded; a string says why not."""
    fields = {f.name: f for f in dataclasses.fields(LearnerConfig)}
    # bf16=False: the weights are bf16 already, and autocast would also cast the router's fp32 GEMM
    options: dict[str, object] = {"micro_batch_tokens": tokens, "lm_head_fp32": args.lm_head_fp32,
                                  "compute_entropy": False, "bf16": False, "gradient_checkpointing": False}
    if "packing" in fields:
        options["packing"] = packed
    elif packed:
        return "skipped: LearnerConfig has no packing option in this checkout"
    learner = Learner(model, LearnerConfig(**options))
    if packed and not getattr(learner, "packing", True):
        return "skipped: the learner declined packing for this model"
    return learner


def m2rl_step(learner: Learner, batch: RolloutBatch) -> None:
    """What the learner does for one optimizer step's gradients (the optimizer step itself is not timed)."""
    learner.model.zero_grad(set_to_none=True)
    learner.compute_gradients(batch)


def parity(model: M2ForCausalLM, hf: torch.nn.Module, vocab: int, device: str) -> str:
    """Mean token log-prob of one random row under both models (same weights): they must agree."""
    ids = torch.randint(0, vocab, (1, 256), device=device)
    with torch.no_grad(), ops.using(**op_choices("torch")):
        ours = float(token_logprobs(model, ids)[:, 1:].mean())
        theirs = -float(hf(input_ids=ids, labels=ids, use_cache=False).loss)
    return f"mean log-prob of a random row: m2rl {ours:.4f}, transformers {theirs:.4f}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="rows")
    parser.add_argument("--seq", type=int, default=2048, help="tokens of the longest row")
    parser.add_argument("--rows", nargs="+", default=["transformers", *IMPLS], choices=["transformers", *IMPLS])
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (2 at least: the first compiles)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--row-budget", type=float, default=15.0,
                        help="seconds of a row's steps after its first (fewer steps when they do not fit)")
    parser.add_argument("--first-step-limit", type=float, default=180.0,
                        help="a row whose first step (compilation included) takes longer is not timed")
    parser.add_argument("--lm-head-fp32", action="store_true", help="the learner's fp32 LM head (its default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true",
                        help="after each timed row, print its top kernels by device time (torch.profiler)")
    parser.add_argument("--smoke", action="store_true", help="tiny config on the CPU: proves the script runs")
    args = parser.parse_args()
    args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.device == "cpu" and not args.smoke:
        parser.error("no CUDA device here: run with --smoke")
    if args.smoke:
        # 1 s of budget: the eager rows take the full schedule, the interpreted Triton ones the short one
        args.batch, args.seq, args.warmup, args.steps, args.row_budget = min(args.batch, 2), min(args.seq, 12), 2, 1, 1.0
    return args


def make_batches(layouts: list[str], rows: int, seq: int, vocab: int, device: str,
                 seed: int) -> dict[str, RolloutBatch]:
    """One batch per layout; packed holds the same rows as padded."""
    gen = torch.Generator().manual_seed(seed)
    batches: dict[str, RolloutBatch] = {}
    for layout in layouts:
        if layout == "packed" and "padded" in batches:
            batches[layout] = batches["padded"]
        else:
            batches[layout] = rollout_batch(row_lengths(layout, rows, seq, gen), seq, vocab, device, gen)
    return batches


def new_row(name: str, layout: str, batch: RolloutBatch) -> Row:
    lengths = batch.lengths()
    return Row(name, layout, sum(lengths), sum(lengths) if layout == "packed" else len(lengths) * max(lengths))


def transformers_rows(model: M2ForCausalLM, batches: dict[str, RolloutBatch], peak_flops: float,
                      args: argparse.Namespace) -> list[Row]:
    """transformers' step (labels, cross-entropy, backward) on a copy of `model`'s weights, freed on return."""
    hf = to_transformers(model).train()
    print(f"transformers: attention {hf.config._attn_implementation}, experts "
          f"{getattr(hf.config, '_experts_implementation', 'eager')}; "
          f"{parity(model, hf, model.config.vocab_size, args.device)}", flush=True)
    rows: list[Row] = []
    for layout in (layout for layout in args.layouts if layout != "packed"):
        batch = batches[layout]
        width = max(batch.lengths())
        ids, mask = batch.input_ids[:, :width], batch.attention_mask[:, :width]
        labels = ids.masked_fill(mask == 0, -100)

        def hf_step(ids: torch.Tensor = ids, mask: torch.Tensor = mask, labels: torch.Tensor = labels) -> None:
            hf.zero_grad(set_to_none=True)
            hf(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        rows.append(new_row("transformers", layout, batch))
        run_row(rows[-1], hf_step, lambda: hf.zero_grad(set_to_none=True), args.device,
                model_flops(model.config, batch.lengths()), peak_flops, args)
        print(f"  {rows[-1]}", flush=True)
    return rows


def m2rl_rows(model: M2ForCausalLM, impl: str, batches: dict[str, RolloutBatch], peak_flops: float,
              args: argparse.Namespace) -> list[Row]:
    """The learner's step with the ops of `impl` (`op_choices`), in every layout."""
    rows: list[Row] = []
    for layout in args.layouts:
        batch = batches[layout]
        rows.append(row := new_row(f"m2rl {impl}", layout, batch))
        try:
            learner = m2rl_learner(model, layout == "packed", row.padded_tokens, args)
        except Exception as e:  # noqa: BLE001 - a LearnerConfig this script does not know how to fill
            learner = f"error: {type(e).__name__}: {str(e)[:200]}"
        if isinstance(learner, str):
            row.note = learner
        else:
            with ops.using(**op_choices(impl)):
                run_row(row, functools.partial(m2rl_step, learner, batch), lambda: model.zero_grad(set_to_none=True),
                        args.device, model_flops(model.config, batch.lengths()), peak_flops, args)
        print(f"  {row}", flush=True)
    return rows


def main() -> None:
    args = parse_args()
    device = args.device
    config = smoke_config() if args.smoke else real_shape_config(args.layers)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    import_kernels(interpret=device == "cpu")
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"{dtype}; {config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_local_experts} "
          f"experts of {config.intermediate_size}, top-{config.num_experts_per_tok}, vocab {config.vocab_size}; "
          f"{args.batch} x {args.seq} tokens", flush=True)
    ops.select_defaults(device)  # the `default` row's choices, as load_pretrained would make them
    for impl in (name for name in IMPLS if name in args.rows):
        print(f"m2rl {impl} row ops: {describe_choices(impl, device)}", flush=True)
    peak_flops = matmul_peak(device, 256 if args.smoke else 8192, dtype)
    print(f"measured {dtype} matmul peak: {peak_flops / 1e12:.3g} TFLOP/s", flush=True)
    batches = make_batches(args.layouts, args.batch, args.seq, config.vocab_size, device, args.seed)
    model = random_model(config, device, dtype, seed=args.seed).train()
    rows: list[Row] = []
    if "transformers" in args.rows:
        try:
            rows += transformers_rows(model, batches, peak_flops, args)
        except Exception as e:  # noqa: BLE001 - no MiniMaxM2 in this transformers, say: the m2rl rows still run
            print(f"transformers: {type(e).__name__}: {e}; no transformers rows", flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()  # transformers' weights and gradients out of the m2rl rows' memory
    for impl in (name for name in IMPLS if name in args.rows):
        if impl != "triton" or "triton" in ops.available("moe_experts"):
            rows += m2rl_rows(model, impl, batches, peak_flops, args)
        else:
            print(f"m2rl {impl}: not registered here, skipped", flush=True)
    baseline = {r.layout: r.step_ms for r in rows if r.implementation == "transformers"}
    for r in rows:
        r.vs_transformers = baseline.get("padded" if r.layout == "packed" else r.layout, math.nan) / r.step_ms
    print()
    print_table(rows)
    print(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                      "layers": config.num_hidden_layers, "batch": args.batch, "seq": args.seq,
                      "lm_head_fp32": args.lm_head_fp32, "matmul_peak_tflop_s": peak_flops / 1e12,
                      "rows": [dataclasses.asdict(r) for r in rows]}))


def print_table(rows: list[Row]) -> None:
    def num(x: float, fmt: str) -> str:
        return format(x, fmt) if math.isfinite(x) else "-"

    print("| implementation | layout | tokens (padded) | step ms | tok/s | MFU % (989) | MFU % (measured) "
          "| peak GiB | step GiB | x hf | note |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.implementation} | {r.layout} | {r.tokens} ({r.padded_tokens}) | {num(r.step_ms, '.1f')} "
              f"| {num(r.tok_per_s, ',.0f')} | {num(r.mfu_pct, '.1f')} | {num(r.mfu_measured_pct, '.1f')} "
              f"| {num(r.peak_gib, '.1f')} | {num(r.step_gib, '.1f')} | {num(r.vs_transformers, '.2f')} | {r.note} |")


if __name__ == "__main__":
    main()
