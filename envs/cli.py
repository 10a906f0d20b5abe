"""CLI: `m2rl tasks list|show|sample` -- inspect the seeded task families without running an episode (and
`m2rl tasks build|validate|images`, the SWE task factory: envs/swe/factory/cli.py).

Tasks come from a built-in family (`--family python`) or from any env's own task set (`--env ID`, where ID is
a registered id such as `m2rl/Shell-v0`, or `module:ID`, whose module is imported first so a custom env
registers itself). The env is made with `gymnasium.make` and closed again; no sandbox starts before reset.
"""

from __future__ import annotations

import argparse
import json
import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from m2rl.envs.tasks.base import TaskSet

# Tasks are generated one by one: a count beyond this takes minutes and prints more than anyone reads.
MAX_COUNT = 10_000
ENV_HELP = ("a registered env id (m2rl/Shell-v0) or module:ID for a custom env "
            "(m2rl.envs.examples.json_fixer:m2rl/JsonFixer-v0)")


def register(subparsers: argparse._SubParsersAction) -> None:
    tasks = subparsers.add_parser("tasks", help="list, show and sample environment tasks")
    sub = tasks.add_subparsers(dest="tasks_command", required=True)

    ls = sub.add_parser("list", help="task families and kinds, or the first tasks of a family or env")
    source = ls.add_mutually_exclusive_group()
    source.add_argument("--family", help="shell | python | browser | mcp (omit both to list the families)")
    source.add_argument("--env", help=ENV_HELP)
    ls.add_argument("--split", default="test", choices=["train", "test"])
    ls.add_argument("--count", type=int, default=10, help=f"how many tasks to list (default 10, at most {MAX_COUNT})")
    ls.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="one task by id (family/kind/seed), with its hidden answer or checker")
    show.add_argument("task_id")
    show.add_argument("--env", help=ENV_HELP + " (needed for a family that is not built in)")
    show.add_argument("--json", action="store_true", help="print the task as JSON")
    show.set_defaults(func=cmd_show)

    sample = sub.add_parser("sample", help="draw tasks the way env.reset() does, from a seed")
    source = sample.add_mutually_exclusive_group(required=True)
    source.add_argument("--family")
    source.add_argument("--env", help=ENV_HELP)
    sample.add_argument("--split", default="train", choices=["train", "test"])
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("-n", "--count", type=int, default=5, help=f"how many tasks to draw (1 to {MAX_COUNT})")
    sample.add_argument("--kinds", default="", help="comma-separated kinds to restrict to")
    sample.set_defaults(func=cmd_sample)

    from m2rl.envs.swe.factory.cli import register as register_swe_factory

    register_swe_factory(sub)  # build | validate | images: SWE-bench tasks from PyPI libraries


def _task_set(family: str) -> TaskSet:
    from m2rl.envs.tasks import get_task_set

    try:
        return get_task_set(family)
    except KeyError as exc:  # a custom env's family is not built in: say how to reach it
        raise KeyError(f"{exc.args[0]} (the tasks of another env: --env module:ID)") from None


def env_task_set(env_id: str) -> TaskSet:
    """The task set an env draws its tasks from (`env.unwrapped.task_set`); KeyError with a one-line reason.

    ToolEnv has no method of its own that lists task ids, so this reads its task set, the same one the
    trainer lists its tasks from.
    """
    import gymnasium
    from m2rl.envs import registered_ids
    from m2rl.envs.tasks.base import TaskSet

    try:
        env = gymnasium.make(env_id)
    except (gymnasium.error.Error, ImportError) as exc:
        raise KeyError(f"unknown env {env_id!r} ({exc}); m2rl envs: {', '.join(registered_ids())}") from None
    try:
        task_set = getattr(env.unwrapped, "task_set", None)
    finally:
        env.close()
    if not isinstance(task_set, TaskSet):
        raise KeyError(f"env {env_id!r} has no task set (env.unwrapped.task_set): it is not an m2rl tool env")
    return task_set


def _source(args: argparse.Namespace) -> TaskSet:
    return env_task_set(args.env) if args.env else _task_set(args.family)


def _fail(message: str) -> int:
    from m2rl.cli import print_error

    return print_error(message)


def _first_line(text: str, width: int = 100) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 3] + "..."


def cmd_list(args: argparse.Namespace) -> int:
    from m2rl.envs.tasks import TASK_SETS

    if not 0 <= args.count <= MAX_COUNT:
        return _fail(f"--count must be between 0 and {MAX_COUNT}, got {args.count}")
    if not args.family and not args.env:
        for family in TASK_SETS:
            try:
                kinds = ", ".join(_task_set(family).kinds)
            except Exception as exc:  # a family whose dependencies are missing still gets a line
                kinds = f"(unavailable: {exc})"
            print(f"{family:8s} {kinds}")
        from m2rl.envs import registered_ids

        print(f"envs: {', '.join(registered_ids())} (--env ID, or --env module:ID for a custom env)")
        return 0
    try:
        task_set = _source(args)
    except KeyError as exc:
        return _fail(str(exc.args[0]))
    for task in task_set.tasks(args.split, args.count):
        print(f"{task.id:32s} {_first_line(task.prompt)}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from m2rl.envs.tasks import family_of

    try:
        task_set = env_task_set(args.env) if args.env else _task_set(family_of(args.task_id))
        task = task_set.get(args.task_id)
    except KeyError as exc:
        return _fail(str(exc.args[0]))
    if args.json:
        print(
            json.dumps(
                {
                    "id": task.id,
                    "family": task.family,
                    "kind": task.kind,
                    "seed": task.seed,
                    "split": task.split,
                    "prompt": task.prompt,
                    "answer": task.answer,
                    "files": task.files,
                    "checker": task.checker,
                    "meta": task.meta,
                },
                indent=2,
                default=str,
            )
        )
        return 0
    print(f"id:     {task.id}\nsplit:  {task.split}\nprompt: {task.prompt}")
    if task.answer is not None:
        print(f"answer: {task.answer}")
    for path, content in task.files.items():
        print(f"file {path} ({len(content)} chars): {_first_line(content, 70)}")
    if task.checker is not None:
        print("graded by a checker script run in the sandbox after the episode")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    if not 1 <= args.count <= MAX_COUNT:
        return _fail(f"-n/--count must be between 1 and {MAX_COUNT}, got {args.count}")
    try:
        task_set = _source(args)
        kinds = tuple(k for k in args.kinds.split(",") if k) or None
        rng = random.Random(args.seed)
        tasks = [task_set.sample(args.split, rng, kinds=kinds) for _ in range(args.count)]
    except (KeyError, ValueError) as exc:
        return _fail(str(exc.args[0]) if exc.args else str(exc))
    for task in tasks:
        print(f"{task.id:32s} {_first_line(task.prompt)}")
    return 0
