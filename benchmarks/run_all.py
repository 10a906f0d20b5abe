"""Run every benchmark of benchmarks/ and write one Markdown table, headed by the machine it ran on.

Each benchmark runs in its own process (`python -m m2rl.benchmarks.NAME ARGS`), in its quick mode by default
(its `--smoke` or `--quick`, or small sizes) and with its own defaults under `--full`. One whose hardware or
component is missing here (a GPU, a second GPU, the Docker engine, bubblewrap, Chromium) is skipped with the
reason. Its whole output goes to OUT_DIR/NAME.txt; the table keeps its status, its seconds and the last line
it printed (every benchmark ends with a JSON line of its numbers, or a table row).

    python -m m2rl.benchmarks.run_all                       # quick modes: minutes on 2 CPU cores
    python -m m2rl.benchmarks.run_all --full --only serving,model_cpu
    python -m m2rl.benchmarks.run_all --list                # what runs, and with which arguments

`BENCHMARKS` lists every runnable module of the folder (tests/benchmarks/test_run_all.py checks that none is
missing), so a new benchmark is one line here.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
RESULT_CHARS = 160  # of the last output line, in the table


@dataclass(frozen=True)
class Benchmark:
    module: str  # m2rl.benchmarks.<module>
    quick: tuple[str, ...] = ()  # arguments of the quick mode
    full: tuple[str, ...] = ()  # arguments of the full run (its defaults: usually nothing)
    needs: tuple[str, ...] = ()  # components (see REQUIREMENTS) without which it is skipped
    timeout_s: float = 1800.0


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("model_cpu", quick=("--repeats", "1", "--new-tokens", "16")),
    Benchmark("local_policy_batching", quick=("--repeats", "1", "--requests", "4", "--new-tokens", "8")),
    Benchmark("serving", quick=("--concurrency", "1", "4", "--rounds", "1", "--min-requests", "4",
                                "--new-tokens", "16")),
    Benchmark("weight_sync", quick=("--repeats", "1", "--hidden-size", "128", "--intermediate-size", "128",
                                    "--experts", "8", "--vocab", "4096")),
    Benchmark("sandboxes", quick=("--n", "5", "--max-concurrent", "8", "--backends", "bwrap"), needs=("bwrap",)),
    Benchmark("rollout", quick=("--smoke",), needs=("bwrap",)),
    Benchmark("learner_packing", quick=("--repeats", "1"), needs=("bwrap",)),
    Benchmark("rl_loss_ablation", quick=("--steps", "4", "--seeds", "1"), needs=("bwrap",)),
    Benchmark("cispo_vs_baselines", quick=("--quick",), needs=("bwrap",), timeout_s=3600.0),
    Benchmark("web_envs", quick=("--repeats", "1"), needs=("browser", "mcp")),
    Benchmark("swe_env", quick=("--n", "2", "--grades", "1"), needs=("docker",)),
    Benchmark("kernels", quick=("--smoke",), needs=("gpu",)),
    Benchmark("learner_gpu", quick=("--smoke",), needs=("gpu",)),
    Benchmark("gpu_decode", quick=("--smoke",), needs=("gpu",)),
    Benchmark("m2_full_decode", quick=("--tiny", "--nproc", "2"), full=("--nproc", "2"), needs=("gpus2",)),
)
# Modules of the folder that are not benchmarks to run on their own.
NOT_RUNNABLE = {"__init__", "run_all", "trl_single_turn"}  # trl_single_turn: a library of cispo_vs_baselines


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def _docker() -> bool:
    try:
        from m2rl.sandboxes.docker_backend import engine_available

        return bool(engine_available())
    except Exception as exc:  # noqa: BLE001  no client library, no engine: either way, no Docker
        log.info("run_all: no Docker engine (%s: %s)", type(exc).__name__, exc)
        return False


# component -> (is it here?, what to do about it)
REQUIREMENTS: dict[str, tuple[Callable[[], bool], str]] = {
    "gpu": (lambda: _cuda_devices() >= 1, "needs a CUDA GPU"),
    "gpus2": (lambda: _cuda_devices() >= 2, "needs two CUDA GPUs"),
    "docker": (_docker, "needs the Docker engine (scripts/setup.sh starts dockerd)"),
    "bwrap": (lambda: shutil.which("bwrap") is not None, "needs bubblewrap (apt-get install bubblewrap)"),
    "browser": (lambda: bool(shutil.which("chromium") or shutil.which("chromium-browser"))
                and importlib.util.find_spec("playwright") is not None, "needs Chromium and playwright"),
    "mcp": (lambda: importlib.util.find_spec("mcp") is not None, "needs the mcp SDK (pip install 'm2rl[mcp]')"),
}


@functools.cache
def available(component: str) -> bool:
    return REQUIREMENTS[component][0]()


def skip_reason(benchmark: Benchmark) -> str | None:
    missing = [REQUIREMENTS[c][1] for c in benchmark.needs if not available(c)]
    return "; ".join(missing) or None


@dataclass
class Outcome:
    benchmark: Benchmark
    status: str  # ok | failed (exit N) | timed out | skipped
    seconds: float = 0.0
    result: str = ""  # the last line it printed, or why it was skipped
    args: list[str] = field(default_factory=list)


def run_one(benchmark: Benchmark, full: bool, out_dir: Path) -> Outcome:
    args = list(benchmark.full if full else benchmark.quick)
    reason = skip_reason(benchmark)
    if reason:
        return Outcome(benchmark, "skipped", 0.0, reason, args)
    command = [sys.executable, "-m", f"m2rl.benchmarks.{benchmark.module}", *args]
    start = time.perf_counter()
    log = out_dir / f"{benchmark.module}.txt"
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=benchmark.timeout_s, check=False)
        output, status = proc.stdout + proc.stderr, "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        last = last_line(proc.stdout) or last_line(proc.stderr)
    except subprocess.TimeoutExpired as exc:
        output = _text(exc.stdout) + _text(exc.stderr)
        status, last = f"timed out after {benchmark.timeout_s:.0f} s", last_line(_text(exc.stderr))
    log.write_text(f"$ {' '.join(command)}\n{output}", encoding="utf-8")
    return Outcome(benchmark, status, time.perf_counter() - start, last, args)


def _text(value: str | bytes | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def machine_description() -> dict[str, str]:
    """Platform, CPUs, Python, torch and the GPUs, for the table's heading."""
    info = {"platform": platform.platform(), "cpus": str(os.cpu_count()), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        gpus = [torch.cuda.get_device_name(i) for i in range(count)]
        info["gpus"] = ", ".join(gpus) if gpus else "none"
    except ImportError:
        info["torch"], info["gpus"] = "not installed", "unknown"
    return info


def markdown_table(outcomes: Sequence[Outcome], machine: dict[str, str], full: bool) -> str:
    """The report (pure): the machine, then one row per benchmark."""
    lines = [f"# Benchmarks ({'full' if full else 'quick'} mode), {time.strftime('%Y-%m-%d %H:%M')}", "",
             "| machine | |", "|---|---|"] + [f"| {key} | {value} |" for key, value in machine.items()]
    lines += ["", "| benchmark | arguments | status | seconds | result (last line printed) |", "|---|---|---|---|---|"]
    for o in outcomes:
        result = o.result if len(o.result) <= RESULT_CHARS else o.result[:RESULT_CHARS - 3] + "..."
        result = result.replace("|", "\\|")
        lines.append(f"| {o.benchmark.module} | `{' '.join(o.args)}` | {o.status} | {o.seconds:.1f} | {result} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="each benchmark with its own defaults (hours)")
    ap.add_argument("--only", default="", help="comma-separated benchmark names")
    ap.add_argument("--out-dir", type=Path, default=None, help="outputs (default: runs/benchmarks-<time>)")
    ap.add_argument("--list", action="store_true", help="print what would run, with its arguments, and exit")
    args = ap.parse_args(argv)
    chosen = [b for b in BENCHMARKS if not args.only or b.module in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {b.module for b in BENCHMARKS}
    if unknown:
        ap.error(f"unknown benchmarks {sorted(unknown)}; known: {', '.join(b.module for b in BENCHMARKS)}")
    if args.list:
        for b in chosen:
            reason = skip_reason(b)
            print(f"{b.module}: {' '.join(b.full if args.full else b.quick) or '(defaults)'}"
                  + (f"  [skipped: {reason}]" if reason else ""))
        return 0
    out_dir = args.out_dir or Path("runs") / f"benchmarks-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for benchmark in chosen:
        print(f"{benchmark.module} ...", file=sys.stderr, flush=True)
        outcomes.append(run_one(benchmark, args.full, out_dir))
        print(f"  {outcomes[-1].status} in {outcomes[-1].seconds:.1f} s", file=sys.stderr, flush=True)
    table = markdown_table(outcomes, machine_description(), args.full)
    (out_dir / "README.md").write_text(table, encoding="utf-8")
    print(table, end="")
    return 0 if all(o.status in ("ok", "skipped") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
