"""Rollout throughput: synchronous vs asynchronous (rl/orchestrator.py), same envs, policy and hardware.

Each row trains `--steps` steps the way `m2rl train` does: a batch of `--groups` x `--group-size` episodes
of the main job's stack (the tiny M2 warm start model/assets/tiny-python-sft as a LocalPolicy with its own
copy of the weights, m2rl/Python-v0 arithmetic tasks in bubblewrap sandboxes), then a real CISPO update of
the learner's copy (Learner.update) and the in-memory weight push to the generator.
- sync: the trainer's synchronous loop: all of a batch's episodes from the current weights (EpisodeRunner),
  then the update while nothing is generated.
- async k=N: the orchestrator with rollout.max_staleness N generating on its own thread while the learner
  updates in this one; groups are handed over as they complete.
Both run their episodes on the same kind of event-loop thread with one worker thread per env (asyncio's
default executor has cores + 4 threads, which would cap the env steps in flight, not the method).

Tool latency: the Python env's own tool calls take ~0.1 s in bubblewrap, far less than a test suite, a build or
a page load of the SWE and browser envs. `ToolLatency` (below) stands for those: it sleeps a lognormal time
(median `--tool-latency-s`, sigma `--tool-latency-sigma`: a long tail) in every env step, in the env's worker
thread, as a slow tool call would. The SWE env itself needs Docker and is not run here.

Reported per row: trajectories trained per minute and the generator busy fraction (wall time with at least one
generate request in flight), both over the steps after the first (warmed up), the largest staleness trained
on, and the speed-up over sync with the same number of envs. Then one JSON line.

    python -m m2rl.benchmarks.rollout [--envs 1,2,4,8] [--staleness 1,2] [--steps 4] [--smoke]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import gymnasium
import torch
from m2rl.agent.local_policy import LocalPolicy
from m2rl.agent.loop import LoopConfig, TextEnv
from m2rl.agent.policy import SamplingParams
from m2rl.rl.env_pool import LocalEnvPool, WatchedPolicy
from m2rl.rl.learner import Learner, LearnerConfig
from m2rl.rl.orchestrator import OrchestratorConfig, RolloutOrchestrator
from m2rl.rl.rollout import EpisodeRunner, ScoredTrajectory
from m2rl.rl.rollout_stats import BusyClock
from m2rl.rl.rollout_thread import BackgroundRollouts, EventLoopThread
from m2rl.rl.trainer import (
    EnvSection,
    ModelSection,
    build_model_and_tokenizer,
    episodes_to_batch,
    learner_advantages,
    make_env_factory,
)


class ToolLatency(gymnasium.Wrapper):
    """Every step takes a lognormal extra time: a stand-in for tool calls that take real time (see above)."""

    def __init__(self, env: gymnasium.Env, median_s: float, sigma: float, seed: int) -> None:
        super().__init__(env)
        self.median_s, self.sigma, self.rng = median_s, sigma, random.Random(seed)

    def step(self, action: Any) -> Any:
        if self.median_s > 0:
            time.sleep(self.median_s * math.exp(self.rng.gauss(0.0, self.sigma)))
        return self.env.step(action)


@dataclass
class Settings:
    steps: int = 4
    groups: int = 2
    group_size: int = 4
    max_new_tokens: int = 64
    max_turns: int = 3
    tool_latency_s: float = 1.0
    tool_latency_sigma: float = 0.5
    threads: int = 2
    sandbox: str = "bwrap"
    env_id: str = "m2rl/Python-v0"
    max_context_tokens: int = 768  # the SWE env's first prompt alone is ~1,500 tokens: 3072 there
    kinds: tuple[str, ...] | None = ("arith",)


@dataclass
class Row:
    envs: int
    mode: str
    trajectories: int  # trained on, after the first step
    seconds: float  # wall time of the steps after the first
    busy: float  # generator busy fraction over those steps
    staleness_max: int
    dropped_stale: int

    @property
    def per_min(self) -> float:
        return self.trajectories * 60.0 / max(self.seconds, 1e-9)


class Stack:
    """The main job's model, tokenizer, env factory and tasks, built once; `learner_copy` per row."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.model, self.tokenizer = build_model_and_tokenizer(ModelSection(), "cpu")
        kinds = list(settings.kinds) if settings.kinds else None
        self.envs = make_env_factory(EnvSection(id=settings.env_id, sandbox=settings.sandbox, kinds=kinds,
                                                max_steps=settings.max_turns), "train")
        self.envs().close()  # the first env made lists the tasks
        self.tasks = self.envs.task_ids("train", 512, kinds)
        self.params = SamplingParams(max_tokens=settings.max_new_tokens, temperature=1.0,
                                     stop_ids=(self.tokenizer.eos_id,))
        self.loop = LoopConfig(max_turns=settings.max_turns, max_context_tokens=settings.max_context_tokens,
                               check_continuity=False)

    def make_env(self, seed: int) -> TextEnv:
        s = self.settings
        if s.tool_latency_s <= 0:  # the env's own tools only (the SWE env: containers and test runs)
            return self.envs()
        return ToolLatency(self.envs(), s.tool_latency_s, s.tool_latency_sigma, seed)  # type: ignore[arg-type]

    def runner(self, num_envs: int) -> EpisodeRunner:
        seeds = iter(range(10_000))
        return EpisodeRunner(lambda: self.make_env(next(seeds)), num_envs, self.tokenizer)

    def learner_and_policy(self) -> tuple[Learner, LocalPolicy]:
        model = copy.deepcopy(self.model)
        generator = copy.deepcopy(self.model).eval()
        for parameter in generator.parameters():
            parameter.requires_grad_(False)
        learner = Learner(model, LearnerConfig(lr=1e-5))
        return learner, LocalPolicy(generator, self.tokenizer, max_batch_size=64)

    def update(self, learner: Learner, policy: LocalPolicy, episodes: list[ScoredTrajectory]) -> None:
        kept = learner_advantages(episodes, dynamic_sampling=False)
        if kept:
            batch = episodes_to_batch([e for e, _ in kept], [a for _, a in kept], pad_id=self.tokenizer.eos_id)
            learner.update(batch)
        policy.update_weights(learner.model.state_dict(), policy.policy_version + 1)


