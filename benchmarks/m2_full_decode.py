"""Full-size MiniMax-M2 decode across the GPUs of one host: expert-parallel FP8 experts, head-parallel attention.

Builds the released shape (M2Config preset "m2": 62 layers, 256 experts of 1536, FP8 128x128 block-scaled
experts) with random weights made on each rank's GPU, then reports per batch size: greedy decode tokens/s
(prompt --prompt, --new-tokens new, after a warm-up) and the bandwidth roofline ratio

    ratio = (bytes a decode step must read on a GPU / step time) / copy bandwidth of that GPU
    bytes = fp8 weights + scales of the distinct local experts the step routes to (counted from the routing)
            + attention weights + router + vocab shard of lm_head + the KV cache of the context attended to
    copy bandwidth = 2 * size / time of a device-to-device copy of `size` bytes (read + write), same run

averaged over the ranks. Memory per GPU is printed after loading. A table, then one JSON line.

From a bare checkout (m2rl not installed; the script links the repository root as `m2rl` in a temporary
directory), in the repository root of the 2-GPU machine:

    PYTHONUNBUFFERED=1 python3 benchmarks/m2_full_decode.py --nproc 2 --batch 1 64 --prompt 128 --new-tokens 32

Installed, the same as a module (spawns --nproc ranks; under torchrun each process is one rank):

    python -m m2rl.benchmarks.m2_full_decode --nproc 2
    torchrun --nproc-per-node 2 -m m2rl.benchmarks.m2_full_decode
    python -m m2rl.benchmarks.m2_full_decode --device cpu --tiny       # CPU smoke test, 2 gloo ranks

--layers N runs a shallower model of the same width when memory or time is short.

Measured 2026-11-30 on 2x H200 (torch 2.11.0+cu130, triton 3.6.0; the command above, 73 s wall with a
4-layer rehearsal before it): 109.1 GiB of weights per GPU (peak 111.2 GiB allocated, 112.5 of 139.8 GiB in
use on the card), random init 0.7 s, copy bandwidth 4263 GB/s, MoE backend triton (rel. err. 6.6e-3 vs the
torch reference). Graph and eager decodes gave the same ids.

    batch  mode        ms/step   tok/s   GB/step  roofline   distinct local experts / layer
    1      eager        159.0      6.3     7.07    0.010     4.0
    1      cuda_graph    17.6     56.9     7.07    0.094     4.0
    64     eager        179.4    357       101.5    0.133   110.3 (of 128)
    64     cuda_graph    55.4   1155       101.5    0.430   110.3

Batch 1 is launch-bound: ~0.28 ms per layer against 24 us of bytes (about 60 small kernels per layer and
3 all-reduces, even in a graph); fusing the elementwise work (norms, RoPE, routing) is the next step.
Batch 64 reads nearly every expert (96.6 of the 101.5 GB): the FP8 grouped kernels' tiles (BLOCK_M 16,
BLOCK_N 32, untuned) reach 43% of copy bandwidth.
"""

from __future__ import annotations

import sys

if __package__ in (None, ""):  # run by path from a checkout: make the repository root importable as `m2rl`
    import os as _os
    import tempfile as _tempfile

    _here = _os.path.dirname(_os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if _os.path.abspath(p or ".") != _here]  # benchmarks/ shadows nothing
    try:
        import m2rl  # noqa: F401
    except ImportError:
        _link_dir = _tempfile.mkdtemp(prefix="m2rl_path_")
        _os.symlink(_os.path.dirname(_here), _os.path.join(_link_dir, "m2rl"))
        sys.path.insert(0, _link_dir)

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from m2rl.model.config import M2Config
from m2rl.model.parallel import launch
from m2rl.model.parallel.fp8_experts import (
    GATHER_MAX_PAIRS,
    Fp8Experts,
    moe_experts_local_torch,
)
from m2rl.model.parallel.layout import localize_experts
from m2rl.model.parallel.sharded_m2 import ShardedM2, all_reduce

