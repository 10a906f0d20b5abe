"""Peer comparison: CISPO vs GRPO vs DAPO vs GSPO (our trainer) and TRL's GRPOTrainer (loss cispo / grpo).

Same env (m2rl/Python-v0 arith tasks), same warm-start checkpoint (`model.init`), same seeds, same budget:
`--steps` rollout batches of `--prompts` tasks x G samples, one on-policy optimizer step per batch in the
default `onpolicy` regime (ours
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

Off-policy regimes (`--regime`, comma-separated; issue 17: CISPO differs from GRPO/DAPO only when the
importance ratios are not 1):
- `onpolicy`:  one optimizer step per rollout batch from an exact copy of the weights (every ratio is 1).
- `minibatch`: `learner.mini_batches=4`, `learner.epochs=2` per rollout batch, as MiniMax-M1 (8 updates).
- `stale-K`:   rollouts from weights up to K updates old, K in 1..4, through the trainer's own asynchronous
               orchestrator (`rollout.max_staleness=K`, not simulated here); `rollout/staleness_*` in
               `offpolicy_metrics` says how stale the trained tokens really were.
- `bf16-gen`:  the generator's copy of the weights is cast to bfloat16 (the learner stays fp32), so the
               generator's log-probs differ from the learner's; the parity probe's tolerance is raised to 100.
stale-K and bf16-gen set `learner.recompute_old_logprobs=false`: pi_old is the generator's log-prob of the
sampled token (M1's pi_old, the policy that sampled); with the default recomputation the learner's own
log-probs would be pi_old, every first-update ratio would be 1, and the staleness or precision gap would never
reach the objective (measured: ratio_max 1.000 for stale-1 and bf16-gen with recomputation on).
TRL rows run only on-policy. `--custom NAME:KIND:OVERRIDE,...` adds an ablation row (e.g.
`cispo-eh0.28:cispo:learner.loss.eps_high=0.28`). For every row of ours a hook on the learner's
`policy_loss` records which tokens the objective clipped (`ClipStats`: ratio outside [1-eps_low, 1+eps_high],
the sequence ratio for GSPO; for the PPO-style losses also the tokens whose gradient the clip removed), binned
by the probability the generator gave the sampled token; `offpolicy_metrics` averages the learner's own
per-step metrics (clip fractions, ratio extremes and percentiles, generator-learner log-prob gap).
Runs can be split over processes and joined with `--merge A.json B.json --out all.json` (one target).
Results and conclusions: benchmarks/results/cispo_offpolicy-2026-11-30.md (minibatch: plain CISPO collapses
without a trust region; `learner.loss.trust_mask` fixes it).

    python -m m2rl.benchmarks.cispo_vs_baselines --regime minibatch --variants grpo,cispo --steps 15 \
        --custom cispo-mask:cispo:learner.loss.trust_mask=true,learner.loss.eps_low=0.2,learner.loss.eps_high=0.28
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
OURS = ("cispo", "grpo", "dapo", "gspo")
TRL = ("trl-cispo", "trl-grpo")
VARIANTS = OURS + TRL
REGIMES = ("onpolicy", "minibatch", "stale-1", "stale-2", "stale-3", "stale-4", "bf16-gen")
# Generator probability bins of the sampled token for ClipStats: are the clipped tokens the rare ones?
PROB_BINS = (0.0, 0.01, 0.1, 0.5, 0.9, 1.0 + 1e-9)


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


def regime_overrides(regime: str) -> list[str]:
    """configs/train.yaml overrides that put a run in `regime` (see the module docstring)."""
    if regime == "onpolicy":
        return []
    if regime == "minibatch":
        return ["learner.mini_batches=4", "learner.epochs=2"]
    if regime.startswith("stale-") and regime.removeprefix("stale-").isdigit():
        k = int(regime.removeprefix("stale-"))
        if 1 <= k <= 4:
            # pi_old = the generator's log-probs (the policy that sampled): the learner's recomputation would
            # make every first-step ratio 1 and hide the staleness from the objective
            return [f"rollout.max_staleness={k}", "learner.recompute_old_logprobs=false"]
    if regime == "bf16-gen":
        # bf16 rounding moves single probe log-probs by up to ~5 on the tiny policy (MoE routing flips)
        return ["policy.parity_tolerance=100.0", "learner.recompute_old_logprobs=false"]
    raise ValueError(f"unknown regime {regime!r}; choose from {list(REGIMES)}")


def token_ratios(kind: str, logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The ratio each loss clips, per token [B, T]: pi_theta / pi_old, or for GSPO the sequence ratio
    exp(mean_t log(pi_theta / pi_old)) broadcast over the sequence's tokens."""
    log_ratio = (logprobs - old_logprobs) * mask
    if kind == "gspo":
        per_seq = log_ratio.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
        return torch.exp(per_seq).unsqueeze(-1).expand_as(logprobs)
    return torch.exp(log_ratio)


