"""`m2rl eval`: score a policy on an env's tasks (evaluation/runner.py), and `m2rl eval compare RUN_A RUN_B`.

    m2rl eval --env m2rl/Python-v0 --policy local:runs/X --tasks 64 --samples 4 --name x-test
    m2rl eval --env m2rl/SWE-v0 --policy openai:http://127.0.0.1:8000/v1#MODEL --parallel 8 max_steps=30
    m2rl eval compare x-test y-test

Trailing key=value arguments are the env's constructor options (like env.options in training). `compare` is
the first of them when it is the word `compare`: argparse cannot mix a sub-command with free key=value
arguments, so the eval parser takes both and this module tells them apart.
"""

from __future__ import annotations

import argparse
import json
import shlex
from typing import Any

COMPARE = "compare"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="score a policy on an env's tasks: results, report, plots, viewer (`eval compare A B`: two runs)",
        description="Run --policy on the tasks of --env, K samples each, resumably (rerun with the same --name "
                    "to continue) and deterministically (the seed of an episode is a hash of its task, its sample "
                    "and --seed). Outputs under runs/<name>/. `m2rl eval compare RUN_A RUN_B` compares two evals "
                    "task by task with paired significance tests.")
    p.add_argument("--env", help="env id: m2rl/Python-v0, m2rl/Shell-v0, m2rl/SWE-v0, ... or module:ID")
    p.add_argument("--policy", help="local:PATH | vllm:PATH | openai:BASE_URL[#MODEL] | scripted:NAME "
                                    "(NAME: expert, wrong, ... of the env's task family)")
    p.add_argument("--split", default="test", help="task split (default: test)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tasks", type=int, default=None, help="the first N tasks of the split (default: 32)")
    which.add_argument("--task-ids", nargs="+", default=[], metavar="ID", help="exactly these tasks")
    p.add_argument("--samples", type=int, default=1, help="episodes per task, K (pass@1..K is reported)")
    p.add_argument("--parallel", type=int, default=4, help="episodes at once")
    p.add_argument("--name", default="", help="run name (runs/<name>/); an existing eval of that name is resumed")
    p.add_argument("--run-root", default="runs", help="folder of the run directories (default: runs)")
    p.add_argument("--seed", type=int, default=0, help="eval seed (default: 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0: greedy (default: 1)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1, off)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="tokens per turn (default: 512)")
    p.add_argument("--max-turns", type=int, default=None, help="turns per episode (default: the env's max_steps)")
    p.add_argument("--max-context", type=int, default=32768, help="context tokens per episode, also capped by the "
                                                                  "model's (default: 32768)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds per episode (default: none)")
    p.add_argument("--mode", choices=("auto", "token", "chat"), default="auto",
                   help="openai: token ids in and out, chat with native tool calls, or auto (probe; default)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (or its folder) when the served model's own "
                                                     "is not on this machine (default: the model's, else tiny)")
    p.add_argument("--device", default="cpu", help="torch device of a local: policy (default: cpu)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads torch may use (default: its own choice)")
    p.add_argument("--price-in", type=float, default=None, help="USD per 1M input tokens (for the report's cost)")
    p.add_argument("--price-out", type=float, default=None, help="USD per 1M sampled tokens")
    p.add_argument("--retry-errors", action="store_true", help="rerun the failed episodes of a resumed eval")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("options", nargs="*", metavar="key=value",
                   help="env constructor options as KEY=VALUE (max_steps, backend, tool_timeout_s, ...), like "
                        "env.options in training; or: compare RUN_A RUN_B")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from m2rl.cli import UserError

    if args.options and args.options[0] == COMPARE:
        return cmd_compare(args.options[1:], args.run_root)
    if not args.env or not args.policy:
        raise UserError("m2rl eval needs --env ID and --policy SPEC (see `m2rl eval --help`)")
    return run(args)


def eval_config(args: argparse.Namespace) -> Any:
    """The EvalConfig of the command line; key=value options parsed as YAML values, dotted keys nested."""
    from m2rl.config import apply_overrides
    from m2rl.evaluation.runner import DEFAULT_TASKS, EvalConfig

    return EvalConfig(
        env=args.env, policy=args.policy, split=args.split, tasks=args.tasks or DEFAULT_TASKS,
        task_ids=list(args.task_ids), samples=args.samples, parallel=args.parallel, name=args.name,
        run_root=args.run_root, seed=args.seed, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, max_turns=args.max_turns, max_context_tokens=args.max_context,
        time_limit_s=args.time_limit, env_options=apply_overrides({}, args.options, "the env options"),
        mode=args.mode, tokenizer=args.tokenizer, device=args.device, threads=args.threads,
        price_in=args.price_in, price_out=args.price_out, retry_errors=args.retry_errors,
        show_progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    from m2rl.cli import print_note
    from m2rl.evaluation.report import REPORT_FILE
    from m2rl.rl.interrupts import TrainingInterrupted, stop_on_signals

    config = eval_config(args)
    if not config.name:  # name it now, so an interrupted eval can say how to resume it
        from m2rl.runs import default_run_name

        config.name = default_run_name("eval", config.run_root)
    with stop_on_signals():
        try:
            from m2rl.evaluation.runner import run_eval

            outcome = run_eval(config)
        except TrainingInterrupted as exc:
            print_note(f"interrupted by {exc}; finished episodes are kept in {config.run_root}/{config.name}/; "
                       f"resume with: {resume_command(config)}")
            return 128 + exc.signum
    s = outcome.summary
    lo, hi = s["resolved_rate_ci95"]
    print_note(f"{outcome.ran} episodes run, {len(outcome.records) - outcome.ran} were finished before; report "
               f"{outcome.directory / REPORT_FILE}")
    print(json.dumps({"name": config.name, "episodes": s["episodes"], "resolved": s["resolved"],
                      "resolved_rate": s["resolved_rate"], "ci95": [lo, hi], "pass_at_k": s["pass_at_k"],
                      "directory": str(outcome.directory)}))
    return 0


def resume_command(config: Any) -> str:
    """The command line that continues `config`'s eval: its settings, its name."""
    from m2rl.evaluation.runner import DEFAULT_TASKS, EvalConfig

    defaults = EvalConfig(env=config.env, policy=config.policy)
    argv = ["m2rl", "eval", "--env", config.env, "--policy", config.policy, "--name", config.name]
    flags = {"split": "--split", "samples": "--samples", "seed": "--seed", "temperature": "--temperature",
             "top_p": "--top-p", "max_new_tokens": "--max-new-tokens", "max_turns": "--max-turns",
             "max_context_tokens": "--max-context", "time_limit_s": "--time-limit", "mode": "--mode",
             "tokenizer": "--tokenizer", "parallel": "--parallel", "run_root": "--run-root", "device": "--device"}
    for key, flag in flags.items():
        if getattr(config, key) != getattr(defaults, key):
            argv += [flag, str(getattr(config, key))]
    if config.task_ids:
        argv += ["--task-ids", *config.task_ids]
    elif config.tasks != DEFAULT_TASKS:
        argv += ["--tasks", str(config.tasks)]
    argv += [f"{key}={json.dumps(value)}" for key, value in config.env_options.items()]
    return shlex.join(argv)


def cmd_compare(runs: list[str], run_root: str) -> int:
    from m2rl.cli import UserError
    from m2rl.evaluation.compare import compare_runs, comparison_markdown

    if len(runs) != 2:
        raise UserError(f"m2rl eval compare takes two runs (names under {run_root}/ or paths), got {len(runs)}")
    print(comparison_markdown(compare_runs(runs[0], runs[1], run_root)), end="")
    return 0
