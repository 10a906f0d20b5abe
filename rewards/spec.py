"""`RewardSpec`: which reward components count, with what weights, shaping and clipping.

YAML form (every key optional; `components` replaces the default set when given):

    components: {resolved: 1.0, valid_tool_call: 0.05, invalid_tool_call: -0.05, ...}
    shaping: dense            # dense | potential | none
    gamma: 1.0                # discount of the potential-based shaping
    clip: {step: [-0.5, 0.5], dense_total: [-0.5, 0.5], total: null}
    detectors: [test_tampering, fake_test_output, hidden_test_access, network_attempt]
    void_outcome_on: [test_tampering, hidden_test_access]   # fake_test_output is a logged signal
    numeric_tolerance: 1.0e-6
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from m2rl.rewards.components import COMPONENTS
from m2rl.rewards.detectors import DETECTORS, OUTCOME_VOIDING_DETECTORS

SHAPING_MODES = ("dense", "potential", "none")

# Weights from the design brief; format_error and repetition are not in the brief and are set to
# the same scale as invalid_tool_call / a mild loop penalty.
DEFAULT_WEIGHTS: dict[str, float] = {
    "resolved": 1.0,
    "valid_tool_call": 0.05,
    "relevant_file": 0.03,
    "valid_syntax": 0.02,
    "test_progress": 0.04,
    "invalid_tool_call": -0.05,
    "syntax_error": -0.03,
    "timeout": -0.1,
    "format_error": -0.05,
    "repetition": -0.02,
}
# Dense terms may never add up to half a solved task, so an unsolved episode never outscores a solved one.
DEFAULT_DENSE_TOTAL_CLIP = (-0.5, 0.5)

Range = tuple[float, float]


class RewardSpecError(ValueError):
    """A reward configuration is invalid; the message names the offending key or value."""


def _number(value: Any, where: str) -> float:
    # bool is an int subclass; `true` as a weight is a config mistake, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RewardSpecError(f"{where} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise RewardSpecError(f"{where} must be finite, got {value!r}")
    return float(value)


def _range(value: Any, where: str) -> Range | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__") or len(value) != 2:
        raise RewardSpecError(f"{where} must be a [low, high] pair or null, got {value!r}")
    lo, hi = _number(value[0], f"{where}[0]"), _number(value[1], f"{where}[1]")
    if lo > hi:
        raise RewardSpecError(f"{where}: clip range [{lo}, {hi}] is negative (low > high)")
    return (lo, hi)


def _names(value: Any, known: Mapping[str, Any], where: str) -> tuple[str, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise RewardSpecError(f"{where} must be a list of names, got {value!r}")
    for name in value:
        if name not in known:
            raise RewardSpecError(f"{where}: unknown detector {name!r}; known: {sorted(known)}")
    return tuple(value)


@dataclass(frozen=True)
class RewardSpec:
    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    # dense: weighted dense terms paid on the step that earns them.
    # potential: the same terms as a potential Phi (cumulative weighted dense reward so far), paid as
    #   F = gamma * Phi(s') - Phi(s) with Phi(terminal) = 0: credit arrives early but the optimal
    #   policy is the outcome-only one (Ng et al. 1999).
    # none: outcome components only.
    shaping: str = "dense"
    gamma: float = 1.0
    step_clip: Range | None = None  # bounds each step's dense reward
    dense_total_clip: Range | None = DEFAULT_DENSE_TOTAL_CLIP  # bounds the episode's running dense sum
    total_clip: Range | None = None  # bounds the episode's total reward
    detectors: tuple[str, ...] = tuple(DETECTORS)
    void_outcome_on: tuple[str, ...] = OUTCOME_VOIDING_DETECTORS
    numeric_tolerance: float = 1e-6

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.weights, Mapping):
            raise RewardSpecError(f"components must be a mapping name -> weight, got {self.weights!r}")
        for name, w in self.weights.items():
            if name not in COMPONENTS:
                raise RewardSpecError(f"unknown reward component {name!r}; known: {sorted(COMPONENTS)}")
            _number(w, f"weight of component {name!r}")
        if self.shaping not in SHAPING_MODES:
            raise RewardSpecError(f"shaping must be one of {SHAPING_MODES}, got {self.shaping!r}")
        gamma = _number(self.gamma, "gamma")
        if not 0.0 < gamma <= 1.0:
            raise RewardSpecError(f"gamma must be in (0, 1], got {gamma}")
        for where, r in (
            ("clip.step", self.step_clip),
            ("clip.dense_total", self.dense_total_clip),
            ("clip.total", self.total_clip),
        ):
            _range(r, where)
        _names(list(self.detectors), DETECTORS, "detectors")
        _names(list(self.void_outcome_on), DETECTORS, "void_outcome_on")
        tol = _number(self.numeric_tolerance, "numeric_tolerance")
        if tol < 0:
            raise RewardSpecError(f"numeric_tolerance must be >= 0, got {tol}")

    @classmethod
    def default(cls) -> RewardSpec:
        return cls()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> RewardSpec:
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise RewardSpecError(f"reward spec must be a mapping, got {type(d).__name__}")
        known = {
            "components",
            "shaping",
            "gamma",
            "clip",
            "detectors",
            "void_outcome_on",
            "numeric_tolerance",
        }
        unknown = sorted(set(d) - known)
        if unknown:
            raise RewardSpecError(f"unknown reward spec key(s) {unknown}; known: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        if "components" in d:
            comps = d["components"]
            if not isinstance(comps, Mapping):
                raise RewardSpecError(f"components must be a mapping name -> weight, got {comps!r}")
            for name, w in comps.items():
                if name not in COMPONENTS:
                    raise RewardSpecError(f"unknown reward component {name!r}; known: {sorted(COMPONENTS)}")
                kwargs.setdefault("weights", {})[name] = _number(w, f"weight of component {name!r}")
            kwargs.setdefault("weights", {})
        shaping = d.get("shaping", "dense")
        if isinstance(shaping, Mapping):  # shaping: {mode: potential, gamma: 0.99}
            extra = sorted(set(shaping) - {"mode", "gamma"})
            if extra:
                raise RewardSpecError(f"unknown shaping key(s) {extra}; known: ['gamma', 'mode']")
            if "gamma" in shaping:
                kwargs["gamma"] = _number(shaping["gamma"], "shaping.gamma")
            shaping = shaping.get("mode", "dense")
        kwargs["shaping"] = shaping
        if "gamma" in d:
            kwargs["gamma"] = _number(d["gamma"], "gamma")
        if "clip" in d:
            clip = d["clip"] or {}
            if not isinstance(clip, Mapping):
                raise RewardSpecError(f"clip must be a mapping with step/dense_total/total, got {clip!r}")
            extra = sorted(set(clip) - {"step", "dense_total", "total"})
            if extra:
                raise RewardSpecError(f"unknown clip key(s) {extra}; known: ['dense_total', 'step', 'total']")
            kwargs["step_clip"] = _range(clip.get("step"), "clip.step")
            kwargs["dense_total_clip"] = _range(
                clip.get("dense_total", DEFAULT_DENSE_TOTAL_CLIP), "clip.dense_total"
            )
            kwargs["total_clip"] = _range(clip.get("total"), "clip.total")
        if "detectors" in d:
            kwargs["detectors"] = _names(d["detectors"] or [], DETECTORS, "detectors")
        if "void_outcome_on" in d:
            kwargs["void_outcome_on"] = _names(d["void_outcome_on"] or [], DETECTORS, "void_outcome_on")
        if "numeric_tolerance" in d:
            kwargs["numeric_tolerance"] = _number(d["numeric_tolerance"], "numeric_tolerance")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        def rng(r: Range | None) -> list[float] | None:
            return None if r is None else [r[0], r[1]]

        return {
            "components": dict(self.weights),
            "shaping": self.shaping,
            "gamma": self.gamma,
            "clip": {
                "step": rng(self.step_clip),
                "dense_total": rng(self.dense_total_clip),
                "total": rng(self.total_clip),
            },
            "detectors": list(self.detectors),
            "void_outcome_on": list(self.void_outcome_on),
            "numeric_tolerance": self.numeric_tolerance,
        }
