"""A multi-stage training pipeline in one config, e.g. SFT short -> SFT long -> RL short -> RL long.

The trainer walks the stages in order; each stage names its kind, its length in optimizer steps, its
maximum episode/sequence tokens, and free-form overrides of the stage's own config (learner, sampling).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

StageKind = Literal["sft", "rl"]


@dataclass
class StageConfig:
    name: str
    kind: StageKind
    steps: int
    max_tokens: int
    overrides: dict[str, Any] = field(default_factory=dict)  # "key.sub" -> value, applied by the trainer

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"stage name must be a non-empty string, got {self.name!r}")
        if self.kind not in ("sft", "rl"):
            raise ValueError(f"stage {self.name!r}: kind must be 'sft' or 'rl', got {self.kind!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"stage {self.name!r}: steps must be an integer >= 1, got {self.steps!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(
                f"stage {self.name!r}: max_tokens must be an integer >= 1, got {self.max_tokens!r}"
            )
        if not isinstance(self.overrides, dict):
            kind = type(self.overrides).__name__
            raise TypeError(f"stage {self.name!r}: overrides must be a mapping, got {kind}")


@dataclass
class PipelineConfig:
    stages: list[StageConfig]

    def __post_init__(self) -> None:
        self.stages = [
            s if isinstance(s, StageConfig) else _stage_from_mapping(s, k) for k, s in enumerate(self.stages)
        ]
        if not self.stages:
            raise ValueError("a pipeline needs at least one stage")
        names = [s.name for s in self.stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stage names must be unique; repeated: {duplicates}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PipelineConfig:
        if "stages" not in data or not isinstance(data["stages"], list):
            raise ValueError("pipeline config needs a 'stages' list")
        return cls(stages=list(data["stages"]))

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_at(self, step: int) -> tuple[int, StageConfig, int]:
        """(stage index, stage, step within the stage) for a global step; the last stage holds past the end."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        start = 0
        for index, stage in enumerate(self.stages):
            if step < start + stage.steps:
                return index, stage, step - start
            start += stage.steps
        last = len(self.stages) - 1
        return last, self.stages[last], step - (start - self.stages[last].steps)


def _stage_from_mapping(data: Any, index: int) -> StageConfig:
    if not isinstance(data, Mapping):
        raise TypeError(f"stage {index} must be a mapping, got {type(data).__name__}")
    allowed = {"name", "kind", "steps", "max_tokens", "overrides"}
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"stage {index}: unknown keys {sorted(unknown)}; allowed {sorted(allowed)}")
    missing = sorted({"name", "kind", "steps", "max_tokens"} - set(data))
    if missing:
        raise ValueError(f"stage {index}: missing keys {missing}")
    return StageConfig(**data)
