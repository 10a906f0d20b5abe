"""Registration of the m2rl environments with Gymnasium.

`import m2rl.envs` registers every id below, so
`gymnasium.make("m2rl/Shell-v0", backend="bwrap", split="test")` works after it;
`gymnasium.make("m2rl.envs:m2rl/Shell-v0")` imports the module itself first (Gymnasium's "module:id" form;
Gymnasium 1.x has no plugin entry points). Keyword arguments to `make` go to the env's
constructor: `backend`, `image`, `sandbox_limits`, `reward_spec`, and any `ToolEnvConfig` field (`split`,
`kinds`, `max_steps`, `tool_timeout_s`, ...).

Other env families register through `register_env` from their own module, which `m2rl/envs/__init__.py`
imports (the browser and MCP envs do).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym

NAMESPACE = "m2rl"


def register_env(env_id: str, entry_point: str | Callable[..., gym.Env], **default_kwargs: Any) -> None:
    """Register `env_id` (e.g. "m2rl/Shell-v0") once; re-registering the same id is a no-op.

    `entry_point` is "module:callable" (lazy import, preferred) or a callable returning the env;
    `default_kwargs` are constructor defaults that `gymnasium.make(env_id, **kwargs)` can override.
    """
    if not env_id.startswith(f"{NAMESPACE}/"):
        raise ValueError(
            f"m2rl env ids live in the {NAMESPACE!r} namespace, e.g. '{NAMESPACE}/Name-v0'; got {env_id!r}"
        )
    if env_id in gym.registry:
        return
    # The env returns the policy's text reply, not a numpy array: Gymnasium's passive checker still runs, the
    # rest of its wrappers (order enforcing) too. Episodes end by their own max_steps, so no TimeLimit here.
    gym.register(id=env_id, entry_point=entry_point, kwargs=dict(default_kwargs), nondeterministic=False)


def registered_ids() -> list[str]:
    """The m2rl env ids currently registered."""
    return sorted(env_id for env_id in gym.registry if env_id.startswith(f"{NAMESPACE}/"))


def register_core_envs() -> None:
    register_env("m2rl/Shell-v0", "m2rl.envs.shell_env:make_shell_env")
    register_env("m2rl/Python-v0", "m2rl.envs.python_env:make_python_env")
