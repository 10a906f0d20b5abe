"""Peer comparison: CISPO vs GRPO vs DAPO (our trainer) and TRL's GRPOTrainer (loss cispo / grpo).

Same env (m2rl/Python-v0 arith tasks), same warm-start checkpoint (`model.init`), same seeds, same budget:
`--steps` rollout batches of `--prompts` tasks x G samples, one on-policy optimizer step per batch (ours
skips the step when dynamic sampling drops every group; the table counts the steps taken), the same
learning rate and AdamW settings. Our rows run
`m2rl.rl.trainer.Trainer` (multi-turn episodes in bubblewrap sandboxes); TRL rows run `GRPOTrainer` on
the single-turn variant (benchmarks/trl_single_turn.py): prompt = the env's first prompt, reward = the first
turn's python call prints the answer.

Every row is measured the same way: the multi-turn held-out success of `Trainer.evaluate()` (avg@k: the
mean over `--eval-samples` samples at the training temperature of each of `--eval-tasks` test-split tasks,
as the main job measures it) at step 0, every `--eval-every` steps and at the end (TRL's weights are
saved in HF format and loaded back into our model for it), and the greedy single-turn held-out success of
the final weights. Reported over seeds: initial and final held-out success, steps to a target held-out
success (default: initial + 0.2; resolution `--eval-every`), final single-turn success, wall time per run.

    python -m m2rl.benchmarks.cispo_vs_baselines --quick              # smoke: a few minutes
    python -m m2rl.benchmarks.cispo_vs_baselines --seeds 3 --out runs/cispo_vs_baselines.json
                                                                      # the full comparison: hours on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
OURS = ("cispo", "grpo", "dapo")
TRL = ("trl-cispo", "trl-grpo")
VARIANTS = OURS + TRL


# ------------------------------------------------------------------------------------------ pure pieces


def eval_curve(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, held-out success) of every eval in a metrics.jsonl, in step order (last record wins a tie)."""
    by_step = {int(r["step"]): float(r["eval/success_rate"]) for r in records if "eval/success_rate" in r}
    return sorted(by_step.items())


