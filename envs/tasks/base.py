"""Tasks and task sets: seeded generators with train/test splits disjoint by construction.

A `Task` is generated from a `(kind, seed)` pair, so its id (`family/kind/seed`) regenerates it exactly.
The split of a seed is a hash of the family name and the seed, so no seed is ever in both splits and
adding kinds or growing the seed range never moves a task between splits.

A `TaskSet` owns the generation, the sandbox setup (files written into `/work` before the episode) and
the grader. Graders trust only what the agent cannot forge: the submitted answer string compared with
the expected answer computed on the host, or a checker script uploaded and run after the episode.
"""

from __future__ import annotations

import hashlib
import json
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from m2rl.rewards.episode import RewardTask, Verification
from m2rl.sandboxes.result import ExecResult

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")
TEST_FRACTION_PER_256 = 51  # ~20% of seeds are held out


@dataclass(frozen=True)
class Task:
    id: str  # "<family>/<kind>/<seed>"
    family: str
    kind: str
    seed: int
    split: str
    prompt: str  # the user message the agent sees
    answer: str | None = None  # expected exact answer (hidden); None when a checker script decides
    files: dict[str, str] = field(default_factory=dict)  # path under /work -> content, written at reset
    checker: str | None = None  # python3 script run in the sandbox after the episode; prints a verdict
    meta: dict[str, Any] = field(default_factory=dict)  # generator parameters (for scripted experts)


class TaskSandbox(Protocol):
    """What a task set needs of a sandbox (`m2rl.sandboxes.Sandbox` has it): write the task's files before
    the episode, stop the agent's processes and run a checker after it."""

    def write_file(self, path: str, data: str | bytes, mode: int | None = None) -> None: ...

    def exec(self, cmd: str | list[str], timeout: float | None = 30.0, cwd: str | None = None,
             env: dict[str, str] | None = None, stdin: str | bytes | None = None) -> ExecResult: ...

    def kill_processes(self) -> None: ...


