"""A scripted SWE expert: the instance's gold patch, applied through the file editor, then submit.

A test double in the sense of mini-swe-agent's deterministic model: it checks the env end to end (the
editor edits /testbed, the diff is taken, the grader resolves it) and makes resolved demonstrations for a
warm start. Each hunk of the gold patch becomes one `str_replace` of the hunk's old lines (context and
removed) by its new lines (context and added); created files become `create`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from m2rl.envs.experts import Call
from m2rl.envs.swe.repository import REPO_DIR
from m2rl.rewards.grading import split_patch


@dataclass(frozen=True)
class Replacement:
    path: str  # repo-relative
    old: str  # "" for a created file
    new: str


def _hunks(lines: list[str]) -> Iterator[list[str]]:
    hunk: list[str] | None = None
    for line in lines:
        if line.startswith("@@"):
            if hunk is not None:
                yield hunk
            hunk = []
        elif hunk is not None and line[:1] in (" ", "-", "+"):
            hunk.append(line)
        elif hunk is not None and line.startswith("\\"):  # "\ No newline at end of file"
            continue
    if hunk is not None:
        yield hunk


def replacements(patch: str) -> list[Replacement]:
    """The patch as editor replacements, in file and hunk order."""
    out: list[Replacement] = []
    for diff in split_patch(patch):
        path = diff.new_path or diff.old_path
        if path is None:
            continue
        lines = diff.text.splitlines(keepends=True)
        for hunk in _hunks(lines):
            old = "".join(line[1:] for line in hunk if line[0] in (" ", "-"))
            new = "".join(line[1:] for line in hunk if line[0] in (" ", "+"))
            out.append(Replacement(path, "" if diff.old_path is None else old, new))
    return out


def gold_patch_calls(patch: str, repo_dir: str = REPO_DIR) -> list[Call]:
    calls: list[Call] = []
    for r in replacements(patch):
        path = f"{repo_dir}/{r.path}"
        if not r.old:
            calls.append(("str_replace_editor", {"command": "create", "path": path, "file_text": r.new}))
        else:
            calls.append(("str_replace_editor", {"command": "str_replace", "path": path, "old_str": r.old,
                                                  "new_str": r.new}))
    return calls


def gold_patch_script(env: Any):
    """An `envs.experts.run_script` script: the gold patch's edits in one turn, then submit."""

    def script(task: Any) -> Iterator[list[Call]]:
        instance = env.unwrapped.task_set.instance(task)
        yield gold_patch_calls(instance.patch)
        yield [("submit", {"answer": "done"})]

    return script
