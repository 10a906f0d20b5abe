"""The `m2rl` command line.

Subcommands are registered by `register(subparsers)` functions in the modules of `COMMAND_MODULES`
(`<package>/cli.py`, or the module a command runs) so each package owns its commands. Every error is one
line `m2rl: error: <message>` on stderr, printed by `print_error` here (the one place that prefix is
written): errors the user can fix (bad config, bad files, a run name in use, bad arguments) exit 2,
anything unexpected exits 1. `--debug` (anywhere on the command line) or M2RL_DEBUG=1 also prints the
traceback.

Logging: every module logs to `logging.getLogger(__name__)`, under the `m2rl` logger; `console_logging`
attaches the console handler there (a run adds its run.log handler there too, see m2rl.runs). The console
shows warnings and errors as one line each (`m2rl: warning: ...`), tracebacks only with --debug; records of
`m2rl.runs` (the run's own notes: resumed, interrupted, failed) go to run.log only, because the command
reports those itself.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

from m2rl import __version__
from m2rl.config import apply_overrides, format_schema, load_config, read_yaml

# Packages that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = [
    "m2rl.rl.cli",         # train
    "m2rl.rl.warm_start",  # warm-start
    "m2rl.envs.cli",       # tasks
    "m2rl.sandboxes.cli",  # sandboxes, images
    "m2rl.model.serving.cli",  # serve
    "m2rl.evaluation.cli",  # eval
]

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "train.yaml"


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


# Error types of the packages whose messages are written for the user (they name the key, file or
# option): exit 2. Looked up in sys.modules so that `m2rl tasks` does not import torch to classify errors.
_USER_ERROR_TYPES = [
    ("m2rl.config", "ConfigError"),
    ("m2rl.runs", "RunError"),
    ("m2rl.model.checkpoint", "CheckpointError"),
    ("m2rl.model.config", "M2ConfigError"),
    ("m2rl.sandboxes.errors", "SandboxError"),
    ("m2rl.agent.vllm_server", "VLLMServerError"),  # a launched generator died: its log tail says why
    ("m2rl.rl.m2rl_server", "M2RLServerError"),  # a launched m2rl serve died: its log tail says why
    ("m2rl.rl.weight_sync", "SyncRejected"),  # the generator failed the parity probe after a weight sync
    ("m2rl.rl.weight_sync", "WeightTransferError"),  # the generator refused an update: its reason
    ("m2rl.envs.swe.instances", "InstanceError"),
    ("m2rl.envs.swe.factory.sources", "LibraryError"),
    ("m2rl.evaluation.spec", "SpecError"),  # a --policy that cannot be used: a path, an endpoint, a model
    ("m2rl.evaluation.runner", "EvalError"),  # an env, task or run directory an eval cannot use
    ("m2rl.evaluation.runner", "EvalStopped"),  # the policy's server stopped answering: rerun to continue
]


def one_line(message: object) -> str:
    """The message with its line breaks folded, so an error is always exactly one line."""
    return " ".join(str(message).split())


def print_error(message: object) -> int:
    """Print `m2rl: error: <message>` (one line) on stderr; return the exit status for a user error."""
    print(f"m2rl: error: {one_line(message)}", file=sys.stderr)
    return 2


def print_note(message: object, warning: bool = False) -> None:
    """A one-line status (`m2rl: ...`) or warning (`m2rl: warning: ...`) on stderr; stdout stays for results."""
    print(f"m2rl: {'warning: ' if warning else ''}{one_line(message)}", file=sys.stderr)


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, (UserError, OSError)):  # OSError: a path, a permission, a full disk
        return True
    for module_name, class_name in _USER_ERROR_TYPES:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


class _ConsoleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Warnings and errors of the m2rl tree on stderr, one line each; the traceback only with --debug."""

    def __init__(self, debug: bool) -> None:
        super().__init__(sys.stderr)
        self.debug = debug
        self.setLevel(logging.WARNING)
        self.addFilter(lambda record: not record.name.startswith("m2rl.runs"))

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(sys.stderr)  # the stream of now (pytest's capture replaces sys.stderr per test)
        super().emit(record)

    def format(self, record: logging.LogRecord) -> str:
        line = f"m2rl: {record.levelname.lower()}: {one_line(record.getMessage())}"
        if self.debug and record.exc_info:
            line += "\n" + logging.Formatter().formatException(record.exc_info)
        return line


