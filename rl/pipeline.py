"""The multi-stage training pipeline, config and runner: e.g. SFT short -> SFT long -> RL short -> RL long.

A TrainConfig with `stages:` is a pipeline (configs/pipeline.yaml). Each stage names its kind, its length
in optimizer steps, its maximum episode/sequence tokens, and overrides (dotted keys) of the base config.
`run_pipeline` walks the stages in order and hands the model from each stage to the next: an SFT stage
learns from scripted-expert demonstrations of the stage's env (collected through the real agent loop), an
RL stage runs the Trainer. Every stage writes its own run folder `runs/<name>-<stage>/`, and its model as a
Hugging Face directory in `runs/<name>-<stage>/final/` (loadable by transformers and `model.init`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from m2rl.agent.loop import LoopConfig
from m2rl.config import apply_overrides, from_dict, to_dict
from m2rl.rl.checkpoint import EXPORT_DIR, export_model
from m2rl.rl.preflight import check_config
from m2rl.runs import Run, default_run_name

if TYPE_CHECKING:
    from m2rl.rl.trainer import TrainConfig

StageKind = Literal["sft", "rl"]


@dataclass
class StageConfig:
    name: str
    """The stage's name; its run is `<pipeline name>-<stage name>`."""
    kind: StageKind
    """sft (imitate demonstrations) or rl (train on rewards)."""
    steps: int
    """Optimizer steps in this stage."""
    max_tokens: int
    """Maximum tokens of one episode (context length) in this stage."""
    overrides: dict[str, Any] = field(default_factory=dict)  # "key.sub" -> value, applied by `stage_config`

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
    """The stages on their own, with the global step -> stage arithmetic (`stage_at`)."""

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


# ---------------------------------------------------------------------------------------------- runner
# The runner needs the trainer, whose TrainConfig holds StageConfigs from this module, so the trainer is
# imported inside the functions below; so is SFT (gymnasium), which plain RL runs do not need.

def stage_config(base: TrainConfig, stage: StageConfig, name: str) -> TrainConfig:
    """The base config with the stage's overrides, its length and its context cap applied."""
    data = to_dict(dataclasses.replace(base, stages=[]))
    overrides = [f"{key}={json.dumps(value)}" for key, value in stage.overrides.items()]
    data = apply_overrides(data, overrides)
    data["name"] = f"{name}-{stage.name}"
    data["steps"] = stage.steps
    data["rollout"]["context"] = {"stages": [[0, stage.max_tokens]]}
    return from_dict(type(base), data, source=f"pipeline stage '{stage.name}'")


def run_sft_stage(config: TrainConfig, stage: StageConfig, model: torch.nn.Module,
                  tokenizer: Any) -> dict[str, Any]:
    """Collect the stage's expert demonstrations, train on them, and export the model to <run>/final/."""
    from m2rl.envs.experts import EXPERTS
    from m2rl.rl.sft import SFTConfig, collect_demonstrations, train_sft
    from m2rl.rl.trainer import make_env_factory, seed_everything, task_pool

    seed_everything(config.seed)
    make_env = make_env_factory(config.env, "train")
    probe = make_env()
    family = probe.unwrapped.task_set.family
    task_ids = task_pool(probe, "train", config.sft.demos, config.env.kinds)
    probe.close()
    if family not in EXPERTS:
        raise ValueError(f"no scripted expert for task family {family!r}; SFT stages support "
                         f"{sorted(EXPERTS)}")
    loop = LoopConfig(max_turns=config.env.max_steps, max_context_tokens=stage.max_tokens,
                      enable_thinking=config.env.enable_thinking)
    demos = asyncio.run(collect_demonstrations(make_env, EXPERTS[family], task_ids, tokenizer, loop,
                                               concurrency=config.rollout.num_envs))
    with Run.create(config.name, root=config.run_root, config=config, trackers=config.logging.trackers,
                    project=config.logging.project) as run:
        sft = SFTConfig(steps=stage.steps, batch_size=config.sft.batch_size, lr=config.sft.lr,
                        warmup_steps=config.sft.warmup_steps, seed=config.seed)
        losses = train_sft(model, demos, sft, pad_id=tokenizer.eos_id,
                           on_step=lambda step, loss: run.log_metrics(step + 1, {"sft/loss": loss}))
        export = export_model(model, run.directory / EXPORT_DIR, tokenizer)
        summary = {"stage": stage.name, "kind": "sft", "demonstrations": len(demos), "steps": stage.steps,
                   "final_loss": losses[-1], "run": str(run.directory), "model": str(export)}
        run.write_file("summary.json", json.dumps(summary, indent=2))
    return summary


def run_pipeline(config: TrainConfig) -> dict[str, Any]:
    """Run every stage of `config.stages` in order; the summary of each stage, in order."""
    from m2rl.rl.trainer import Trainer, build_model_and_tokenizer

    if not config.stages:
        raise ValueError("run_pipeline needs at least one stage in config.stages")
    check_config(config)  # the base config and every stage's run directory, before anything is built
    name = config.name or default_run_name("pipeline", config.run_root)
    # bad overrides fail here, before any stage runs
    stages = [(stage, stage_config(config, stage, name)) for stage in config.stages]
    torch.set_num_threads(max(1, config.threads))
    model, tokenizer = build_model_and_tokenizer(config.model, config.device)
    summaries = []
    for stage, current in stages:
        if stage.kind == "sft":
            summaries.append(run_sft_stage(current, stage, model, tokenizer))
        else:
            trainer = Trainer(current, model=model, tokenizer=tokenizer)
            summaries.append({"stage": stage.name, "kind": "rl", **trainer.train()})
            model = trainer.model
    return {"pipeline": name, "stages": summaries}
