"""`m2rl eval compare RUN_A RUN_B`: two evals of the same tasks, task by task, with paired significance tests.

Episodes are paired by (task, sample): with the same --seed and task list, sample k of a task is the same
draw of the env for both. Two tests, both two-sided, neither assuming normality (evaluation/stats.py):
- exact McNemar on the paired episodes: only the pairs where one resolved and the other did not count;
- a paired permutation (sign-flip) test on the per-task differences of resolved rate: tasks are the unit,
  so a task with many samples does not count as many independent tasks.
Only tasks and pairs present in both runs are compared; the rest are counted and named.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m2rl.evaluation.records import RESULTS_FILE, EpisodeRecord, read_records
from m2rl.evaluation.stats import mcnemar_exact, paired_permutation_test


@dataclass(frozen=True)
class TaskDifference:
    task_id: str
    episodes_a: int
    resolved_a: int
    episodes_b: int
    resolved_b: int

    @property
    def rate_a(self) -> float:
        return self.resolved_a / self.episodes_a

    @property
    def rate_b(self) -> float:
        return self.resolved_b / self.episodes_b

    @property
    def difference(self) -> float:
        """B's resolved rate minus A's."""
        return self.rate_b - self.rate_a


@dataclass(frozen=True)
class Comparison:
    name_a: str
    name_b: str
    tasks: list[TaskDifference]  # the tasks both runs have, in A's order
    pairs: int  # episodes paired by (task, sample)
    a_only: int  # pairs A resolved and B did not
    b_only: int
    both: int
    neither: int
    mcnemar_p: float
    permutation_p: float
    unpaired_a: int  # episodes of A without a partner in B
    unpaired_b: int

    @property
    def rate_a(self) -> float:
        return (self.a_only + self.both) / self.pairs if self.pairs else 0.0

    @property
    def rate_b(self) -> float:
        return (self.b_only + self.both) / self.pairs if self.pairs else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.name_a, "b": self.name_b, "pairs": self.pairs, "rate_a": self.rate_a, "rate_b": self.rate_b,
                "a_only": self.a_only, "b_only": self.b_only, "both": self.both, "neither": self.neither,
                "mcnemar_p": self.mcnemar_p, "permutation_p": self.permutation_p, "unpaired_a": self.unpaired_a,
                "unpaired_b": self.unpaired_b,
                "tasks": [{"task_id": t.task_id, "rate_a": t.rate_a, "rate_b": t.rate_b, "difference": t.difference}
                          for t in self.tasks]}


def compare_records(a: Sequence[EpisodeRecord], b: Sequence[EpisodeRecord], name_a: str = "A",
                    name_b: str = "B") -> Comparison:
    """The paired comparison of two evals' records (pure)."""
    by_key_b = {r.key: r for r in b}
    keys_a = {r.key for r in a}
    paired = [(r, by_key_b[r.key]) for r in a if r.key in by_key_b]
    counts = {"a_only": 0, "b_only": 0, "both": 0, "neither": 0}
    per_task: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for ra, rb in paired:
        counts[("both" if rb.resolved else "a_only") if ra.resolved else ("b_only" if rb.resolved else "neither")] += 1
    for r in a:
        per_task[r.task_id][0] += 1
        per_task[r.task_id][1] += r.resolved
    tasks_b = {r.task_id for r in b}
    for r in b:
        if r.task_id in per_task:
            per_task[r.task_id][2] += 1
            per_task[r.task_id][3] += r.resolved
    tasks = [TaskDifference(task_id, *values) for task_id, values in per_task.items() if task_id in tasks_b]
    return Comparison(
        name_a, name_b, tasks, len(paired), counts["a_only"], counts["b_only"], counts["both"], counts["neither"],
        mcnemar_p=mcnemar_exact(counts["a_only"], counts["b_only"]),
        permutation_p=paired_permutation_test([t.difference for t in tasks]),
        unpaired_a=len(a) - len(paired), unpaired_b=sum(r.key not in keys_a for r in b))


def eval_directory(run: str, run_root: str = "runs") -> Path:
    """RUN as a path to an eval directory, else a name under `run_root`; FileNotFoundError naming both."""
    for candidate in (Path(run), Path(run_root) / run):
        if (candidate / RESULTS_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"no eval at {run!r} (looked for {Path(run) / RESULTS_FILE} and "
                            f"{Path(run_root) / run / RESULTS_FILE})")


def compare_runs(run_a: str, run_b: str, run_root: str = "runs") -> Comparison:
    dir_a, dir_b = eval_directory(run_a, run_root), eval_directory(run_b, run_root)
    return compare_records(read_records(dir_a), read_records(dir_b), dir_a.name, dir_b.name)


def comparison_markdown(c: Comparison) -> str:
    """The comparison as Markdown (pure): the headline, the tests, then the tasks whose rates differ."""
    lines = [f"# {c.name_b} vs {c.name_a}", "",
             f"{c.pairs} paired episodes on {len(c.tasks)} tasks: resolved {c.rate_a:.3f} ({c.name_a}) -> "
             f"{c.rate_b:.3f} ({c.name_b}), difference {c.rate_b - c.rate_a:+.3f}", "",
             "| test | what it pairs | p (two-sided) |", "|---|---|---|",
             f"| exact McNemar | episodes: {c.a_only} resolved only by {c.name_a}, {c.b_only} only by {c.name_b} | "
             f"{c.mcnemar_p:.4g} |",
             f"| paired permutation | per-task resolved rates ({len(c.tasks)} tasks) | {c.permutation_p:.4g} |"]
    if c.unpaired_a or c.unpaired_b:
        lines += ["", f"Not compared: {c.unpaired_a} episodes of {c.name_a} and {c.unpaired_b} of {c.name_b} "
                      "have no partner in the other run."]
    differing = sorted((t for t in c.tasks if t.difference != 0), key=lambda t: (t.difference, t.task_id))
    lines += ["", f"## Tasks whose resolved rate differs ({len(differing)} of {len(c.tasks)})", ""]
    if differing:
        lines += [f"| task | {c.name_a} | {c.name_b} | difference |", "|---|---|---|---|"]
        lines += [f"| {t.task_id} | {t.resolved_a}/{t.episodes_a} | {t.resolved_b}/{t.episodes_b} | "
                  f"{t.difference:+.3f} |" for t in differing]
    else:
        lines.append("None.")
    return "\n".join(lines) + "\n"