@dataclass
class ClipStats:
    """Which tokens an objective clipped, binned by the probability the generator gave the sampled token.

    `clipped`: ratio outside [low, high] (CISPO caps the token's weight there but keeps its gradient).
    `zeroed`:  clipped AND the clipped branch is PPO's minimum ((r > high, A > 0) or (r < low, A < 0)): the
               token's gradient is removed; for CISPO this is counted but removes nothing.
    """

    tokens: list[int] = field(default_factory=lambda: [0] * (len(PROB_BINS) - 1))
    clipped_low: list[int] = field(default_factory=lambda: [0] * (len(PROB_BINS) - 1))
    clipped_high: list[int] = field(default_factory=lambda: [0] * (len(PROB_BINS) - 1))
    zeroed: list[int] = field(default_factory=lambda: [0] * (len(PROB_BINS) - 1))
    prob_sum: float = 0.0  # sum of generator probabilities over all tokens / over clipped tokens
    clipped_prob_sum: float = 0.0
    advantage_abs_sum: float = 0.0
    clipped_advantage_abs_sum: float = 0.0

    def add(self, ratio: torch.Tensor, generator_logprobs: torch.Tensor, advantages: torch.Tensor,
            mask: torch.Tensor, low: float, high: float) -> None:
        """Count the masked tokens of one [B, T] micro-batch (advantages [B, T] or [B])."""
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(-1).expand_as(ratio)
        live = mask.bool()
        r, adv = ratio.detach()[live].double(), advantages.detach()[live].double()
        prob = torch.exp(generator_logprobs.detach()[live].double())
        below, above = r < low, r > high
        zero = (above & (adv > 0)) | (below & (adv < 0))
        bins = torch.bucketize(prob, torch.tensor(PROB_BINS[1:-1], dtype=torch.float64), right=True)
        for name, selected in (("tokens", torch.ones_like(below)), ("clipped_low", below), ("clipped_high", above),
                               ("zeroed", zero)):
            counts = torch.bincount(bins[selected], minlength=len(PROB_BINS) - 1).tolist()
            setattr(self, name, [a + int(b) for a, b in zip(getattr(self, name), counts)])
        clipped = below | above
        self.prob_sum += float(prob.sum())
        self.clipped_prob_sum += float(prob[clipped].sum())
        self.advantage_abs_sum += float(adv.abs().sum())
        self.clipped_advantage_abs_sum += float(adv[clipped].abs().sum())

    def result(self) -> dict[str, Any]:
        n = sum(self.tokens)
        low, high, zero = sum(self.clipped_low), sum(self.clipped_high), sum(self.zeroed)
        clipped = low + high
        labels = [f"[{a:g},{min(b, 1.0):g}]" for a, b in itertools.pairwise(PROB_BINS)]
        return {
            "tokens": n,
            "clip_frac": clipped / n if n else math.nan,
            "clip_frac_low": low / n if n else math.nan,
            "clip_frac_high": high / n if n else math.nan,
            "zeroed_frac": zero / n if n else math.nan,
            "gen_prob_mean_all": self.prob_sum / n if n else math.nan,
            "gen_prob_mean_clipped": self.clipped_prob_sum / clipped if clipped else None,
            "abs_adv_mean_all": self.advantage_abs_sum / n if n else math.nan,
            "abs_adv_mean_clipped": self.clipped_advantage_abs_sum / clipped if clipped else None,
            "prob_bins": labels,
            "tokens_per_bin": list(self.tokens),
            "clipped_per_bin": [a + b for a, b in zip(self.clipped_low, self.clipped_high)],
            # the share of each bin's tokens that were clipped: > clip_frac where clipping prefers that bin
            "clip_rate_per_bin": [(a + b) / t if t else None
                                  for a, b, t in zip(self.clipped_low, self.clipped_high, self.tokens)],
        }


