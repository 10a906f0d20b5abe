"""`RewardSpec`: which reward components count, with what weights, shaping and clipping.

YAML form (`RewardConfig`, loaded by m2rl.config like every config; every key optional; `components`
replaces the default set when given):

    components: {resolved: 1.0, valid_tool_call: 0.05, invalid_tool_call: -0.05, ...}
    shaping: dense            # dense | potential | none   (or {mode: potential, gamma: 0.99})
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
from typing import Any, Literal

from m2rl.config import ConfigError
from m2rl.config import from_dict as config_from_dict
from m2rl.rewards.components import COMPONENTS
from m2rl.rewards.detectors import DETECTORS, OUTCOME_VOIDING_DETECTORS

ShapingMode = Literal["dense", "potential", "none"]
SHAPING_MODES: tuple[str, ...] = ("dense", "potential", "none")

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


class RewardSpecError(ConfigError):
    """A reward configuration is invalid; the message names the offending key or value (and the file)."""


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
    """The reward of an episode as rewards/compute.py applies it; built from YAML through `RewardConfig`
    (`RewardSpec.from_dict`), whose fields document each setting."""

    weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    """Component -> weight (`components` in YAML)."""
    shaping: str = "dense"
    """dense | potential | none (see RewardConfig.shaping)."""
    gamma: float = 1.0
    """Discount of the potential-based shaping."""
    step_clip: Range | None = None
    """Bounds each step's dense reward (`clip.step`)."""
    dense_total_clip: Range | None = DEFAULT_DENSE_TOTAL_CLIP
    """Bounds the episode's running dense sum (`clip.dense_total`)."""
    total_clip: Range | None = None
    """Bounds the episode's total reward (`clip.total`)."""
    detectors: tuple[str, ...] = tuple(DETECTORS)
    """Detectors run on every step."""
    void_outcome_on: tuple[str, ...] = OUTCOME_VOIDING_DETECTORS
    """Detectors whose hit zeroes the outcome components."""
    numeric_tolerance: float = 1e-6
    """Tolerance of numeric answer matching."""

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
    def from_dict(cls, d: Mapping[str, Any] | None, source: str | None = None, prefix: str = "") -> RewardSpec:
        """The spec of a mapping in the YAML form (`RewardConfig`), checked by m2rl.config: an unknown key,
        a wrong type or a bad value is a RewardSpecError naming the key and `source` (the file)."""
        if d is None:
            return cls()
        if not isinstance(d, Mapping):
            raise RewardSpecError(f"reward spec must be a mapping, got {type(d).__name__}")
        try:
            return config_from_dict(RewardConfig, dict(d), source=source, prefix=prefix).build()
        except RewardSpecError:
            raise
        except ConfigError as exc:  # the same message, as the error type callers of this class expect
            raise RewardSpecError(str(exc)) from None

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


@dataclass
class ClipConfig:
    """Clipping of the reward: each range is [low, high], or null for none."""

    step: tuple[float, float] | None = None
    """Bounds each step's dense reward."""
    dense_total: tuple[float, float] | None = DEFAULT_DENSE_TOTAL_CLIP
    """Bounds the episode's running dense sum (by default dense terms never add up to half a solved task)."""
    total: tuple[float, float] | None = None
    """Bounds the episode's total reward."""


@dataclass
class ShapingConfig:
    """Shaping written as a mapping: `shaping: {mode: potential, gamma: 0.99}`."""

    mode: ShapingMode = "dense"
    """dense | potential | none, as `shaping: MODE`."""
    gamma: float | None = None
    """Discount of the potential-based shaping; null: the top-level `gamma`."""


@dataclass
class RewardConfig:
    """The YAML form of a `RewardSpec` (configs/rewards/default.yaml writes out the default)."""

    components: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    """Reward components and their weights (rewards/components.py); given, it replaces the default set."""
    shaping: ShapingMode | ShapingConfig = "dense"
    """dense: weighted dense terms paid on the step that earns them; potential: the same terms as a
    potential Phi (the weighted dense reward so far), paid as F = gamma * Phi(s') - Phi(s) with
    Phi(terminal) = 0, so credit arrives early but the optimal policy is the outcome-only one (Ng et al.
    1999); none: outcome components only."""
    gamma: float = 1.0
    """Discount of the potential-based shaping, in (0, 1]."""
    clip: ClipConfig = field(default_factory=ClipConfig)
    """Clipping ranges of step, running dense and total rewards."""
    detectors: list[str] = field(default_factory=lambda: list(DETECTORS))
    """Anti-hacking detectors run on every step (their hits are logged as detectors/<name>)."""
    void_outcome_on: list[str] = field(default_factory=lambda: list(OUTCOME_VOIDING_DETECTORS))
    """Detectors whose hit zeroes the episode's outcome components."""
    numeric_tolerance: float = 1e-6
    """Tolerance of numeric answer matching, >= 0."""

    def __post_init__(self) -> None:
        self.build()  # the spec's own checks (component and detector names, ranges) at load time

    def build(self) -> RewardSpec:
        mode, gamma = self.shaping, self.gamma
        if isinstance(mode, ShapingConfig):
            mode, gamma = mode.mode, gamma if mode.gamma is None else mode.gamma
        return RewardSpec(
            weights=dict(self.components),
            shaping=mode,
            gamma=gamma,
            step_clip=self.clip.step,
            dense_total_clip=self.clip.dense_total,
            total_clip=self.clip.total,
            detectors=tuple(self.detectors),
            void_outcome_on=tuple(self.void_outcome_on),
            numeric_tolerance=self.numeric_tolerance,
        )
