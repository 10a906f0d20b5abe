"""Sandbox benchmark: cold start, exec round trip, reset strategies, warm-pool acquire, max concurrency.

Every number is measured in the same run as its baseline: a raw `docker exec CONTAINER true` /
`docker run --rm IMAGE true` / `bwrap ... true` subprocess. Prints a table, then one JSON line.

    python -m m2rl.benchmarks.sandboxes [--n 50] [--max-concurrent 64] [--backends docker,bwrap]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from m2rl.sandboxes import Limits, SandboxPool, make_sandbox
from m2rl.sandboxes.bwrap_backend import MINIMAL_BWRAP
from m2rl.sandboxes.images import build_base

BWRAP_TRUE = [*MINIMAL_BWRAP, "--proc", "/proc", "--dev", "/dev", "/usr/bin/true"]


def timed(fn: Callable[[], object], n: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Table:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(
        self,
        metric: str,
        backend: str,
        ours: list[float] | None,
        baseline_name: str = "",
        baseline: list[float] | None = None,
        target: str = "",
        note: str = "",
    ) -> None:
        row = {
            "metric": metric,
            "backend": backend,
            "p50_ms": ours and round(p(ours, 0.5), 2),
            "p90_ms": ours and round(p(ours, 0.9), 2),
            "baseline": baseline_name,
            "baseline_p50_ms": baseline and round(p(baseline, 0.5), 2),
            "target": target,
            "note": note,
        }
        self.rows.append(row)
        print(
            f"  {metric} [{backend}]: p50 {row['p50_ms']} ms"
            + (f" vs {baseline_name} {row['baseline_p50_ms']} ms" if baseline else "")
            + (f" ({note})" if note else ""),
            flush=True,
        )

    def print(self) -> None:
        cols = ["metric", "backend", "p50_ms", "p90_ms", "baseline", "baseline_p50_ms", "target", "note"]
        widths = {
            c: max(len(c), *(len(str(r[c] if r[c] is not None else "-")) for r in self.rows)) for c in cols
        }
        print("\n" + " | ".join(c.ljust(widths[c]) for c in cols))
        print("-+-".join("-" * widths[c] for c in cols))
        for r in self.rows:
            print(" | ".join(str(r[c] if r[c] is not None else "-").ljust(widths[c]) for c in cols))


def bench_exec(table: Table, backend: str, image: str | None, n: int) -> None:
    with make_sandbox(backend) as sb:
        ours_argv = timed(lambda: sb.exec(["true"]), n)
        ours_bash = timed(lambda: sb.exec("true"), n)
        if backend == "docker":
            base = timed(lambda: run(["docker", "exec", sb.container_id, "true"]), n)
            base_name = "docker exec CONTAINER true"
        else:
            base = timed(lambda: run(BWRAP_TRUE), n)
            base_name = "bwrap ... true (fresh)"
        target = "<= 10 ms" if backend == "docker" else "<= 8 ms"
        table.add("exec true (argv)", backend, ours_argv, base_name, base, target)
        table.add(
            "exec 'true' (bash -lc)", backend, ours_bash, base_name, base, "", "login shell start-up included"
        )


def bench_cold_start(table: Table, backend: str, image: str | None, n: int) -> None:
    starts, closes = [], []
    for _ in range(n):
        t = time.perf_counter()
        sb = make_sandbox(backend)
        starts.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        sb.close()
        closes.append((time.perf_counter() - t) * 1000)
    if backend == "docker":
        base = timed(
            lambda: run(["docker", "run", "--rm", "--network", "none", image or "", "true"]), n, warmup=1
        )
        base_name = "docker run --rm IMAGE true"
    else:
        base = timed(lambda: run(BWRAP_TRUE), n)
        base_name = "bwrap ... true"
    table.add("cold start (ready for exec)", backend, starts, base_name, base)
    table.add("close (nothing left)", backend, closes, note="the pool does this off the caller's path")


def check_reset(sb) -> bool:
    """Dirty every writable place and leave a process behind; the reset must undo all of it."""
    before = sb.exec("find /work /tmp /home/sandbox | sort").stdout
    sb.exec(
        "echo x > /work/f; mkdir -p /work/d/e; touch /tmp/t /home/sandbox/.h; sleep 100 &",
        keep_background=True,
    )
    sb.reset()
    return sb.exec("find /work /tmp /home/sandbox | sort; pgrep sleep").stdout == before


def bench_reset(table: Table, backend: str, n: int) -> None:
    strategies = ["snapshot", "overlay", "commit"] if backend == "docker" else ["snapshot", "overlay"]
    for strategy in strategies:
        with make_sandbox(backend, reset_strategy=strategy) as sb:
            correct = check_reset(sb)

            def dirty_reset() -> None:
                sb.write_file("/work/junk.txt", "junk")
                sb.reset()

            ours = timed(dirty_reset, max(5, n // 5 if strategy != "snapshot" else n), warmup=1)
        table.add(
            f"reset ({strategy})",
            backend,
            ours,
            target="fastest correct kept",
            note="correct" if correct else "INCORRECT",
        )


def bench_reset_loaded(table: Table, backend: str, n: int, tmp: str) -> None:
    """Reset with a task checkout in /work (1000 files, ~20 MB): what an SWE-style episode resets."""
    repo = os.path.join(tmp, "repo")
    for i in range(1000):
        d = os.path.join(repo, f"pkg{i // 100}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"mod{i}.py"), "wb") as f:
            f.write(os.urandom(10 * 1024).hex().encode())
    strategies = ["snapshot", "commit"] if backend == "docker" else ["snapshot"]
    for strategy in strategies:
        with make_sandbox(backend, reset_strategy=strategy, limits=Limits(disk_mb=256)) as sb:
            sb.upload(repo, "/work/repo")
            sb.checkpoint()
            listing = "find /work -type f -exec md5sum {} + | sort | md5sum"
            before = sb.exec(listing).stdout

            def edit_reset() -> None:
                sb.exec(
                    "echo bug >> /work/repo/pkg1/mod101.py; rm /work/repo/pkg2/mod202.py; touch /work/new.py"
                )
                sb.reset()

            ours = timed(edit_reset, max(5, n // 5), warmup=1)
            correct = sb.exec(listing).stdout == before
        table.add(
            f"reset 20MB /work ({strategy})",
            backend,
            ours,
            target="fastest correct kept",
            note="correct" if correct else "INCORRECT",
        )


def bench_pool(table: Table, backend: str, n: int) -> None:
    """Caller's view of 'a clean sandbox for the next episode': release the last one, acquire the next."""
    with SandboxPool(backend, size=4) as pool:
        pool.wait_ready(timeout=120)
        sb = pool.acquire()
        times, dirty = [], 0
        for _ in range(n):
            sb.write_file("/work/episode.txt", "dirty")
            sb.exec("true")
            t = time.perf_counter()
            pool.release(sb)
            sb = pool.acquire()
            times.append((time.perf_counter() - t) * 1000)
            dirty += sb.exec("ls /work").stdout != ""
            time.sleep(0.02)  # an episode's worth of work: lets the background reset finish
        pool.release(sb)
    table.add("pool release+acquire", backend, times, target="<= 50 ms", note=f"{dirty} dirty of {n}")