GIB = 1024**3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=None,
                    help="ranks to spawn (default: the visible GPUs, 2 on CPU); ignored under torchrun")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cuda: NCCL, one GPU per rank, bf16; cpu: gloo, fp32 (smoke tests)")
    ap.add_argument("--tiny", action="store_true", help="the 'tiny' preset with FP8 experts instead of the release")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's, 62 for M2)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="batch sizes to decode")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per row (random ids)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row, the first by the prefill")
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="also time decode with the step captured in a CUDA graph (when the step is sync-free)")
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                    help="also time decode without a CUDA graph")
    ap.add_argument("--moe-backend", choices=("auto", "triton", "torch"), default="auto",
                    help="auto: the Triton FP8 kernels on CUDA, checked against the torch reference first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bandwidth-gib", type=float, default=2.0,
                    help="size of the device-to-device copy that measures bandwidth (CPU: /64)")
    ap.add_argument("--time-budget-s", type=float, default=520.0,
                    help="skip the batch sizes that would end past this many seconds after start")
    ap.add_argument("--json-out", default=None, help="also write the JSON result to this file (rank 0)")
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (one prefill token and at least one decode step)")
    return args


def build_config(args: argparse.Namespace) -> M2Config:
    overrides: dict[str, object] = {} if args.layers is None else {"num_hidden_layers": args.layers}
    if args.tiny:  # the tiny preset is unquantised; its 128x128 expert matrices make one FP8 block each
        overrides["quantization_config"] = {"quant_method": "fp8", "fmt": "float8_e4m3fn",
                                            "weight_block_size": [128, 128]}
        return M2Config.from_preset("tiny", **overrides)
    return M2Config.from_preset("m2", **overrides)


@dataclass
class Row:
    batch: int
    mode: str  # "eager" or "cuda_graph"
    prefill_s: float
    decode_step_ms: float
    decode_tok_s: float
    bytes_per_step_gb: float  # mean over ranks
    achieved_gb_s: float
    roofline_ratio: float
    experts_hit_per_layer: float  # distinct local experts per layer and step, mean over ranks
    ids_match_eager: bool | None


