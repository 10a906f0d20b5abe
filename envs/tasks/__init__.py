"""Task families: seeded generators with disjoint train/test splits and graders (see base.py)."""

from __future__ import annotations

import importlib

from m2rl.envs.tasks.base import SPLITS, Task, TaskSet, Verification, split_of

# family -> "module:class"; imported on demand so listing shell tasks never loads the browser stack.
TASK_SETS: dict[str, str] = {
    "shell": "m2rl.envs.tasks.shell:ShellTaskSet",
    "python": "m2rl.envs.tasks.python_tasks:PythonTaskSet",
    "browser": "m2rl.envs.tasks.browser_tasks:BrowserTaskSet",
    "mcp": "m2rl.envs.tasks.mcp_tasks:MCPTaskSet",
}


def get_task_set(family: str) -> TaskSet:
    """The task set of a family, built with its default parameters."""
    if family not in TASK_SETS:
        raise KeyError(f"unknown task family {family!r}; known: {sorted(TASK_SETS)}")
    module, cls = TASK_SETS[family].split(":")
    return getattr(importlib.import_module(module), cls)()


def family_of(task_id: str) -> str:
    return task_id.split("/", 1)[0]


__all__ = ["SPLITS", "TASK_SETS", "Task", "TaskSet", "Verification", "family_of", "get_task_set", "split_of"]
