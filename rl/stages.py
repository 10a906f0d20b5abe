"""Run a multi-stage pipeline from one config: e.g. SFT short -> SFT long -> RL short -> RL long.

Each stage applies its `overrides` (dotted keys) to the base TrainConfig, trains for `steps`, caps
episodes at `max_tokens`, and hands its model to the next stage. SFT stages learn from scripted-expert
demonstrations of the stage's env (collected through the real agent loop); RL stages run the Trainer.
Every stage writes its own run folder `runs/<name>-<stage>/`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import torch

from m2rl.agent.loop import LoopConfig
from m2rl.config import apply_overrides, from_dict, to_dict
from m2rl.rl.pipeline import StageConfig
from m2rl.rl.preflight import check_config
from m2rl.rl.sft import SFTConfig, collect_demonstrations, train_sft
from m2rl.rl.trainer import (
    TrainConfig,
    Trainer,
    build_model_and_tokenizer,
    make_env_factory,
    seed_everything,
    task_pool,
)
from m2rl.runs import Run, default_run_name


def stage_config(base: TrainConfig, stage: StageConfig, name: str) -> TrainConfig:
    """The base config with the stage's overrides, its length and its context cap applied."""
    data = to_dict(dataclasses.replace(base, stages=[]))
    overrides = [f"{key}={json.dumps(value)}" for key, value in stage.overrides.items()]
    data = apply_overrides(data, overrides)
    data["name"] = f"{name}-{stage.name}"
    data["steps"] = stage.steps
    data["rollout"]["context"] = {"stages": [[0, stage.max_tokens]]}
    return from_dict(TrainConfig, data, source=f"pipeline stage '{stage.name}'")


def run_sft_stage(config: TrainConfig, stage: StageConfig, model: torch.nn.Module,
                  tokenizer: Any) -> dict[str, Any]:
    from m2rl.envs.experts import EXPERTS

    seed_everything(config.seed)
    make_env = make_env_factory(config.env, "train")
    probe = make_env()
    family = probe.unwrapped.task_set.family
    task_ids = task_pool(probe, "train", config.sft.demos, config.env.kinds)
    probe.close()
    if family not in EXPERTS:
        raise ValueError(f"no scripted expert for task family {family!r}; SFT stages support {sorted(EXPERTS)}")
    loop = LoopConfig(max_turns=config.env.max_steps, max_context_tokens=stage.max_tokens,
                      enable_thinking=config.env.enable_thinking)
    demos = asyncio.run(collect_demonstrations(make_env, EXPERTS[family], task_ids, tokenizer, loop,
                                               concurrency=config.rollout.num_envs))
    with Run.create(config.name, root=config.run_root, config=config) as run:
        sft = SFTConfig(steps=stage.steps, batch_size=config.sft.batch_size, lr=config.sft.lr,
                        warmup_steps=config.sft.warmup_steps, seed=config.seed)
        losses = train_sft(model, demos, sft, pad_id=tokenizer.eos_id,
                           on_step=lambda step, loss: run.log_metrics(step + 1, {"sft/loss": loss}))
        summary = {"stage": stage.name, "kind": "sft", "demonstrations": len(demos), "steps": stage.steps,
                   "final_loss": losses[-1], "run": str(run.directory)}
        run.write_file("summary.json", json.dumps(summary, indent=2))
    return summary


def run_pipeline(config: TrainConfig) -> dict[str, Any]:
    if not config.stages:
        raise ValueError("run_pipeline needs at least one stage in config.stages")
    check_config(config)  # the base config and every stage's run directory, before anything is built
    name = config.name or default_run_name("pipeline", config.run_root)
    stages = [(stage, stage_config(config, stage, name)) for stage in config.stages]  # bad overrides fail here
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
