"""`m2rl train`: the training job (defaults: configs/train.yaml — tiny policy, Python env, CISPO, CPU)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TRAIN_CONFIG = REPO_ROOT / "configs" / "train.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a policy with CISPO (default: tiny policy on m2rl/Python-v0)")
    train.add_argument("--config", default=str(DEFAULT_TRAIN_CONFIG), help="YAML config (default: configs/train.yaml)")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. steps=10 learner.loss.name=grpo")
    train.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from m2rl.config import load_config
    from m2rl.rl.stages import run_pipeline
    from m2rl.rl.trainer import TrainConfig, Trainer

    from m2rl.cli import UserError
    from m2rl.model import CheckpointError

    config = load_config(TrainConfig, args.config, args.overrides)
    try:
        summary = run_pipeline(config) if config.stages else Trainer(config).train()
    except (FileNotFoundError, CheckpointError) as exc:  # a wrong path is the user's to fix
        raise UserError(str(exc)) from exc
    print(json.dumps(summary, indent=2))
    return 0
