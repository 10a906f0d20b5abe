"""m2rl.envs: Gymnasium tool environments over sandboxes.

Importing this package registers `m2rl/Shell-v0` and `m2rl/Python-v0` (and the browser / MCP envs when their
modules are present) with Gymnasium.
"""

import importlib
import warnings

from m2rl.envs.registration import register_core_envs, register_env, registered_ids
from m2rl.envs.spaces import UnicodeText
from m2rl.envs.tasks.base import Task, TaskSet, Verification, split_of
from m2rl.envs.tool import Tool, ToolError, ToolOutput, tool_spec, validate_arguments
from m2rl.envs.tool_env import ToolEnv, ToolEnvConfig

register_core_envs()

# Families that live in other modules register themselves on import (each calls `register_env`).
for _module in ("m2rl.envs.browser_env", "m2rl.envs.mcp_env", "m2rl.envs.swe", "m2rl.envs.miniwob.env",
                "m2rl.envs.bfcl.env"):
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as _exc:
        if _exc.name != _module:  # the module exists but one of its dependencies is missing: say so
            warnings.warn(f"{_module} not registered: {_exc}", stacklevel=2)
    except ImportError as _exc:
        warnings.warn(f"{_module} not registered: {_exc}", stacklevel=2)

__all__ = [
    "Task",
    "TaskSet",
    "Tool",
    "ToolEnv",
    "ToolEnvConfig",
    "ToolError",
    "ToolOutput",
    "UnicodeText",
    "Verification",
    "register_env",
    "registered_ids",
    "split_of",
    "tool_spec",
    "validate_arguments",
]
