"""The `m2rl` command line.

Subcommands are registered by `register(subparsers)` functions in `m2rl/<package>/cli.py` modules
so each package owns its commands. Errors the user can fix (bad config, missing component) print
one clear line and exit 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from m2rl import __version__
from m2rl.config import ConfigError, apply_overrides, read_yaml

# Packages that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = [
    "m2rl.rl.cli",         # train
    "m2rl.evaluation.cli",  # eval
    "m2rl.serving.cli",    # serve
    "m2rl.envs.cli",       # tasks
    "m2rl.sandboxes.cli",  # sandboxes, images
]

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "train.yaml"


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


def _cmd_version(args: argparse.Namespace) -> int:
    import torch

    print(f"m2rl {__version__} (python {sys.version.split()[0]}, torch {torch.__version__})")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from m2rl import doctor

    config_path = Path(args.config) if args.config else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    raw = read_yaml(config_path) if config_path else {}
    raw = apply_overrides(raw, args.overrides)
    required = doctor.required_components(raw)
    if args.require:
        extra = {name.strip() for name in args.require.split(",") if name.strip()}
        unknown = extra - set(doctor.CHECKS)
        if unknown:
            raise UserError(f"unknown component(s) {sorted(unknown)}; known: {sorted(doctor.CHECKS)}")
        required |= extra
    if config_path:
        print(f"configuration: {config_path}")
    return doctor.print_report(doctor.run_checks(), required)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2rl", description="Agentic RL for MiniMax-M2-style tool agents.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    version = sub.add_parser("version", help="print versions")
    version.set_defaults(func=_cmd_version)

    doctor = sub.add_parser("doctor", help="check that the real components work here")
    doctor.add_argument("--config", help="YAML config whose needs decide what is required (default: configs/train.yaml)")
    doctor.add_argument("--require", default="", help="comma-separated components that must work, e.g. docker,vllm")
    doctor.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    doctor.set_defaults(func=_cmd_doctor)

    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue  # that package has no commands (yet)
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UserError) as exc:
        print(f"m2rl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("m2rl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
