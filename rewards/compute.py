"""`compute_episode_rewards`: a `RewardSpec` applied to one episode's step infos.

Order of operations (each step's breakdown sums exactly to its reward):
  1. raw component values per step (rewards/components.py), times their weights;
  2. detector hits (rewards/detectors.py): an offending step keeps only its penalties (no dense gain;
     a fake-output hit only counts where the env parsed test results, see `costs_dense_gain`);
     a hit of a `void_outcome_on` detector anywhere voids the episode's outcome reward;
  3. shaping mode: dense terms paid as earned, as potential-based shaping, or dropped;
  4. clipping: per-step dense, running episode dense total, episode total (a "clip" entry records
     the adjustment);
  5. the outcome reward is paid on the terminal (last) step.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from m2rl.rewards.components import COMPONENTS, OUTCOME_COMPONENTS
from m2rl.rewards.detectors import DetectorHit, costs_dense_gain, run_detectors
from m2rl.rewards.episode import Episode, RewardTask, StepInfo, parse_steps
from m2rl.rewards.shaping import potential_shaping
from m2rl.rewards.spec import RewardSpec

CLIP_KEY = "clip"


@dataclass
class EpisodeRewards:
    per_step: list[float]
    per_step_breakdown: list[dict[str, float]]  # component (and "clip") -> weighted reward, per step
    total: float
    breakdown: dict[str, float]  # component (and "clip") -> episode sum
    detectors: dict[str, int]  # detector -> number of offending steps
    outcome_voided: bool = False
    hits: list[DetectorHit] = field(default_factory=list)

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Flat scalars for metrics.jsonl / TensorBoard."""
        out = {f"{prefix}total": self.total, f"{prefix}outcome_voided": float(self.outcome_voided)}
        out.update({f"{prefix}{k}": v for k, v in self.breakdown.items()})
        out.update({f"{prefix}detector/{k}": float(v) for k, v in self.detectors.items()})
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _clip(x: float, r: tuple[float, float] | None) -> float:
    return x if r is None else min(r[1], max(r[0], x))


def compute_episode_rewards(
    spec: RewardSpec,
    steps: Sequence[Mapping[str, Any] | StepInfo] | Episode,
    task: Mapping[str, Any] | RewardTask | None = None,
    terminal: bool = True,
    *,
    hits: Sequence[DetectorHit] | None = None,
) -> EpisodeRewards:
    """Rewards of an episode, or of an unfinished episode's steps so far with `terminal=False`
    (no outcome yet; potential shaping does not zero the last state's potential). Every
    component only looks backwards, so step t's reward is the same whether computed from the first
    t+1 steps (non-terminal) or from the whole episode: an env can fill `info["reward_breakdown"]`
    from `compute_episode_rewards(spec, infos_so_far, task, terminal=done).per_step_breakdown[-1]`.

    `hits`: the detector hits of these steps when the caller already has them. Detectors only look at
    their own step, so an env scoring step by step runs them on the new step alone
    (`run_detectors([step], task, spec.detectors, first_step=t)`) and passes every hit so far: the
    result is the same and earlier steps are not analysed again.
    """
    if not isinstance(spec, RewardSpec):
        raise TypeError(f"compute_episode_rewards: spec must be a RewardSpec, got {type(spec).__name__}")
    if isinstance(steps, Episode):
        steps, task = steps.steps, steps.task if task is None else task
    infos = parse_steps(steps)
    rtask = RewardTask.from_dict(task)
    if rtask.numeric_tolerance is None:
        rtask = dataclasses.replace(rtask, numeric_tolerance=spec.numeric_tolerance)
    n = len(infos)

    if hits is None:
        hits = run_detectors(infos, rtask, spec.detectors)
    else:
        hits = [h for h in hits if h.detector in spec.detectors and 0 <= h.step < n]
    offending = {h.step for h in hits if costs_dense_gain(h, infos[h.step])}
    counts = {name: len({h.step for h in hits if h.detector == name}) for name in spec.detectors}
    voided = any(h.detector in spec.void_outcome_on for h in hits)

    outcome_names = [c for c in spec.weights if c in OUTCOME_COMPONENTS]
    dense_names = [c for c in spec.weights if c not in OUTCOME_COMPONENTS]

    # Weighted dense contributions [component][step]; an offending step keeps penalties only.
    dense: dict[str, list[float]] = {}
    for c in dense_names:
        raw = COMPONENTS[c](infos, rtask)
        vals = [spec.weights[c] * x for x in raw]
        dense[c] = [min(0.0, v) if t in offending else v for t, v in enumerate(vals)]

    if spec.shaping == "none":
        dense = {c: [0.0] * n for c in dense_names}
    elif spec.shaping == "potential" and n:
        # Phi_c(s_t) = dense reward component c earned before step t; Phi(terminal) = 0.
        for c in dense_names:
            earned = list(itertools.accumulate(dense[c]))  # Phi(s_{t+1}) = dense reward earned up to step t
            phi = [0.0, *earned[:-1], 0.0 if terminal else earned[-1]]
            dense[c] = potential_shaping(phi, spec.gamma)

    per_step_breakdown: list[dict[str, float]] = []
    per_step: list[float] = []
    running_dense = 0.0
    for t in range(n):
        row = {c: dense[c][t] for c in dense_names}
        step_dense = sum(row.values())
        clipped = _clip(step_dense, spec.step_clip)
        bounded = _clip(running_dense + clipped, spec.dense_total_clip)
        if bounded != running_dense + clipped:  # only touch the value when the bound binds (no float noise)
            clipped = bounded - running_dense
        running_dense += clipped
        row[CLIP_KEY] = clipped - step_dense
        per_step_breakdown.append(row)
        per_step.append(clipped)

    # Outcome components score the terminal step only; the total clip applies to a finished episode.
    for row in per_step_breakdown:
        row.update({c: 0.0 for c in outcome_names})
    if n and terminal:
        for c in outcome_names:
            value = 0.0 if voided else spec.weights[c] * COMPONENTS[c](infos, rtask)[-1]
            per_step_breakdown[-1][c] = value
            per_step[-1] += value
        total = sum(per_step)
        clipped_total = _clip(total, spec.total_clip)
        if clipped_total != total:
            per_step[-1] += clipped_total - total
            per_step_breakdown[-1][CLIP_KEY] += clipped_total - total
    total = sum(per_step)

    breakdown = {c: 0.0 for c in [*spec.weights, CLIP_KEY]}
    for row in per_step_breakdown:
        for k, v in row.items():
            breakdown[k] += v
    return EpisodeRewards(
        per_step=per_step,
        per_step_breakdown=per_step_breakdown,
        total=total,
        breakdown=breakdown,
        detectors=counts,
        outcome_voided=voided,
        hits=list(hits),
    )