OFFPOLICY_KEYS = ("clip_frac", "ratio_", "is_weight", "logp_gap", "approx_kl", "staleness", "skipped_steps",
                  "grad_norm")


def offpolicy_metrics(records: list[dict[str, Any]]) -> dict[str, float]:
    """Mean over training steps of the learner's and the rollouts' off-policy metrics in a metrics.jsonl
    (max for `*_max`, min for `*_min`)."""
    values: dict[str, list[float]] = {}
    for r in records:
        for key, value in r.items():
            wanted = not key.startswith("eval/") and any(k in key for k in OFFPOLICY_KEYS)
            if wanted and isinstance(value, (int, float)) and math.isfinite(float(value)):
                values.setdefault(key, []).append(float(value))
    reduce = {"max": max, "min": min}
    return {k: reduce.get(k.rsplit("_", 1)[-1], statistics.fmean)(v) for k, v in sorted(values.items())}


@dataclass
class RunResult:
    variant: str
    seed: int
    curve: list[tuple[int, float]]  # multi-turn held-out success per eval step
    single_turn_final: float
    wall_s: float
    optimizer_steps: int  # ours skips a step whose groups all have equal rewards (dynamic sampling)
    extra: dict[str, Any] = field(default_factory=dict)  # ours: "clip_stats" (ClipStats.result), "offpolicy"
    regime: str = "onpolicy"

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
    clip = [r.extra["clip_stats"] for r in runs if "clip_stats" in r.extra]

    def clip_mean(key: str) -> float | None:
        vals = [c[key] for c in clip if c.get(key) is not None and math.isfinite(c[key])]
        return statistics.fmean(vals) if vals else None

    return {
        "seeds": [r.seed for r in runs],
        "initial_mean": initial[0], "final_mean": final[0], "final_std": final[1],
        "steps_to_target": hits, "steps_to_target_mean": statistics.fmean(reached) if reached else None,
        "reached": len(reached), "single_turn_final_mean": single[0], "single_turn_final_std": single[1],
        "wall_s_mean": wall[0], "wall_s_std": wall[1], "optimizer_steps_mean": updates[0],
        **{f"{k}_mean": clip_mean(k) for k in ("clip_frac", "clip_frac_low", "clip_frac_high", "zeroed_frac",
                                                "gen_prob_mean_all", "gen_prob_mean_clipped")},
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
         f"single-turn final (init {initial_single_turn:.2f}) | optimizer steps | wall s / run | "
         f"clipped tokens (low / high) | grad removed | gen. prob clipped / all |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    def prob(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for name, s in summaries.items():
        lines.append(
            f"| {name} | {s['initial_mean']:.3f} | {s['final_mean']:.3f} ± {s['final_std']:.3f} | {format_steps(s)} | "
            f"{s['single_turn_final_mean']:.3f} ± {s['single_turn_final_std']:.3f} | "
            f"{s['optimizer_steps_mean']:.1f} | {s['wall_s_mean']:.0f} ± {s['wall_s_std']:.0f} | "
            f"{pct(s.get('clip_frac_mean'))} ({pct(s.get('clip_frac_low_mean'))} / {pct(s.get('clip_frac_high_mean'))}) | "
            f"{pct(s.get('zeroed_frac_mean'))} | {prob(s.get('gen_prob_mean_clipped_mean'))} / "
            f"{prob(s.get('gen_prob_mean_all_mean'))} |"
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

    def config(self, name: str, seed: int, kind: str = "cispo", extra: list[str] | None = None) -> Any:
        from m2rl.config import load_config
        from m2rl.rl.trainer import TrainConfig

        return load_config(TrainConfig, self.config_path, self.budget.overrides(self.init, self.run_root, name,
                                                                                 seed, kind) + list(extra or []))

    def single_turn(self, model: torch.nn.Module) -> float:
        from m2rl.benchmarks.trl_single_turn import single_turn_success

        return single_turn_success(model, self.tokenizer, self.test_tasks, self.tools, self.budget.max_new_tokens,
                                   enable_thinking=self.env.enable_thinking)

    def run_ours(self, variant: str, seed: int, regime: str = "onpolicy", kind: str | None = None,
                 overrides: list[str] | None = None) -> RunResult:
        """One of our runs; `kind` (default: the variant's name) and `overrides` for --custom ablation rows."""
        import m2rl.rl.learner as learner_module
        import m2rl.rl.trainer as trainer_module
        from m2rl.rl.trainer import Trainer
        from m2rl.runs import read_jsonl

        kind = kind or variant
        extra = regime_overrides(regime) + list(overrides or [])
        stats = ClipStats()
        at_ppo_bounds = ClipStats()  # the same tokens against PPO's [0.8, 1.2]: what a trust region would touch
        policy_loss, build_backend = learner_module.policy_loss, trainer_module.build_backend

        def recording_loss(config: Any, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                           mask: torch.Tensor, **kwargs: Any) -> Any:
            low, high = config.eps
            generator = kwargs.get("generator_logprobs")
            with torch.no_grad():
                ratio = token_ratios(config.kind, logprobs.detach(), old_logprobs, mask)
                generator = old_logprobs if generator is None else generator
                stats.add(ratio, generator, advantages, mask, 1.0 - low, 1.0 + high)
                at_ppo_bounds.add(ratio, generator, advantages, mask, 0.8, 1.2)
            return policy_loss(config, logprobs, old_logprobs, advantages, mask, **kwargs)

        def bf16_backend(*args: Any, **kwargs: Any) -> Any:
            backend = build_backend(*args, **kwargs)
            if backend.generator_model is None:
                raise ValueError("regime bf16-gen needs policy.kind local (an in-process generator to cast)")
            backend.generator_model.to(torch.bfloat16)  # weight pushes cast the learner's fp32 state on load
            return backend

        start = time.perf_counter()
        learner_module.policy_loss = recording_loss
        if regime == "bf16-gen":
            trainer_module.build_backend = bf16_backend
        try:
            trainer = Trainer(self.config(f"{regime}-{variant}-seed{seed}", seed, kind, extra))
            summary = trainer.train()
        finally:
            learner_module.policy_loss, trainer_module.build_backend = policy_loss, build_backend
        wall = time.perf_counter() - start
        records = read_jsonl(trainer.run.directory / "metrics.jsonl")
        return RunResult(variant, seed, eval_curve(records), self.single_turn(trainer.model), wall,
                         int(trainer.learner.optimizer_steps),
                         {"run": summary["run"], "kind": kind, "overrides": extra, "clip_stats": stats.result(),
                          "clip_stats_at_0.2": at_ppo_bounds.result(), "offpolicy": offpolicy_metrics(records)}, regime)

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
            f"(onpolicy: one optimizer step per batch, minibatch: 4 x 2 epochs; ours skips a batch whose groups all tie), lr {lr:g} constant, max {budget.max_new_tokens} new tokens/turn, "
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
    ap.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + n - 1")
    ap.add_argument("--steps", type=int, default=None, help="rollout batches per run (default 40; --quick: 8)")
    ap.add_argument("--quick", action="store_true", help="a very small budget for smoke testing")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    ap.add_argument("--regime", default="onpolicy",
                    help=f"comma-separated subset of {REGIMES} (TRL variants run only onpolicy)")
    ap.add_argument("--custom", action="append", default=[], metavar="NAME:KIND:OVERRIDE,...",
                    help="an extra row of ours: loss KIND with config overrides, e.g. "
                         "cispo-eh0.28:cispo:learner.loss.eps_high=0.28 (repeatable)")
    ap.add_argument("--lr", type=float, default=None, help="learner.lr for every row of ours (default: the config's)")
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
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="run nothing: merge these results files into one (--out) with one --target")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS) - {""})
    if unknown:
        ap.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    for regime in args.regime.split(","):
        try:
            regime_overrides(regime)
        except ValueError as exc:
            ap.error(str(exc))
    try:
        args.custom = [parse_custom(spec) for spec in args.custom]
    except ValueError as exc:
        ap.error(str(exc))
    if args.seeds is not None and args.seeds < 1:
        ap.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    if args.target is not None and not 0.0 <= args.target <= 1.0:
        ap.error(f"--target must be in [0, 1], got {args.target}")
    return args