@contextmanager
def console_logging(debug: bool = False) -> Iterator[None]:
    """The entry point's logging, for the length of one command: level INFO (DEBUG with --debug) for the
    `m2rl` tree and the console handler on the `m2rl` logger; both undone afterwards, so calling `main`
    in-process (tests) leaves no handler behind."""
    tree = logging.getLogger("m2rl")
    level, handler = tree.level, _ConsoleHandler(debug)
    tree.setLevel(logging.DEBUG if debug else logging.INFO)
    tree.addHandler(handler)
    try:
        yield
    finally:
        tree.removeHandler(handler)
        tree.setLevel(level)


class _Parser(argparse.ArgumentParser):
    """argparse with the one error format (argparse prints a usage block and `m2rl train: error:`)."""

    def error(self, message: str) -> NoReturn:
        print_error(f"{message} (see `{self.prog} --help`)")
        sys.exit(2)


def _cmd_version(args: argparse.Namespace) -> int:
    import torch

    print(f"m2rl {__version__} (python {sys.version.split()[0]}, torch {torch.__version__})")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from m2rl import doctor

    config_path = Path(args.config) if args.config else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    raw = read_yaml(config_path) if config_path else {}
    raw = apply_overrides(raw, args.overrides, str(config_path) if config_path else None)
    source = f"{config_path or 'defaults'}" + (" + command-line overrides" if args.overrides else "")
    problems = doctor.config_problems(raw, source)
    required = doctor.required_components(raw)
    if args.require:
        extra = {name.strip() for name in args.require.split(",") if name.strip()}
        unknown = extra - set(doctor.CHECKS)
        if unknown:
            raise UserError(f"unknown component(s) {sorted(unknown)}; known: {sorted(doctor.CHECKS)}")
        required |= extra
    if config_path:
        print(f"configuration: {config_path}")
    for problem in problems:  # plain print: rich would wrap them and read their [brackets] as markup
        print(f"configuration problem: {problem}")
    code = doctor.print_report(doctor.run_checks(), required)
    return 1 if problems else code


def _cmd_config_show(args: argparse.Namespace) -> int:
    from m2rl.rl.trainer import TrainConfig

    print(schema_text(TrainConfig, args.config, args.overrides), end="")
    return 0


def schema_text(cls: type, config_path: str | None, overrides: list[str]) -> str:
    """Every key of `cls` with type, value (from the file and overrides when given) and meaning."""
    path = Path(config_path) if config_path else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    config = load_config(cls, path, overrides)
    header = f"# {cls.__name__} keys, values from {path or 'the defaults'}{' + overrides' if overrides else ''}\n"
    return header + format_schema(cls, config)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="m2rl", description="Agentic RL for MiniMax-M2-style tool agents.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also M2RL_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    version = sub.add_parser("version", help="print versions")
    version.set_defaults(func=_cmd_version)

    doctor = sub.add_parser("doctor", help="check that the real components work here")
    doctor.add_argument("--config", help="YAML config whose needs decide what is required (default: configs/train.yaml)")
    doctor.add_argument("--require", default="", help="comma-separated components that must work, e.g. docker,vllm")
    doctor.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    doctor.set_defaults(func=_cmd_doctor)

    config = sub.add_parser("config", help="list the configuration keys with type, value and meaning")
    config_sub = config.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    config_sub.required = True
    show = config_sub.add_parser(
        "show", help="every key of the train config: type, value (default alongside when different), meaning",
        description="Overrides: key.sub=value sets a key; +key.sub=value adds a key the file does not set "
                    "(an error if it does); ++key.sub=value adds or overrides. A key not in the schema is an error.")
    show.add_argument("--config", help="YAML config whose values are shown (default: configs/train.yaml)")
    show.add_argument("overrides", nargs="*", help="key.sub=value, +key.sub=value or ++key.sub=value overrides")
    show.set_defaults(func=_cmd_config_show)

    for module_name in COMMAND_MODULES:  # each must exist: a listed module that is missing is an error
        importlib.import_module(module_name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere (`m2rl train --debug steps=2`), not only before the command.
    debug = "--debug" in argv or os.environ.get("M2RL_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    args = build_parser().parse_args(argv)
    try:
        with console_logging(debug):
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print_note("interrupted")
        return 130
    except Exception as exc:
        if debug:
            traceback.print_exc()
        if _is_user_error(exc):
            return print_error(exc)
        print_error(f"unexpected {type(exc).__name__}: {exc} (run with --debug or M2RL_DEBUG=1 for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
