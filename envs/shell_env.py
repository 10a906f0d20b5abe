"""`m2rl/Shell-v0`: file and text-processing tasks with bash, the file editor and submit."""

from __future__ import annotations

from typing import Any

from m2rl.envs.tasks.base import TaskSet
from m2rl.envs.tasks.shell import ShellTaskSet
from m2rl.envs.tool_env import ToolEnv
from m2rl.envs.tools import BashTool, EditorTool, submit


def shell_tools(env: ToolEnv) -> list[Any]:
    return [
        BashTool(env.sandbox, env.config.tool_timeout_s).bash,
        EditorTool(env.sandbox).str_replace_editor,
        submit,
    ]


def make_shell_env(backend: str = "bwrap", task_set: TaskSet | None = None, **kwargs: Any) -> ToolEnv:
    """`gymnasium.make("m2rl/Shell-v0", **kwargs)` lands here; kwargs are `ToolEnv`'s."""
    return ToolEnv(task_set or ShellTaskSet(), shell_tools, backend=backend, **kwargs)