class Log:
    def __init__(self, rank: int) -> None:
        self.rank, self.t0 = rank, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, msg: str, all_ranks: bool = False) -> None:
        if all_ranks or self.rank == 0:
            print(f"[rank {self.rank} +{self.elapsed():6.1f}s] {msg}", flush=True)


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting its read and its write (2 * size / time)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    seconds = time.perf_counter() - t0
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes * repeats / seconds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_report(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    free, total = torch.cuda.mem_get_info(device)
    return (f"allocated {torch.cuda.memory_allocated(device) / GIB:.1f} GiB, peak "
            f"{torch.cuda.max_memory_allocated(device) / GIB:.1f} GiB, in use on the card "
            f"{(total - free) / GIB:.1f} / {total / GIB:.1f} GiB")


def check_moe_backend(model: ShardedM2, log: Log, world: int) -> str:
    """Run layer 0's experts through the selected backend and the torch reference; fall back to torch on
    every rank if any rank's relative error exceeds 2e-2 (or the kernel raises)."""
    experts = model.layers[0].block_sparse_moe.experts
    assert isinstance(experts, Fp8Experts)
    device, c = model.device, model.config
    x = torch.randn(64, c.hidden_size, device=device, dtype=model.dtype)
    backend = experts.resolved_backend(x)
    if backend == "torch":
        return backend
    worst = 0.0
    for tokens in (1, 64):
        gen = torch.Generator(device=device).manual_seed(tokens)
        logits = torch.randn(tokens, c.num_local_experts, device=device, generator=gen)
        weights_TK, experts_TK = torch.softmax(logits, -1).topk(c.num_experts_per_tok, -1)
        local_TK = localize_experts(experts_TK, model.layout.experts.start, len(model.layout.experts))
        try:
            got = experts(x[:tokens], local_TK, weights_TK).float()
            want = moe_experts_local_torch(x[:tokens], experts, local_TK, weights_TK).float()
            err = ((got - want).norm() / want.norm().clamp(min=1e-12)).item()
        except Exception as exc:  # noqa: BLE001 - a kernel that fails to compile or launch: fall back, say why
            log(f"MoE backend {backend} raised {type(exc).__name__}: {exc}", all_ranks=True)
            err = float("inf")
        worst = max(worst, err)
    flag = torch.tensor([float("inf") if math.isnan(worst) else worst], device=device)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    worst = flag.item()
    log(f"MoE backend {backend}: max relative error vs the torch reference {worst:.2e}")
    if worst > 2e-2:
        log(f"MoE backend {backend} rejected; every rank falls back to torch")
        for layer in model.layers:
            layer.block_sparse_moe.experts.backend = "torch"
        return "torch"
    return backend


def count_decode_hits(model: ShardedM2, prompt_ids: torch.Tensor, steps: int) -> float:
    """Distinct local experts routed to per layer and decode step (an eager run: also the warm-up)."""
    cache = model.new_kv_cache(prompt_ids.shape[0], prompt_ids.shape[1] + steps + 1)
    ids = model.prefill(prompt_ids, cache)
    pos = torch.tensor(prompt_ids.shape[1], device=model.device)
    model.count_expert_hits(True)
    for _ in range(steps):
        ids = model.decode_step(ids, pos, cache)
        pos += 1
    hits = sum(model.expert_hits())
    model.count_expert_hits(False)
    return hits / steps


def mean_over_ranks(value: float, device: torch.device, world: int) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    return all_reduce(t, None, world).item() / world


def bench_batch(model: ShardedM2, args: argparse.Namespace, batch: int, bandwidth: float, backend: str,
                log: Log, world: int) -> list[Row]:
    device, c = model.device, model.config
    P, N = args.prompt, args.new_tokens
    gen = torch.Generator().manual_seed(args.seed + batch)
    prompt_ids = torch.randint(0, c.vocab_size, (batch, P), generator=gen).to(device)
    steps = N - 1
    t0 = time.perf_counter()
    hits_per_step = count_decode_hits(model, prompt_ids, steps)
    log(f"batch {batch}: warm-up and expert count done in {time.perf_counter() - t0:.1f}s; "
        f"{hits_per_step / c.num_hidden_layers:.1f} distinct local experts per layer and step")
    context = P + N / 2  # decode steps feed positions P .. P+N-2 and attend to pos+1 slots
    step_bytes = sum(model.decode_step_bytes(batch, context, hits_per_step).values())
    step_bytes = mean_over_ranks(step_bytes, device, world)
    hits_mean = mean_over_ranks(hits_per_step, device, world) / c.num_hidden_layers

    sync_free = backend == "triton" or batch * c.num_experts_per_tok <= GATHER_MAX_PAIRS
    modes = (["eager"] if args.eager or device.type != "cuda" else []) + \
        (["cuda_graph"] if args.cuda_graphs and device.type == "cuda" and sync_free else [])
    if args.cuda_graphs and device.type == "cuda" and not sync_free:
        log(f"batch {batch}: no CUDA graph (the torch MoE path syncs with the host above "
            f"{GATHER_MAX_PAIRS} token-slots)")
    rows, eager_ids = [], None
    for mode in modes:
        try:
            out = model.generate_greedy(prompt_ids, N, cuda_graph=mode == "cuda_graph")
        except Exception as exc:  # a failed capture must not cost the eager numbers already taken
            if mode != "cuda_graph":
                raise
            log(f"batch {batch} cuda_graph failed, graphs off from here: {type(exc).__name__}: {exc}", all_ranks=True)
            args.cuda_graphs = False
            continue
        step_s = out.decode_s / steps
        achieved = step_bytes / step_s
        same = None if eager_ids is None else bool(torch.equal(out.ids, eager_ids))
        if mode == "eager":
            eager_ids = out.ids
        rows.append(Row(batch, mode, out.prefill_s, 1e3 * step_s, batch / step_s, step_bytes / 1e9, achieved / 1e9,
                        achieved / bandwidth, hits_mean, same))
        log(f"batch {batch} {mode}: prefill {out.prefill_s:.2f}s, decode {1e3 * step_s:.2f} ms/step = "
            f"{batch / step_s:.1f} tok/s, {step_bytes / 1e9:.2f} GB/step -> {achieved / 1e9:.0f} GB/s = "
            f"{achieved / bandwidth:.3f} of copy bandwidth" + ("" if same is None else f", ids match eager: {same}"))
    return rows


def worker(rank: int, world: int, args: argparse.Namespace) -> None:
    log = Log(rank)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = build_config(args)
    log(f"torch {torch.__version__}, {world} ranks, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", layers {config.num_hidden_layers}, experts {config.num_local_experts} "
          f"(top {config.num_experts_per_tok}), FP8 block {config.quantization_config['weight_block_size']}")

    nbytes = int(args.bandwidth_gib * GIB / (1 if device.type == "cuda" else 64))
    bandwidth = mean_over_ranks(copy_bandwidth(device, nbytes), device, world)
    log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (2 x {nbytes / GIB:.2f} GiB / time, mean over ranks)")

    t0 = time.perf_counter()
    model = ShardedM2(config, rank, world, dist.group.WORLD if world > 1 else None, device, dtype,
                      moe_backend=args.moe_backend).init_random_(seed=args.seed)
    sync(device)
    load_s = time.perf_counter() - t0
    weight_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    log(f"loaded in {load_s:.1f}s: {weight_bytes / GIB:.1f} GiB of weights on this rank; {memory_report(device)}",
        all_ranks=True)
    backend = check_moe_backend(model, log, world)

    rows: list[Row] = []
    skipped: list[int] = []
    last_cost = 0.0
    for batch in args.batch:
        # Rank 0 decides, so every rank runs the same collectives.
        go = torch.tensor([float(log.elapsed() + last_cost <= args.time_budget_s)], device=device)
        if world > 1:
            dist.broadcast(go, src=0)
        if not go.item():
            log(f"batch {batch}: skipped, would pass --time-budget-s {args.time_budget_s:.0f}")
            skipped.append(batch)
            continue
        t_batch = time.perf_counter()
        rows.extend(bench_batch(model, args, batch, bandwidth, backend, log, world))
        last_cost = time.perf_counter() - t_batch
        log(f"batch {batch}: {memory_report(device)}", all_ranks=True)

    if world > 1:
        dist.barrier()  # every rank's log lines are out before the table: the JSON line is the last line
    if rank == 0:
        print_table(rows)
        result = {
            "benchmark": "m2_full_decode", "world": world,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "layers": config.num_hidden_layers, "experts": config.num_local_experts,
            "hidden": config.hidden_size, "fp8_block": config.quantization_config["weight_block_size"],
            "moe_backend": backend, "prompt": args.prompt, "new_tokens": args.new_tokens,
            "load_s": round(load_s, 2), "weights_gib_per_rank": round(weight_bytes / GIB, 2),
            "peak_gib_rank0": round(torch.cuda.max_memory_allocated(device) / GIB, 2) if device.type == "cuda" else None,
            "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "skipped_batches": skipped,
            "rows": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(r).items()} for r in rows],
        }
        line = json.dumps(result)
        if args.json_out:
            with open(args.json_out, "w") as f:
                f.write(line + "\n")
        print(line, flush=True)


def print_table(rows: list[Row]) -> None:
    head = (f"{'batch':>5} {'mode':>10} {'prefill s':>9} {'ms/step':>8} {'tok/s':>9} {'GB/step':>8} "
            f"{'GB/s':>7} {'roofline':>8} {'experts/layer':>13}")
    print(head, flush=True)
    for r in rows:
        print(f"{r.batch:>5} {r.mode:>10} {r.prefill_s:>9.2f} {r.decode_step_ms:>8.2f} {r.decode_tok_s:>9.1f} "
              f"{r.bytes_per_step_gb:>8.2f} {r.achieved_gb_s:>7.0f} {r.roofline_ratio:>8.3f} "
              f"{r.experts_hit_per_layer:>13.1f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu (with --tiny) for a smoke test")
    world = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 2)
    if args.device == "cuda" and world > torch.cuda.device_count():
        raise SystemExit(f"--nproc {world} > {torch.cuda.device_count()} visible GPUs")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on shared hosts
    launch.run(worker, world, "nccl" if args.device == "cuda" else "gloo", args=(args,), timeout_s=900)


if __name__ == "__main__":
    main()
