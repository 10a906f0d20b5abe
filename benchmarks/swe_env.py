"""m2rl/SWE-v0 benchmark: reset (cold and warm), step overhead and grading time, p50 and p95.

Each number has its baseline measured in the same run:
- cold reset (a new env's first reset: container start, /testbed seeded, repository prepared) against a
  bare sandbox start of the same image;
- warm reset (the same container: snapshot restore + repository prepared again) against a bare
  `Sandbox.reset()` of that container (the snapshot restore alone); target <= 300 ms p50;
- step overhead (one bash `true` call through the env: parse, tool, changed-file scan, rewards) against
  a bare `Sandbox.exec("true")`;
- grading (the gold patch, in the fresh grading sandbox) per library, against running the instance's
  test command once in a warm sandbox.
Prints a table, then one JSON line.

    python -m m2rl.benchmarks.swe_env [--tasks tasks/swe-starter] [--n 20] [--grades 6]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import gymnasium as gym
import m2rl.envs  # noqa: F401  (registers the ids)
from m2rl.benchmarks.sandboxes import timed
from m2rl.envs.experts import action_text
from m2rl.envs.swe.env import SWE_LIMITS
from m2rl.envs.swe.instances import load_instances
from m2rl.envs.swe.repository import REPO_DIR
from m2rl.envs.swe.task_set import ACTIVATE_ENVIRONMENT
from m2rl.sandboxes import make_sandbox

DEFAULT_TASKS = Path(__file__).resolve().parents[1] / "tasks" / "swe-starter"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


class Table:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, metric: str, ours: list[float], baseline_name: str, baseline: list[float], target: str = "") -> None:
        row = {"metric": metric, "n": len(ours), "p50_ms": round(pct(ours, 0.5), 1), "p95_ms": round(pct(ours, 0.95), 1),
               "baseline": baseline_name, "baseline_p50_ms": round(pct(baseline, 0.5), 1),
               "baseline_p95_ms": round(pct(baseline, 0.95), 1), "target": target}
        self.rows.append(row)
        print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    def print(self) -> None:
        cols = list(self.rows[0])
        widths = {c: max(len(c), *(len(str(r[c])) for r in self.rows)) for c in cols}
        print("\n" + " | ".join(c.ljust(widths[c]) for c in cols))
        print("-+-".join("-" * widths[c] for c in cols))
        for r in self.rows:
            print(" | ".join(str(r[c]).ljust(widths[c]) for c in cols))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=Path, default=DEFAULT_TASKS, help="a task directory")
    parser.add_argument("--n", type=int, default=20, help="samples per reset / step metric")
    parser.add_argument("--grades", type=int, default=6, help="instances graded per library")
    args = parser.parse_args()
    print(f"host: {platform.node()} {os.cpu_count()} cores, {platform.platform()}; load {os.getloadavg()}")
    instances = load_instances(args.tasks)
    libraries = sorted({i.repo for i in instances})
    first = instances[0]
    table = Table()

    def make_env():
        return gym.make("m2rl/SWE-v0", instances=str(args.tasks), sandbox="docker",
                        split=first.split).unwrapped

    # cold: a new env's first reset, against a bare sandbox start of the same image
    cold_n = max(3, args.n // 4)
    envs = []
    cold = []
    for _ in range(cold_n):
        env = make_env()
        env.image_of(first)  # the image is resolved (or rebuilt) once, outside the timing
        t = time.perf_counter()
        env.reset(options={"task_id": first.instance_id})
        cold.append((time.perf_counter() - t) * 1000)
        envs.append(env)
    image = envs[0].image_of(first)
    for env in envs[1:]:
        env.close()
    env = envs[0]
    bare = []
    for _ in range(cold_n):
        t = time.perf_counter()
        sb = make_sandbox("docker", image=image, limits=SWE_LIMITS, extra_roots=(REPO_DIR,))
        bare.append((time.perf_counter() - t) * 1000)
        sb.close()
    table.add("cold reset", cold, "bare sandbox start", bare)

    # warm: same container; the same instance and another instance of the same image
    same_image = [i for i in instances if i.repo == first.repo and i.split == first.split]
    cycle = iter(range(10**9))
    warm = timed(lambda: env.reset(options={"task_id": same_image[next(cycle) % len(same_image)].instance_id}),
                 args.n, warmup=0)
    restore = timed(env.sandbox.reset, args.n, warmup=0)
    env.reset(options={"task_id": first.instance_id})
    table.add("warm reset", warm, "Sandbox.reset (snapshot restore)", restore, "<= 300 ms p50")

    # step overhead
    step = timed(lambda: env.step(action_text([("bash", {"command": "true"})])), args.n)
    raw = timed(lambda: env.sandbox.exec("true"), args.n)
    table.add("step (bash true)", step, "Sandbox.exec true", raw)

    # grading per library
    for library in libraries:
        chosen = [i for i in instances if i.repo == library][: args.grades]
        grading, tests = [], []
        for inst in chosen:
            t = time.perf_counter()
            verdict = env.task_set.grade_patch(inst, inst.patch)
            grading.append((time.perf_counter() - t) * 1000)
            if not verdict.resolved:
                print(f"  warning: gold patch of {inst.instance_id} did not resolve: {verdict.details}")
            grader = env._graders[env.image_of(inst)]
            t = time.perf_counter()
            grader.exec(f"cd {REPO_DIR} && {ACTIVATE_ENVIRONMENT}; {inst.command}", timeout=600)
            tests.append((time.perf_counter() - t) * 1000)
        table.add(f"grade {library.split('/')[-1]}", grading, "test command alone", tests)
    env.close()
    table.print()
    print(json.dumps({"bench": "swe_env", "tasks": str(args.tasks), "load": os.getloadavg(), "rows": table.rows}))


if __name__ == "__main__":
    main()
