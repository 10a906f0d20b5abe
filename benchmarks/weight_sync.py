"""Weight-sync benchmark: seconds per GB of each transport from the learner into a running `m2rl serve`.

The learner is a random M2 in this process; the server is `m2rl serve` in its own process (rl/m2rl_server.py),
started on a checkpoint of the same shapes. Each transport (rl/weight_transfer.py) pushes the learner's weights
once to warm up (the collective group is made then: its join time is reported apart), then `--repeats`
timed pushes; a push is timed from the call to the server's answer that the update is applied, so a row's
seconds include the server's checks (names, shapes, finite values) and the swap between two decode steps.
After the timed pushes the parity probe (rl/parity.py) compares the server's log-probs with the learner's:
a row whose weights did not arrive shows it there. The `in_process` row is the baseline of the same run:
`load_state_dict` into a second copy of the model in this process (what kind local does).

Transports measured: in_process, disk (safetensors shards in a temporary directory the server reads), http
(safetensors buckets uploaded), collective over gloo on the CPU; with CUDA, collective over NCCL (the server
on another GPU than the learner when there are two) and ipc (CUDA IPC handles). GB counts the weights' bytes
(1e9), not headers or protocol. Prints a table with the machine, then one JSON line.

    python -m m2rl.benchmarks.weight_sync                  # CPU: a random M2 of ~225 MB in float32
    python -m m2rl.benchmarks.weight_sync --released-layers 2   # GPU: the released shapes, 2 layers, bf16 (~17 GB)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from m2rl.model import M2Config, M2ForCausalLM, M2Tokenizer, save_pretrained
from m2rl.rl.m2rl_server import M2RLServer, M2RLServerConfig
from m2rl.rl.parity import ParityProbe, ServerLogprobs, probe_ids
from m2rl.rl.weight_transfer import (
    CollectiveSync,
    DiskSync,
    HTTPSync,
    IPCSync,
    WeightClient,
    nbytes,
    wire_tensors,
)


@dataclass
class Row:
    transport: str
    gb: float  # weight bytes per push / 1e9
    seconds: float  # median over the timed pushes
    seconds_per_gb: float
    gb_per_s: float
    warmup_s: float  # the first push (for collective: joining the group too)
    parity_max_abs_diff: float | None  # server vs learner log-probs after the pushes (None: not probed)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = f"{cpu}, {os.cpu_count()} cores"
    if torch.cuda.is_available():
        out += f"; {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return out


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> M2ForCausalLM:
    if args.released_layers:
        config = M2Config(num_hidden_layers=args.released_layers, use_mtp=False, num_mtp_modules=0)
    else:
        config = M2Config.from_preset("tiny", hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                                      num_hidden_layers=args.layers, num_local_experts=args.experts,
                                      vocab_size=args.vocab, head_dim=64, rotary_dim=32)
    with torch.device("meta"):
        model = M2ForCausalLM(config)
    return model.to(dtype=dtype).to_empty(device=device).init_weights(seed=0).eval()


def make_transport(name: str, client: WeightClient, directory: Path, bucket: int
                   ) -> DiskSync | HTTPSync | CollectiveSync | IPCSync:
    if name == "disk":
        return DiskSync(client, directory, bucket)
    if name == "http":
        return HTTPSync(client, bucket)
    if name.startswith("collective-"):
        return CollectiveSync(client, name.removeprefix("collective-"), timeout_s=600)
    return IPCSync(client)


def timed(push, repeats: int) -> tuple[float, list[float]]:
    """(warm-up seconds, timed seconds of each repeat)."""
    start = time.perf_counter()
    push(0)
    warmup = time.perf_counter() - start
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        push(i + 1)
        times.append(time.perf_counter() - start)
    return warmup, times


def row(name: str, weight_bytes: int, warmup: float, times: list[float], parity: float | None) -> Row:
    seconds = statistics.median(times)
    gb = weight_bytes / 1e9
    return Row(name, round(gb, 4), round(seconds, 4), round(seconds / gb, 5), round(gb / seconds, 3),
               round(warmup, 3), None if parity is None else round(parity, 6))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--released-layers", type=int, default=0,
                    help="the released M2 shapes with this many layers, bf16 (default 0: the small CPU model)")
    ap.add_argument("--hidden-size", type=int, default=512)
    ap.add_argument("--intermediate-size", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="default: bfloat16 with --released-layers, else float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--transports", nargs="*", default=None,
                    help="subset of in_process disk http collective-gloo collective-nccl ipc (default: all available)")
    ap.add_argument("--workdir", type=Path, default=None, help="checkpoints go here (default: a temporary directory)")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    learner_device = torch.device("cuda:0" if cuda else "cpu")
    server_device = "cuda:1" if torch.cuda.device_count() > 1 else ("cuda:0" if cuda else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.released_layers else "float32"))
    available = ["in_process", "disk", "http", "collective-gloo"] + (["collective-nccl", "ipc"] if cuda else [])
    wanted = [t for t in (args.transports or available) if t in available]
    if "collective-nccl" in wanted and server_device == str(learner_device):
        wanted.remove("collective-nccl")  # NCCL cannot put two ranks on one GPU
    if "collective-gloo" in wanted and cuda:
        wanted.remove("collective-gloo")  # gloo moves GPU tensors through the host: the CPU row's business

    torch.manual_seed(0)
    model = build_model(args, learner_device, dtype)
    weight_bytes = sum(nbytes(t) for _, t in wire_tensors(model))
    bucket = args.bucket_mb * 2**20
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="m2rl-weight-sync-"))
    tokenizer = M2Tokenizer.tiny()  # 4096 ids: fits any vocabulary here; the probe is random ids of it
    started = time.perf_counter()
    save_pretrained(model, workdir / "initial", tokenizer=tokenizer)
    print(f"model: {model.config.num_parameters() / 1e9:.3f}B parameters, {weight_bytes / 1e9:.3f} GB in "
          f"{str(dtype).removeprefix('torch.')} on {learner_device}; server on {server_device}; checkpoint written "
          f"in {time.perf_counter() - started:.1f} s", flush=True)

    rows: list[Row] = []
    if "in_process" in wanted:
        generator = copy.deepcopy(model)

        def in_process(_: int) -> None:
            generator.load_state_dict(model.state_dict())
            if cuda:
                torch.cuda.synchronize()

        rows.append(row("in_process", weight_bytes, *timed(in_process, args.repeats), None))
        del generator
        print(rows[-1], flush=True)

    remote = [t for t in wanted if t != "in_process"]
    if remote:
        server = M2RLServer(M2RLServerConfig(workdir / "initial", device=server_device,
                                             dtype=str(dtype).removeprefix("torch."), max_batch=1,
                                             served_model_name="bench", startup_timeout_s=900,
                                             log_path=workdir / "m2rl-serve.log",
                                             extra_args=["--max-model-len", "256"]))
        with server:
            probe = ParityProbe(1.0, probe_ids(tokenizer.vocab_size))  # ids the server can detokenize
            logprobs = ServerLogprobs(server.policy(timeout_s=600))
            version = 0
            for name in remote:
                transport = make_transport(name, WeightClient(server.url, timeout_s=1800), workdir / "disk", bucket)

                def push(_: int, transport=transport) -> None:
                    nonlocal version
                    version += 1
                    transport.push(model, version)
                    logprobs.policy.set_policy_version(version)

                warmup, times = timed(push, args.repeats)
                parity = probe.check(model, logprobs).max_abs_diff
                transport.close()
                rows.append(row(name, weight_bytes, warmup, times, parity))
                print(rows[-1], flush=True)

    print(f"\nweight sync, {machine()}; torch {torch.__version__}")
    print(f"model {weight_bytes / 1e9:.3f} GB ({str(dtype).removeprefix('torch.')}), learner {learner_device}, "
          f"server {server_device} (m2rl serve, own process), bucket {args.bucket_mb} MiB, "
          f"median of {args.repeats} after 1 warm-up")
    header = f"{'transport':<16} {'GB':>7} {'s/push':>8} {'s/GB':>8} {'GB/s':>8} {'warm-up s':>10} {'parity':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        parity = "-" if r.parity_max_abs_diff is None else f"{r.parity_max_abs_diff:.2g}"
        print(f"{r.transport:<16} {r.gb:>7.3f} {r.seconds:>8.3f} {r.seconds_per_gb:>8.4f} {r.gb_per_s:>8.3f} "
              f"{r.warmup_s:>10.3f} {parity:>9}")
    print(json.dumps({"benchmark": "weight_sync", "machine": machine(), "torch": torch.__version__,
                      "dtype": str(dtype).removeprefix("torch."), "learner_device": str(learner_device),
                      "server_device": server_device, "bucket_mb": args.bucket_mb, "repeats": args.repeats,
                      "rows": [asdict(r) for r in rows]}))


if __name__ == "__main__":
    main()