def run_sync(stack: Stack, num_envs: int) -> Row:
    s = stack.settings
    learner, policy = stack.learner_and_policy()
    clock = BusyClock()
    watched = WatchedPolicy(policy, clock)
    runner = stack.runner(num_envs)
    thread = EventLoopThread(num_envs + 4)
    rng = random.Random(0)
    trained, start, busy0 = 0, 0.0, 0.0
    try:
        for step in range(s.steps):
            if step == 1:
                start, busy0 = time.monotonic(), clock.busy_seconds()
            tasks = rng.sample(stack.tasks, s.groups)
            episodes = thread.run(runner.run(watched, tasks, s.group_size, stack.params, stack.loop))
            stack.update(learner, policy, episodes)
            trained += len(episodes) if step >= 1 else 0
        seconds = time.monotonic() - start
        return Row(num_envs, "sync", trained, seconds, (clock.busy_seconds() - busy0) / seconds, 0, 0)
    finally:
        thread.close()
        runner.close()


def run_async(stack: Stack, num_envs: int, max_staleness: int) -> Row:
    s = stack.settings
    learner, policy = stack.learner_and_policy()
    runner = stack.runner(num_envs)
    pool = LocalEnvPool(runner, policy)
    rng = random.Random(0)
    config = OrchestratorConfig(group_size=s.group_size, groups_per_batch=s.groups, max_staleness=max_staleness)
    orchestrator = RolloutOrchestrator(pool, lambda: rng.choice(stack.tasks), stack.params, lambda: stack.loop,
                                       config, version=0, eos_id=stack.tokenizer.eos_id)
    rollouts = BackgroundRollouts.start(orchestrator, num_envs + 4)
    trained, start, busy0, stale, dropped = 0, 0.0, 0.0, 0, 0
    try:
        for step in range(s.steps):
            if step == 1:
                start, busy0 = time.monotonic(), pool.clock.busy_seconds()
            batch = rollouts.next_batch(s.groups)
            stack.update(learner, policy, batch.episodes())
            rollouts.on_weights_updated(policy.policy_version)
            if step >= 1:
                trained += len(batch.episodes())
                stale = max(stale, int(batch.metrics["rollout/staleness_max"]))
                dropped += int(batch.metrics["rollout/dropped_stale"])
        seconds = time.monotonic() - start
        busy = (pool.clock.busy_seconds() - busy0) / seconds
        return Row(num_envs, f"async k={max_staleness}", trained, seconds, busy, stale, dropped)
    finally:
        rollouts.close()
        runner.close()