def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return 0.0


def bench_concurrency(table: Table, backend: str, limit: int) -> None:
    boxes = []
    available_before = mem_available_mb()
    t = time.perf_counter()
    error = ""
    small = Limits(memory_mb=256, disk_mb=64)
    with ThreadPoolExecutor(max_workers=4) as ex:
        futures = [ex.submit(make_sandbox, backend, limits=small) for _ in range(limit)]
        for f in futures:
            try:
                boxes.append(f.result())
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:80]
    started_s = time.perf_counter() - t
    per_box_mb = (available_before - mem_available_mb()) / max(1, len(boxes))
    try:
        with ThreadPoolExecutor(max_workers=8) as ex:
            ok = sum(r.stdout == "up\n" for r in ex.map(lambda sb: sb.exec("echo up"), boxes))
    finally:
        with ThreadPoolExecutor(max_workers=8) as ex:
            list(ex.map(lambda sb: sb.close(), boxes))
    note = (
        f"{ok}/{limit} alive and answering, started in {started_s:.1f}s, ~{per_box_mb:.0f} MB host RAM each"
        + (f"; first error: {error}" if error else "")
    )
    table.add(f"concurrent sandboxes (cap {limit})", backend, None, target=">= 32", note=note)
    table.rows[-1]["p50_ms"] = ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=50, help="samples per latency measurement")
    parser.add_argument("--max-concurrent", type=int, default=96)
    parser.add_argument("--backends", default="docker,bwrap")
    parser.add_argument(
        "--only", default="", help="comma-separated subset: exec,start,reset,pool,concurrency"
    )
    args = parser.parse_args()
    table = Table()
    print(f"host: {platform.node()} {os.cpu_count()} cores, {platform.platform()}; load {os.getloadavg()}")
    image = None
    for backend in args.backends.split(","):
        if backend == "docker":
            image = build_base()
        print(f"[{backend}]", flush=True)
        wanted = set(args.only.split(",")) if args.only else {"exec", "start", "reset", "pool", "concurrency"}
        if "exec" in wanted:
            bench_exec(table, backend, image, args.n)
        if "start" in wanted:
            bench_cold_start(table, backend, image, max(5, args.n // 5))
        if "reset" in wanted:
            bench_reset(table, backend, args.n)
            with tempfile.TemporaryDirectory() as tmp:
                bench_reset_loaded(table, backend, args.n, tmp)
        if "pool" in wanted:
            bench_pool(table, backend, args.n)
        if "concurrency" in wanted:
            bench_concurrency(table, backend, args.max_concurrent)
    table.print()
    print(json.dumps({"bench": "sandboxes", "load": os.getloadavg(), "rows": table.rows}))


if __name__ == "__main__":
    main()