def parse_custom(spec: str) -> tuple[str, str, list[str]]:
    """`NAME:KIND:OVERRIDE,OVERRIDE` -> (name, kind, overrides); the overrides may be empty."""
    parts = spec.split(":", 2)
    if len(parts) < 2 or not parts[0] or "/" in parts[0] or parts[1] not in OURS:
        raise ValueError(f"--custom {spec!r}: expected NAME:KIND[:OVERRIDE,...] with KIND one of {list(OURS)}")
    overrides = [o for o in (parts[2].split(",") if len(parts) == 3 else []) if o]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"--custom {spec!r}: overrides must be key=value, got {bad}")
    return parts[0], parts[1], overrides


def make_budget(args: argparse.Namespace) -> Budget:
    base = QUICK if args.quick else Budget()
    chosen = {"steps": args.steps, "prompts": args.prompts, "group_size": args.group_size,
              "eval_every": args.eval_every, "eval_tasks": args.eval_tasks, "eval_samples": args.eval_samples,
              "threads": args.threads}
    values = {**asdict(base), **{k: v for k, v in chosen.items() if v is not None}}
    return Budget(**values)


def merge_records(records: list[dict[str, Any]], target: float | None, target_delta: float = 0.2) -> dict[str, Any]:
    """One record from several invocations' JSON records (e.g. rows run in parallel processes): their runs
    regrouped by regime/variant and summarised against one target (default: mean initial + target_delta)."""
    names = {f.name for f in fields(RunResult)}
    runs = [RunResult(**{**{k: v for k, v in r.items() if k in names},
                         "curve": [(int(a), float(b)) for a, b in r["curve"]]})
            for record in records for r in record["runs"]]
    grouped: dict[str, list[RunResult]] = {}
    for run in runs:
        grouped.setdefault(f"{run.regime}/{run.variant}", []).append(run)
    if target is None:
        target = min(1.0, statistics.fmean(r.initial for r in runs) + target_delta)
    return {"benchmark": "cispo_vs_baselines", "machine": records[0]["machine"], "budgets": [r["budget"] for r in records],
            "init": records[0]["init"], "target": target, "initial_single_turn": records[0]["initial_single_turn"],
            "summaries": {k: summarize(v, target) for k, v in grouped.items()},
            "runs": [{**asdict(r), "initial": r.initial, "final": r.final} for r in runs]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        record = merge_records([json.loads(Path(f).read_text()) for f in args.merge], args.target, args.target_delta)
        print(format_table(record["summaries"], record["target"], record["initial_single_turn"]))
        if args.out:
            args.out.write_text(json.dumps(record, indent=2) + "\n")
        return record
    try:
        budget = make_budget(args)
    except ValueError as exc:
        sys.exit(f"cispo_vs_baselines: {exc}")
    torch.set_num_threads(budget.threads)
    n_seeds = args.seeds if args.seeds is not None else (2 if args.quick else 3)
    seeds = list(range(args.first_seed, args.first_seed + n_seeds))
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    regimes = args.regime.split(",")
    lr = [f"learner.lr={args.lr}"] if args.lr is not None else []
    rows: list[tuple[str, str | None, list[str]]] = [(v, None, lr) for v in variants]
    rows += [(name, kind, lr + overrides) for name, kind, overrides in args.custom]
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
    results: dict[str, list[RunResult]] = {}  # keyed "regime/variant"
    for regime in regimes:
        for variant, kind, overrides in rows:
            if variant in TRL and regime != "onpolicy":
                continue
            for seed in seeds:
                print(f"# running {regime} {variant} seed {seed}", flush=True)
                run = (bench.run_trl(variant, seed) if variant in TRL
                       else bench.run_ours(variant, seed, regime, kind, overrides))
                clip = run.extra.get("clip_stats", {})
                print(f"#   held-out curve {run.curve}, single-turn final {run.single_turn_final:.3f}, "
                      f"clipped {clip.get('clip_frac', math.nan):.4f}, {run.wall_s:.0f} s", flush=True)
                results.setdefault(f"{regime}/{variant}", []).append(run)
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
        "seeds": seeds, "regimes": regimes, "init": str(init), "target": target, "initial_single_turn": initial_single_turn,
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