HEADER = [("| envs | mode | trajectories | seconds | trajectories/min | generator busy | staleness max | "
           "dropped stale | x sync |"), "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]


def format_row(row: Row, sync: Row | None) -> str:
    speedup = f"{row.per_min / sync.per_min:.2f}x" if sync and sync.per_min else "-"
    return (f"| {row.envs} | {row.mode} | {row.trajectories} | {row.seconds:.1f} | {row.per_min:.1f} | {row.busy:.0%} | "
            f"{row.staleness_max} | {row.dropped_stale} | {speedup} |")


def format_table(rows: list[Row]) -> str:
    sync = {r.envs: r for r in rows if r.mode == "sync"}
    return "\n".join([*HEADER, *(format_row(r, sync.get(r.envs)) for r in rows)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envs", default="1,2,4,8", help="numbers of envs (episodes in flight) to compare")
    ap.add_argument("--staleness", default="1,2", help="max_staleness values of the asynchronous rows")
    ap.add_argument("--steps", type=int, default=Settings.steps)
    ap.add_argument("--groups", type=int, default=Settings.groups, help="groups (tasks) per batch")
    ap.add_argument("--group-size", type=int, default=Settings.group_size)
    ap.add_argument("--max-new-tokens", type=int, default=Settings.max_new_tokens)
    ap.add_argument("--tool-latency-s", type=float, default=Settings.tool_latency_s)
    ap.add_argument("--tool-latency-sigma", type=float, default=Settings.tool_latency_sigma)
    ap.add_argument("--threads", type=int, default=Settings.threads, help="torch threads")
    ap.add_argument("--env", default=Settings.env_id,
                    help="env id; m2rl/SWE-v0 runs the shipped SWE starter set in Docker (use --tool-latency-s 0: "
                         "its containers and test runs are the latency)")
    ap.add_argument("--sandbox", default=None, help="sandbox backend (default: bwrap; docker for m2rl/SWE-v0)")
    ap.add_argument("--smoke", action="store_true", help="a few seconds: 1-2 envs, 2 steps, short latencies")
    return ap.parse_args(argv)


def settings_of(args: argparse.Namespace) -> tuple[Settings, list[int], list[int]]:
    if args.smoke:
        return (Settings(steps=2, groups=1, group_size=2, max_new_tokens=16, max_turns=2, tool_latency_s=0.05,
                         threads=args.threads), [2], [1])
    python = args.env == Settings.env_id
    sandbox = args.sandbox or ("docker" if args.env == "m2rl/SWE-v0" else Settings.sandbox)
    settings = Settings(steps=args.steps, groups=args.groups, group_size=args.group_size,
                        max_new_tokens=args.max_new_tokens, tool_latency_s=args.tool_latency_s,
                        tool_latency_sigma=args.tool_latency_sigma, threads=args.threads, sandbox=sandbox,
                        env_id=args.env, kinds=Settings.kinds if python else None,
                        max_context_tokens=Settings.max_context_tokens if python else 3072)
    return settings, [int(x) for x in args.envs.split(",")], [int(x) for x in args.staleness.split(",")]


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    settings, env_counts, staleness = settings_of(args)
    if settings.steps < 2:
        raise SystemExit("--steps must be >= 2: the first step is the warm-up")
    torch.set_num_threads(settings.threads)
    torch.manual_seed(0)
    stack = Stack(settings)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
               f"{settings.threads}, {platform.platform()}")
    print(f"# {machine}; load {os.getloadavg()[0]:.2f}", flush=True)
    what = f"{settings.env_id}" + (f" {','.join(settings.kinds)}" if settings.kinds else "")
    print(f"# tiny M2 (tiny-python-sft) LocalPolicy, {what} in {settings.sandbox}, batch "
          f"{settings.groups} x {settings.group_size} episodes, <= {settings.max_turns} turns x "
          f"{settings.max_new_tokens} tokens, " + (f"added tool latency lognormal median {settings.tool_latency_s} "
          f"s sigma {settings.tool_latency_sigma}" if settings.tool_latency_s > 0 else "no added tool latency")
          + f", {settings.steps} steps (the first one is warm-up)", flush=True)
    rows: list[Row] = []
    print("\n".join(HEADER), flush=True)
    for n in env_counts:
        sync = run_sync(stack, n)
        rows.append(sync)
        print(format_row(sync, sync), flush=True)
        for k in staleness:
            rows.append(run_async(stack, n, k))
            print(format_row(rows[-1], sync), flush=True)
    print()
    print(format_table(rows))
    print(json.dumps({"benchmark": "rollout", "machine": machine, "settings": asdict(settings),
                      "rows": [asdict(r) | {"per_min": r.per_min} for r in rows]}))
    return rows


if __name__ == "__main__":
    main()
