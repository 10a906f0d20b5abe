"""CLI: `m2rl tasks build | validate | images` -- make SWE-bench tasks from PyPI libraries and check them.

    m2rl tasks build --library tinydb --library boltons==25.0.0 --out tasks/mine --max-per-library 30
    m2rl tasks validate tasks/mine            # gold resolves, empty does not, two runs agree
    m2rl tasks images tasks/mine              # (re)build a task directory's images from its recipes

Heavy modules (docker, swebench) load inside the commands, so registering them costs nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    build = sub.add_parser("build", help="make SWE-bench tasks from PyPI libraries (AST bug injection)")
    build.add_argument("--library", action="append", required=True, metavar="NAME[==VERSION]",
                       help="a PyPI library whose sdist includes its tests (repeat for more)")
    build.add_argument("--out", required=True, type=Path, help="task directory to write (instances.jsonl, images.json)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--max-per-library", type=int, default=40, help="valid instances kept per library")
    build.add_argument("--candidates-per-library", type=int, default=0,
                       help="mutations tried per library (default 4 x --max-per-library)")
    build.add_argument("--test-library", action="append", default=[], metavar="NAME",
                       help="hold this library out as the test split (default: ~20%% chosen by the seed)")
    build.add_argument("--workers", type=int, default=2, help="libraries built at once")
    build.add_argument("--test-timeout", type=float, default=120.0,
                       help="seconds per baseline suite run (a mutated run gets 5x the baseline time, at least 20 s)")
    build.set_defaults(func=cmd_build)

    validate = sub.add_parser("validate", help="grade every instance's gold and empty patch; print a table")
    validate.add_argument("task_dir", type=Path, help="a task directory or an instances file")
    validate.add_argument("--runs", type=int, default=2, help="gradings of each patch (they must agree)")
    validate.add_argument("--count", type=int, default=None, help="only the first N instances")
    validate.add_argument("--ids", default="", help="comma-separated instance ids")
    validate.add_argument("--workers", type=int, default=2, help="instances graded at once")
    validate.add_argument("--prune", action="store_true",
                          help="rewrite the task directory without the instances that failed (the dropped ones are "
                               "listed in validation.json): the last step of building a set")
    validate.set_defaults(func=cmd_validate)

    images = sub.add_parser("images", help="build a task directory's missing images from its recipes")
    images.add_argument("task_dir", type=Path)
    images.set_defaults(func=cmd_images)


def _fail(message: str) -> int:
    from m2rl.cli import print_error

    return print_error(message)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for h in headers:
        table.add_column(h, justify="left" if h in ("library", "instance") else "right")
    for row in rows:
        table.add_row(*[str(c) for c in row])
    Console(width=160).print(table)


def cmd_build(args: argparse.Namespace) -> int:
    from m2rl.envs.swe.factory.build import FactoryConfig, build_tasks

    if args.max_per_library < 1 or args.workers < 1:
        return _fail("--max-per-library and --workers must be at least 1")
    config = FactoryConfig(libraries=tuple(args.library), out=args.out, seed=args.seed,
                           max_per_library=args.max_per_library, candidates_per_library=args.candidates_per_library,
                           test_libraries=tuple(args.test_library), workers=args.workers,
                           test_timeout_s=args.test_timeout)

    def progress(r: Any) -> None:
        state = f"error: {r.error[:120]}" if r.error else f"{r.valid} instances from {r.candidates} candidates"
        print(f"[tasks build] {r.library} {r.version}: {state} ({r.seconds:.0f} s)", flush=True)

    report = build_tasks(config, progress)
    rows = [(r.library, r.version, r.split, r.baseline_tests, r.candidates, r.failing, r.flaky, r.leaking, r.valid,
             f"{100 * r.validity:.0f}%", f"{r.seconds:.0f}", r.error[:40]) for r in report.libraries]
    _table(["library", "version", "split", "tests", "tried", "breaking", "flaky", "leaking", "valid", "valid %",
            "seconds", "error"], rows, f"{report.instances} instances in {report.seconds / 60:.1f} min -> {report.out}")
    if report.instances == 0:
        return _fail("no instance was built; see the errors above")
    return 0


@dataclass
class InstanceCheck:
    instance_id: str
    library: str
    gold: list[bool] = field(default_factory=list)
    empty: list[bool] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and all(self.gold) and not any(self.empty)

    @property
    def agree(self) -> bool:
        return len(set(self.gold)) <= 1 and len(set(self.empty)) <= 1


def validate_instances(source: Path, runs: int = 2, count: int | None = None, ids: Sequence[str] | None = None,
                       workers: int = 2) -> list[InstanceCheck]:
    """Grade each instance's gold patch and the empty patch `runs` times, through the env's own grading."""
    from m2rl.envs.swe.env import make_swe_env
    from m2rl.envs.swe.instances import load_instances

    instances = load_instances(source, ids=ids or None, count=count)
    envs = [make_swe_env(source, ids=[i.instance_id for i in instances]) for _ in range(max(1, workers))]
    free = list(envs)

    def check(inst: Any) -> InstanceCheck:
        env = free.pop()
        result = InstanceCheck(inst.instance_id, inst.repo.split("/")[-1])
        try:
            for _ in range(runs):
                for patch, verdicts in ((inst.patch, result.gold), ("", result.empty)):
                    t0 = time.monotonic()
                    verdicts.append(env.task_set.grade_patch(inst, patch).resolved)
                    result.seconds.append(time.monotonic() - t0)
        except Exception as exc:  # noqa: BLE001  one broken instance is a row of the table, not a crash
            result.error = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            free.append(env)
        return result

    try:
        with ThreadPoolExecutor(max_workers=len(envs)) as pool:
            return list(pool.map(check, instances))
    finally:
        for env in envs:
            env.close()


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def cmd_validate(args: argparse.Namespace) -> int:
    from m2rl.envs.swe.instances import InstanceError

    if args.runs < 1 or args.workers < 1:
        return _fail("--runs and --workers must be at least 1")
    ids = [i for i in args.ids.split(",") if i]
    t0 = time.monotonic()
    try:
        checks = validate_instances(args.task_dir, args.runs, args.count, ids, args.workers)
    except InstanceError as exc:
        return _fail(str(exc))
    by_library: dict[str, list[InstanceCheck]] = {}
    for c in checks:
        by_library.setdefault(c.library, []).append(c)
    rows = []
    for library, group in sorted(by_library.items()):
        seconds = [s for c in group for s in c.seconds]
        rows.append((library, len(group), f"{100 * sum(all(c.gold) and not c.error for c in group) / len(group):.0f}%",
                     f"{100 * sum(any(c.empty) for c in group) / len(group):.0f}%",
                     f"{100 * sum(c.agree for c in group) / len(group):.0f}%", sum(bool(c.error) for c in group),
                     f"{_percentile(seconds, 50):.2f}", f"{_percentile(seconds, 95):.2f}"))
    _table(["library", "instances", "gold resolved", "empty resolved", "runs agree", "errors", "grade p50 s",
            "grade p95 s"], rows, f"{len(checks)} instances validated in {time.monotonic() - t0:.0f} s")
    bad = [c for c in checks if not c.ok or not c.agree]
    for c in bad[:20]:
        print(f"  {c.instance_id}: gold {c.gold} empty {c.empty} {c.error}")
    report = {c.instance_id: {"gold": c.gold, "empty": c.empty, "seconds": c.seconds, "error": c.error}
              for c in checks}
    if args.task_dir.is_dir():
        (args.task_dir / "validation.json").write_text(json.dumps(report, indent=1) + "\n")
    if args.prune and bad:
        if not args.task_dir.is_dir():
            return _fail("--prune rewrites a task directory; give one")
        kept = prune(args.task_dir, {c.instance_id for c in bad})
        print(f"pruned {len(bad)} instances; {kept} remain in {args.task_dir / 'instances.jsonl'}")
        return 0
    return 1 if bad else 0


def prune(task_dir: Path, dropped: set[str]) -> int:
    """Rewrite `instances.jsonl` and the recipes in `images.json` without `dropped`; returns how many remain.
    The images keep the dropped instances' commits (harmless: nothing refers to them)."""
    from m2rl.envs.swe.instances import load_instances, write_instances

    kept = [i for i in load_instances(task_dir) if i.instance_id not in dropped]
    write_instances(task_dir / "instances.jsonl", kept)
    recipes_path = task_dir / "images.json"
    if recipes_path.is_file():
        recipes = json.loads(recipes_path.read_text())
        for recipe in recipes.values():
            recipe["instances"] = [i for i in recipe["instances"] if i not in dropped]
        recipes = {tag: r for tag, r in recipes.items() if r["instances"]}
        recipes_path.write_text(json.dumps(recipes, indent=2, sort_keys=True) + "\n")
    return len(kept)


def cmd_images(args: argparse.Namespace) -> int:
    from m2rl.envs.swe.factory.rebuild import recipe_builder
    from m2rl.envs.swe.instances import load_instances

    if not (args.task_dir / "images.json").is_file():
        return _fail(f"{args.task_dir} has no images.json (write one with `m2rl tasks build`)")
    build = recipe_builder(args.task_dir)
    seen: dict[str, str] = {}
    recipes = json.loads((args.task_dir / "images.json").read_text())
    instances = {i.instance_id: i for i in load_instances(args.task_dir)}
    for tag, recipe in recipes.items():
        first = instances[recipe["instances"][0]]
        seen[tag] = build(first)
        print(f"{recipe['library']} {recipe['version']}: {seen[tag]}")
    return 0
