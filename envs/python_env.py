"""`m2rl/Python-v0`: problems answered by running code in a persistent interpreter, then `submit`."""

from __future__ import annotations

from typing import Any

from m2rl.envs.tasks.base import TaskSet
from m2rl.envs.tasks.python_tasks import PythonTaskSet
from m2rl.envs.tool_env import ToolEnv
from m2rl.envs.tools import PythonTool, submit


def python_tools(env: ToolEnv) -> list[Any]:
    return [PythonTool(env.sandbox, env.config.tool_timeout_s).python, submit]


def make_python_env(backend: str = "bwrap", task_set: TaskSet | None = None, **kwargs: Any) -> ToolEnv:
    """`gymnasium.make("m2rl/Python-v0", **kwargs)` lands here; kwargs are `ToolEnv`'s."""
    return ToolEnv(task_set or PythonTaskSet(), python_tools, backend=backend, **kwargs)