def split_of(family: str, seed: int) -> str:
    """The split a seed belongs to: a hash, so train/test are disjoint by construction."""
    digest = hashlib.sha256(f"{family}:{seed}".encode()).digest()
    return "test" if digest[0] < TEST_FRACTION_PER_256 else "train"


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: outer whitespace, surrounding quotes/backticks, integer formatting."""
    out = text.strip().strip("`").strip()
    if len(out) >= 2 and out[0] == out[-1] and out[0] in "\"'":
        out = out[1:-1].strip()
    try:
        return str(int(out))  # "007" and "7" are the same integer; "7.0" stays a different string
    except ValueError:
        return out


class TaskSet(ABC):
    """A family of seeded tasks. Subclasses define `kinds` and `generate`."""

    family: str = ""
    kinds: tuple[str, ...] = ()

    @abstractmethod
    def generate(self, kind: str, seed: int) -> Task:
        """Build the task of `kind` for `seed` (pure: same inputs, same task)."""

    def task_id(self, kind: str, seed: int) -> str:
        return f"{self.family}/{kind}/{seed}"

    def make_task(self, kind: str, seed: int, prompt: str, **fields: Any) -> Task:
        """A `Task` of this family with its id and split filled in (fields: answer, files, checker, meta)."""
        return Task(
            id=self.task_id(kind, seed),
            family=self.family,
            kind=kind,
            seed=seed,
            split=split_of(self.family, seed),
            prompt=prompt,
            **fields,
        )

    def get(self, task_id: str) -> Task:
        """Regenerate a task from its id `family/kind/seed`."""
        parts = task_id.split("/")
        if len(parts) != 3 or parts[0] != self.family or parts[1] not in self.kinds or not parts[2].isdigit():
            raise KeyError(
                f"unknown task id {task_id!r}: expected '{self.family}/<kind>/<seed>' with kind in "
                f"{list(self.kinds)} and a non-negative integer seed"
            )
        return self.generate(parts[1], int(parts[2]))

    def seeds(self, split: str, count: int, start: int = 0) -> list[int]:
        """The first `count` seeds >= start that belong to `split`."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        out: list[int] = []
        seed = start
        while len(out) < count:
            if split_of(self.family, seed) == split:
                out.append(seed)
            seed += 1
        return out

    def tasks(self, split: str, count: int, kinds: tuple[str, ...] | None = None) -> list[Task]:
        """A deterministic list of `count` tasks of `split`, cycling through the kinds."""
        kinds = kinds or self.kinds
        seeds = self.seeds(split, count)
        return [self.generate(kinds[i % len(kinds)], seed) for i, seed in enumerate(seeds)]

    def sample(self, split: str, rng: random.Random, kinds: tuple[str, ...] | None = None) -> Task:
        """Draw one task of `split` with `rng` (rejection on the split hash: deterministic per rng state)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        kinds = kinds or self.kinds
        unknown = [k for k in kinds if k not in self.kinds]
        if unknown:
            raise ValueError(
                f"unknown task kinds {unknown} for family {self.family!r}; known: {list(self.kinds)}"
            )
        kind = kinds[rng.randrange(len(kinds))]
        while True:
            seed = rng.randrange(1 << 31)
            if split_of(self.family, seed) == split:
                return self.generate(kind, seed)

    def reward_task(self, task: Task) -> RewardTask:
        """What the rewards may know of `task` (never shown to the agent): its expected answer here; task sets
        with target tests or a reference fix (SWE) add them, for `test_progress` and `relevant_file`."""
        return RewardTask(expected_answer=task.answer)

    def setup(self, task: Task, sandbox: TaskSandbox | None) -> None:
        """Prepare the sandbox for the task (at reset, after the sandbox was cleaned): write its files."""
        if not task.files:
            return
        if sandbox is None:
            raise ValueError(f"task {task.id} has files but the env has no sandbox (backend=None)")
        for path, content in task.files.items():
            sandbox.write_file(path, content.encode())

    def grade(self, task: Task, sandbox: TaskSandbox | None, answer: str | None) -> Verification:
        """Exact answer match when the task has an answer; otherwise run the checker in the sandbox."""
        if task.answer is not None:
            if answer is None:
                return Verification(False, 0.0, "no answer was submitted")
            ok = normalize_answer(answer) == normalize_answer(task.answer)
            detail = (
                "answer matches" if ok else f"submitted {normalize_answer(answer)[:80]!r} is not the answer"
            )
            return Verification(ok, 1.0 if ok else 0.0, detail)
        if task.checker is None:
            raise ValueError(f"task {task.id} has neither an answer nor a checker")
        if sandbox is None:
            raise ValueError(f"task {task.id} is graded by a checker, which needs a sandbox (backend=None)")
        return run_checker(task.checker, sandbox)


def run_checker(script: str, sandbox: TaskSandbox, timeout: float = 30.0) -> Verification:
    """Run the checker after the episode; it prints one JSON line {resolved, score, details}.

    The checker carries its expected values inside it and reaches the sandbox only now, so nothing the agent
    did during the episode could read it. Nothing can alter it either: every process of the agent's (a kept
    python interpreter, a `nohup` loop) is killed first, and the script goes to `python3 -I -` on stdin,
    never into a file the agent's uid could rewrite.
    """
    sandbox.kill_processes()
    result = sandbox.exec(["python3", "-I", "-"], timeout=timeout, cwd="/work", stdin=script.encode())
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if result.timed_out or result.exit_code != 0 or not lines:
        return Verification(False, 0.0, f"checker failed (exit {result.exit_code}): {result.stderr[-300:]}")
    try:
        verdict = json.loads(lines[-1])
        return Verification(
            bool(verdict["resolved"]), float(verdict["score"]), str(verdict.get("details", ""))
        )
    except (ValueError, KeyError, TypeError) as exc:
        return Verification(False, 0.0, f"checker printed an unreadable verdict: {exc}")


def checker_script(body: str, expected: Any) -> str:
    """A checker: `body` is python defining `check(expected) -> (resolved: bool, details: str)`."""
    return (
        "import json, os, sys\n"
        f"EXPECTED = json.loads({json.dumps(json.dumps(expected))})\n"
        f"{body}\n"
        "try:\n"
        "    ok, details = check(EXPECTED)\n"
        "except Exception as exc:\n"
        "    ok, details = False, f'{type(exc).__name__}: {exc}'\n"
        "print(json.dumps({'resolved': bool(ok), 'score': 1.0 if ok else 0.0, 'details': details}))\n"
    )
