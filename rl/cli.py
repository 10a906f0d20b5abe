"""`m2rl train`: the training job (defaults: configs/train.yaml — tiny policy, Python env, CISPO, CPU).

`m2rl train --nproc N ...` starts the same command under torchrun on N local ranks (a data-parallel learner,
docs/distributed.md); under torchrun, rank 0 trains and the other ranks serve its learner updates.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TRAIN_CONFIG = REPO_ROOT / "configs" / "train.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a policy with CISPO (default: tiny policy on m2rl/Python-v0)")
    train.add_argument("--config", default=str(DEFAULT_TRAIN_CONFIG), help="YAML config (default: configs/train.yaml)")
    train.add_argument("--help-config", action="store_true",
                       help="list every config key with its type, value and meaning, then exit (as `m2rl config show`)")
    train.add_argument("--nproc", type=int, default=1,
                       help="ranks on this machine: >1 relaunches the command under torchrun with a data-parallel "
                            "(FSDP2) learner, one GPU each with device=cuda (docs/distributed.md)")
    train.add_argument("overrides", nargs="*",
                       help="key.sub=value overrides, e.g. steps=10 learner.loss.kind=grpo; +key=value adds a key "
                            "the file does not set, ++key=value adds or overrides")
    train.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from m2rl.config import load_config
    from m2rl.rl.interrupts import TrainingInterrupted, stop_on_signals
    from m2rl.rl.pipeline import run_pipeline
    from m2rl.rl.trainer import TrainConfig, Trainer

    if args.help_config:
        from m2rl.cli import schema_text

        print(schema_text(TrainConfig, args.config, args.overrides), end="")
        return 0
    config = load_config(TrainConfig, args.config, args.overrides)
    from m2rl.config import ConfigError
    from m2rl.rl.distributed import launched_rank, under_torchrun

    if config.stages and (args.nproc > 1 or under_torchrun()):
        raise ConfigError("stages: a multi-stage pipeline runs in one process (no --nproc, no torchrun)")
    if args.nproc > 1 and not under_torchrun():
        return _launch_torchrun(args)
    if launched_rank() > 0:
        from m2rl.rl.learner_group import run_follower

        run_follower(config)  # rank 0 prints the summary
        return 0
    with stop_on_signals():
        try:
            if config.stages:
                summary = run_pipeline(config)
            else:
                trainer = Trainer(config)
                _report_resume(trainer)
                summary = trainer.train()
        except TrainingInterrupted as exc:
            _report_interrupt(exc, args, pipeline=bool(config.stages))
            return 128 + exc.signum  # the shell convention for "ended by this signal"
    print(json.dumps(summary, indent=2))
    return 0


def _launch_torchrun(args: argparse.Namespace) -> int:
    """This command again, as `--nproc` ranks of one torchrun job on this machine; its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "m2rl.cli", "train", "--config", args.config, *args.overrides]
    return subprocess.call(command)


def _report_resume(trainer: Any) -> None:
    from m2rl.cli import print_note

    report = trainer.resumed
    if report is None:
        return
    for path, reason in report.damaged:
        print_note(f"checkpoint {path} is damaged ({reason}); set aside as damaged-{path.name}", warning=True)
    if report.dropped_records:
        print_note(f"dropped {report.dropped_records} metrics records logged after step {report.step} "
                   "(the checkpoint does not cover them)", warning=True)
    print_note(f"resuming {trainer.run.directory} at step {report.step} from {report.checkpoint}")
    if report.changed:
        print_note(f"settings changed since {trainer.run.directory / 'config.yaml'}: {', '.join(report.changed)}",
                   warning=True)


def _report_interrupt(exc: Any, args: argparse.Namespace, pipeline: bool) -> None:
    from m2rl.cli import print_note
    from m2rl.config import override_key

    if pipeline:
        saved = f"; the stage's last step is in {exc.checkpoint}" if exc.checkpoint else ""
        print_note(f"interrupted by {exc}; a multi-stage pipeline cannot be resumed{saved}")
        return
    if exc.checkpoint is None:
        print_note(f"interrupted by {exc} before training started; nothing new was saved")
        return
    # The same command line, pointed at this run: other overrides kept, name/resume replaced.
    kept = [o for o in args.overrides if override_key(o) not in ("name", "resume")]
    config = [] if Path(args.config).resolve() == DEFAULT_TRAIN_CONFIG.resolve() else ["--config", args.config]
    command = shlex.join(["m2rl", "train", *config, *kept, f"name={exc.run_name}", "resume=true"])
    print_note(f"interrupted by {exc} after step {exc.step}; saved {exc.checkpoint}; resume with: {command}")