def steps_to_target(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first eval step whose held-out success reaches `target`, or None if none does."""
    return next((step for step, success in curve if success >= target - 1e-12), None)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class RunResult:
    variant: str
    seed: int
    curve: list[tuple[int, float]]  # multi-turn held-out success per eval step
    single_turn_final: float
    wall_s: float
    optimizer_steps: int  # ours skips a step whose groups all have equal rewards (dynamic sampling)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def initial(self) -> float:
        return self.curve[0][1] if self.curve else math.nan

    @property
    def final(self) -> float:
        return self.curve[-1][1] if self.curve else math.nan


def summarize(runs: list[RunResult], target: float) -> dict[str, Any]:
    """Per-variant statistics over seeds."""
    hits = [steps_to_target(r.curve, target) for r in runs]
    reached = [h for h in hits if h is not None]
    initial, final, single, wall, updates = (
        mean_std([float(getattr(r, k)) for r in runs])
        for k in ("initial", "final", "single_turn_final", "wall_s", "optimizer_steps"))
    return {
        "seeds": [r.seed for r in runs],
        "initial_mean": initial[0], "final_mean": final[0], "final_std": final[1],
        "steps_to_target": hits, "steps_to_target_mean": statistics.fmean(reached) if reached else None,
        "reached": len(reached), "single_turn_final_mean": single[0], "single_turn_final_std": single[1],
        "wall_s_mean": wall[0], "wall_s_std": wall[1], "optimizer_steps_mean": updates[0],
    }


def format_steps(summary: dict[str, Any]) -> str:
    n, k = len(summary["seeds"]), summary["reached"]
    if k == 0:
        return f"not reached (0/{n})"
    return f"{summary['steps_to_target_mean']:.1f} ({k}/{n} reached)"


def format_table(summaries: dict[str, dict[str, Any]], target: float, initial_single_turn: float) -> str:
    """One markdown table, a row per variant."""
    lines = [
        (f"| variant | initial held-out | final held-out (mean ± std) | steps to {target:.2f} | "
         f"single-turn final (init {initial_single_turn:.2f}) | optimizer steps | wall s / run |"),
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        lines.append(
            f"| {name} | {s['initial_mean']:.3f} | {s['final_mean']:.3f} ± {s['final_std']:.3f} | {format_steps(s)} | "
            f"{s['single_turn_final_mean']:.3f} ± {s['single_turn_final_std']:.3f} | "
            f"{s['optimizer_steps_mean']:.1f} | {s['wall_s_mean']:.0f} ± {s['wall_s_std']:.0f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ budget


@dataclass
class Budget:
    steps: int = 40
    prompts: int = 8  # tasks per rollout batch
    group_size: int = 8  # G
    eval_every: int = 10
    eval_tasks: int = 64
    eval_samples: int = 4  # samples per held-out task (avg@k at the training temperature)
    max_new_tokens: int = 64
    max_turns: int = 3  # env.max_steps (ours only: the TRL variant is one turn)
    num_train_tasks: int = 512
    num_envs: int = 32
    threads: int = 2

    def __post_init__(self) -> None:
        for name in ("steps", "prompts", "eval_tasks", "eval_samples", "max_new_tokens", "max_turns", "num_train_tasks",
                     "num_envs", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"group size must be >= 2 for group-relative advantages, got {self.group_size}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")

    def overrides(self, init: Path, run_root: Path, name: str, seed: int, kind: str = "cispo") -> list[str]:
        """configs/train.yaml overrides for one of our runs; the batch size is constant (no warm-up), so
        every variant sees prompts x G samples per step."""
        batch = self.prompts * self.group_size
        return [
            f"model.init={init}", f"run_root={run_root}", f"name={name}", f"seed={seed}", f"learner.seed={seed}",
            f"steps={self.steps}", "max_minutes=100000", "checkpoint_every=0", f"threads={self.threads}",
            f"learner.loss.kind={kind}", f"rollout.group_size={self.group_size}",
            f"rollout.max_new_tokens={self.max_new_tokens}", f"rollout.num_envs={self.num_envs}",
            f"rollout.batch_warmup.start_size={batch}", f"rollout.batch_warmup.target_size={batch}",
            "rollout.batch_warmup.warmup_steps=0", f"rollout.batch_warmup.multiple_of={self.group_size}",
            f"env.max_steps={self.max_turns}", f"env.num_train_tasks={self.num_train_tasks}",
            f"eval.every={self.eval_every}", f"eval.num_tasks={self.eval_tasks}", "eval.greedy=false",
            f"eval.samples_per_task={self.eval_samples}", "eval.report_greedy=false",
        ]


QUICK = Budget(steps=8, prompts=4, group_size=4, eval_every=4, eval_tasks=16, eval_samples=2, num_train_tasks=64,
               num_envs=16)


# ------------------------------------------------------------------------------------------ runs


class Bench:
    """Holds what all runs share: the config, the held-out single-turn tasks, the tokenizer."""

    def __init__(self, budget: Budget, init: Path, run_root: Path, config_path: Path) -> None:
        from m2rl.benchmarks.trl_single_turn import single_turn_tasks
        from m2rl.config import load_config
        from m2rl.model import M2Tokenizer
        from m2rl.rl.trainer import TrainConfig

        self.budget, self.init, self.run_root, self.config_path = budget, init, run_root, config_path
        base = load_config(TrainConfig, config_path, budget.overrides(init, run_root, "probe", 0))
        self.env = base.env
        self.rollout = base.rollout
        self.learner = base.learner
        # Like Trainer: the checkpoint's tokenizer, else the committed tiny one.
        tokenizer_file = init / "tokenizer.json"
        self.tokenizer = M2Tokenizer.from_file(tokenizer_file) if tokenizer_file.exists() else M2Tokenizer.tiny()
        kinds = list(base.env.kinds) if base.env.kinds else None
        self.test_tasks, self.tools = single_turn_tasks(base.env.id, "test", budget.eval_tasks, kinds,
                                                        base.env.enable_thinking)
        self.train_tasks, _ = single_turn_tasks(base.env.id, "train", budget.num_train_tasks, kinds,
                                                base.env.enable_thinking)

    def config(self, name: str, seed: int, kind: str = "cispo") -> Any:
        from m2rl.config import load_config
        from m2rl.rl.trainer import TrainConfig

        return load_config(TrainConfig, self.config_path, self.budget.overrides(self.init, self.run_root, name,
                                                                                 seed, kind))

    def single_turn(self, model: torch.nn.Module) -> float:
        from m2rl.benchmarks.trl_single_turn import single_turn_success

        return single_turn_success(model, self.tokenizer, self.test_tasks, self.tools, self.budget.max_new_tokens,
                                   enable_thinking=self.env.enable_thinking)

    def run_ours(self, kind: str, seed: int) -> RunResult:
        from m2rl.rl.trainer import Trainer
        from m2rl.runs import read_jsonl

        start = time.perf_counter()
        trainer = Trainer(self.config(f"{kind}-seed{seed}", seed, kind))
        summary = trainer.train()
        wall = time.perf_counter() - start
        curve = eval_curve(read_jsonl(trainer.run.directory / "metrics.jsonl"))
        return RunResult(kind, seed, curve, self.single_turn(trainer.model), wall,
                         int(trainer.learner.optimizer_steps), {"run": summary["run"]})

    def run_trl(self, variant: str, seed: int) -> RunResult:
        from m2rl.benchmarks.trl_single_turn import TRLSettings, run_trl
        from m2rl.rl.losses import DEFAULT_EPS
        from m2rl.rl.trainer import Trainer

        loss_type = variant.removeprefix("trl-")
        low, high = DEFAULT_EPS[loss_type]
        b, lr = self.budget, self.learner
        settings = TRLSettings(
            loss_type=loss_type, seed=seed, steps=b.steps, prompts_per_step=b.prompts, group_size=b.group_size,
            lr=lr.lr, max_new_tokens=b.max_new_tokens, temperature=self.rollout.temperature,
            # TRL's cispo caps the weight at epsilon_high ABSOLUTE: our cap 1 + eps_high, given the same way
            epsilon=low, epsilon_high=(1.0 + high) if loss_type == "cispo" else high,
            max_grad_norm=lr.max_grad_norm or 1e9, betas=lr.betas, adam_eps=lr.adam_eps,
            weight_decay=lr.weight_decay, threads=b.threads,
        )
        start = time.perf_counter()
        # Our trainer, used only for its held-out evaluation (same envs, tasks, sampling, loop config).
        evaluator = Trainer(self.config(f"{variant}-seed{seed}-eval", seed))
        curve: list[tuple[int, float]] = []

        def evaluate(step: int, model: torch.nn.Module) -> None:
            evaluator.policy.update_weights(model.state_dict())
            metrics = evaluator.evaluate()
            evaluator.run.log_metrics(step, metrics)
            curve.append((step, metrics["eval/success_rate"]))

        try:
            with tempfile.TemporaryDirectory(prefix=f"{variant}-", dir=self.run_root) as work:
                out = run_trl(settings, self.init, self.train_tasks, self.tools, self.tokenizer, Path(work),
                              evaluate, b.eval_every)
        finally:
            evaluator.close()
        wall = time.perf_counter() - start
        rewards = [e["reward"] for e in out["log"] if "reward" in e]
        return RunResult(variant, seed, curve, self.single_turn(out["model"]), wall, out["optimizer_steps"],
                         {"run": str(evaluator.run.directory),
                          "train_reward_first": rewards[0] if rewards else None,
                          "train_reward_last": rewards[-1] if rewards else None, "settings": asdict(settings)})


def machine_line(budget: Budget) -> str:
    import transformers
    import trl

    return (f"# {platform.platform()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, trl {trl.__version__}, {budget.threads} torch threads")


def budget_line(budget: Budget, init: Path, seeds: list[int], target: float, lr: float) -> str:
    return (f"# budget: {budget.steps} rollout batches x {budget.prompts} tasks x G={budget.group_size} samples "
            f"(one on-policy optimizer step per batch; ours skips a batch whose groups all tie), lr {lr:g} constant, max {budget.max_new_tokens} new tokens/turn, "
            f"{budget.max_turns} turns (ours) / 1 turn (TRL); held-out eval: {budget.eval_tasks} test tasks x "
            f"{budget.eval_samples} samples (avg@{budget.eval_samples}), "
            f"every {budget.eval_every} steps; seeds {seeds}; init {init}; target held-out success {target:.3f}")


NOTES = """\
notes: every success column is measured on OUR model with OUR evaluator (TRL weights are saved in HF format and
loaded back with m2rl.model.load_pretrained). TRL rows train on the single-turn variant (first turn only, reward:
its python call prints the answer), ours on full multi-turn episodes (python call, then submit). trl-cispo uses
epsilon_high = 1 + eps_high = 5.0 (TRL's cispo cap is absolute and defaults to 0.2; ours is 1 + eps_high with
eps_high 4.0), so both cap the weight at 5. trl-grpo: epsilon 0.2 both sides, TRL's per-sequence mean; our grpo
averages per token; our dapo is clip-higher 0.2/0.28 with a per-token mean. Ours uses dynamic sampling (flat
groups dropped, a batch of only flat groups takes no optimizer step); TRL keeps them at zero advantage."""


def build_quick_init(out: Path, threads: int) -> Path:
    from m2rl.rl.warm_start import build_warm_start

    if not (out / "config.json").exists():
        print(f"# building a quick warm-start checkpoint in {out}", flush=True)
        build_warm_start(out, demos=64, steps=40, batch_size=16, lr=3e-3, seed=0, threads=threads)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds 0..n-1 (default 3; --quick: 2)")
    ap.add_argument("--steps", type=int, default=None, help="rollout batches per run (default 40; --quick: 8)")
    ap.add_argument("--quick", action="store_true", help="a very small budget for smoke testing")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    ap.add_argument("--target", type=float, default=None, help="held-out success target (default initial + delta)")
    ap.add_argument("--target-delta", type=float, default=0.2)
    ap.add_argument("--init", type=Path, default=None, help="warm-start checkpoint (default: train.yaml model.init)")
    ap.add_argument("--build-init", action="store_true",
                    help="if the checkpoint is missing, build a quick one (64 demos, 40 SFT steps) at --init or in "
                         "the run folder")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "train.yaml")
    ap.add_argument("--prompts", type=int, default=None, help="tasks per rollout batch (default 8)")
    ap.add_argument("--group-size", type=int, default=None, help="G (default 8)")
    ap.add_argument("--eval-every", type=int, default=None)
    ap.add_argument("--eval-tasks", type=int, default=None)
    ap.add_argument("--eval-samples", type=int, default=None, help="samples per held-out task (default 4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--run-root", type=Path, default=None, help="parent of this invocation's run folder (default: the system temp dir)")
    ap.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if args.seeds is not None and args.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if args.target is not None and not 0.0 <= args.target <= 1.0:
        ap.error(f"--target must be in [0, 1], got {args.target}")
    return args


def make_budget(args: argparse.Namespace) -> Budget:
    base = QUICK if args.quick else Budget()
    chosen = {"steps": args.steps, "prompts": args.prompts, "group_size": args.group_size,
              "eval_every": args.eval_every, "eval_tasks": args.eval_tasks, "eval_samples": args.eval_samples,
              "threads": args.threads}
    values = {**asdict(base), **{k: v for k, v in chosen.items() if v is not None}}
    return Budget(**values)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    try:
        budget = make_budget(args)
    except ValueError as exc:
        sys.exit(f"cispo_vs_baselines: {exc}")
    torch.set_num_threads(budget.threads)
    seeds = list(range(args.seeds if args.seeds is not None else (2 if args.quick else 3)))
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    if args.run_root is not None:
        args.run_root.mkdir(parents=True, exist_ok=True)
    # A fresh folder per invocation: a rerun never appends to an earlier run's metrics.jsonl.
    run_root = Path(tempfile.mkdtemp(prefix="cispo_vs_baselines-", dir=args.run_root))
    init = args.init
    if init is None:
        from m2rl.config import load_config
        from m2rl.rl.trainer import TrainConfig

        configured = load_config(TrainConfig, args.config).model.init
        init = Path(configured) if configured else None
        if init is None:
            sys.exit("cispo_vs_baselines: model.init is empty in the config; pass --init CHECKPOINT")
        init = init if init.is_absolute() else REPO / init
    init = init.resolve()
    if not (init / "config.json").exists():
        if not args.build_init:
            sys.exit(f"cispo_vs_baselines: warm-start checkpoint {init} not found; build it with "
                     "`python -m m2rl.rl.warm_start`, pass --init, or add --build-init for a quick one")
        # Never write a quick checkpoint over the configured asset path: it goes where --init says, or here.
        init = build_quick_init(init if args.init is not None else run_root / "quick-init", budget.threads)

    bench = Bench(budget, init, run_root, args.config)
    from m2rl.model import load_pretrained

    initial_single_turn = bench.single_turn(load_pretrained(init, dtype=torch.float32))
    print(machine_line(budget), flush=True)
    results: dict[str, list[RunResult]] = {}
    for variant in variants:
        for seed in seeds:
            print(f"# running {variant} seed {seed}", flush=True)
            run = bench.run_ours(variant, seed) if variant in OURS else bench.run_trl(variant, seed)
            print(f"#   held-out curve {run.curve}, single-turn final {run.single_turn_final:.3f}, "
                  f"{run.wall_s:.0f} s", flush=True)
            results.setdefault(variant, []).append(run)
    initials = [r.initial for runs in results.values() for r in runs]
    target = args.target if args.target is not None else min(1.0, statistics.fmean(initials) + args.target_delta)
    summaries = {v: summarize(runs, target) for v, runs in results.items()}

    print()
    print(machine_line(budget))
    print(budget_line(budget, init, seeds, target, bench.learner.lr))
    print(format_table(summaries, target, initial_single_turn))
    print(NOTES)
    record = {
        "benchmark": "cispo_vs_baselines", "machine": machine_line(budget)[2:], "budget": asdict(budget),
        "seeds": seeds, "init": str(init), "target": target, "initial_single_turn": initial_single_turn,
        "summaries": summaries,
        "runs": [{**asdict(r), "initial": r.initial, "final": r.final} for runs in results.values() for r in runs],
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
