"""CLI: `m2rl tasks list|show|sample` -- inspect the seeded task families without running an episode."""

from __future__ import annotations

import argparse
import json
import random
from typing import Any

# Tasks are generated one by one: a count beyond this takes minutes and prints more than anyone reads.
MAX_COUNT = 10_000


def register(subparsers: argparse._SubParsersAction) -> None:
    tasks = subparsers.add_parser("tasks", help="list, show and sample environment tasks")
    sub = tasks.add_subparsers(dest="tasks_command", required=True)

    ls = sub.add_parser("list", help="task families and kinds, or the first tasks of one family and split")
    ls.add_argument("--family", help="shell | python | browser | mcp (omit to list the families)")
    ls.add_argument("--split", default="test", choices=["train", "test"])
    ls.add_argument("--count", type=int, default=10, help=f"how many tasks to list (default 10, at most {MAX_COUNT})")
    ls.set_defaults(func=cmd_list)

    show = sub.add_parser("show", help="one task by id (family/kind/seed), with its hidden answer or checker")
    show.add_argument("task_id")
    show.add_argument("--json", action="store_true", help="print the task as JSON")
    show.set_defaults(func=cmd_show)

    sample = sub.add_parser("sample", help="draw tasks the way env.reset() does, from a seed")
    sample.add_argument("--family", required=True)
    sample.add_argument("--split", default="train", choices=["train", "test"])
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("-n", "--count", type=int, default=5, help=f"how many tasks to draw (1 to {MAX_COUNT})")
    sample.add_argument("--kinds", default="", help="comma-separated kinds to restrict to")
    sample.set_defaults(func=cmd_sample)


def _task_set(family: str) -> Any:
    from m2rl.envs.tasks import get_task_set

    return get_task_set(family)


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
    if not args.family:
        for family in TASK_SETS:
            try:
                kinds = ", ".join(_task_set(family).kinds)
            except Exception as exc:  # a family whose dependencies are missing still gets a line
                kinds = f"(unavailable: {exc})"
            print(f"{family:8s} {kinds}")
        return 0
    try:
        task_set = _task_set(args.family)
    except KeyError as exc:
        return _fail(str(exc.args[0]))
    for task in task_set.tasks(args.split, args.count):
        print(f"{task.id:32s} {_first_line(task.prompt)}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from m2rl.envs.tasks import family_of

    try:
        task = _task_set(family_of(args.task_id)).get(args.task_id)
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
        task_set = _task_set(args.family)
        kinds = tuple(k for k in args.kinds.split(",") if k) or None
        rng = random.Random(args.seed)
        tasks = [task_set.sample(args.split, rng, kinds=kinds) for _ in range(args.count)]
    except (KeyError, ValueError) as exc:
        return _fail(str(exc.args[0]) if exc.args else str(exc))
    for task in tasks:
        print(f"{task.id:32s} {_first_line(task.prompt)}")
    return 0
