"""m2rl.agent: the M2 conversation format, token-exact trajectories, the policies and the agent loop.

The public names below are imported on first use (PEP 562 `__getattr__`), not with the package: every env
imports `m2rl.agent.format`, which runs this file first, and should not pay for httpx (OpenAIPolicy) or the
loop's imports, nor make a cycle through them.

    from m2rl.agent import LocalPolicy, OpenAIPolicy, ScriptedPolicy, run_episode
    from m2rl.agent import ChatAgentPolicy  # a hosted chat model (native tool calls), for evaluation
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "Policy": "m2rl.agent.policy",
    "PolicyOutput": "m2rl.agent.policy",
    "SamplingParams": "m2rl.agent.policy",
    "LocalPolicy": "m2rl.agent.local_policy",
    "OpenAIPolicy": "m2rl.agent.openai_policy",
    "ScriptedPolicy": "m2rl.agent.scripted_policy",
    "LoopConfig": "m2rl.agent.loop",
    "run_episode": "m2rl.agent.loop",
    "arun_episode": "m2rl.agent.loop",
    "Trajectory": "m2rl.agent.trajectory",
    "ChatAgentPolicy": "m2rl.agent.chat_adapter",
}

__all__ = [  # the keys of _EXPORTS (tests/test_docs.py checks both lists agree)
    "ChatAgentPolicy", "LocalPolicy", "LoopConfig", "OpenAIPolicy", "Policy", "PolicyOutput", "SamplingParams",
    "ScriptedPolicy", "Trajectory", "arun_episode", "run_episode",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports on demand
    from m2rl.agent.chat_adapter import ChatAgentPolicy
    from m2rl.agent.local_policy import LocalPolicy
    from m2rl.agent.loop import LoopConfig, arun_episode, run_episode
    from m2rl.agent.openai_policy import OpenAIPolicy
    from m2rl.agent.policy import Policy, PolicyOutput, SamplingParams
    from m2rl.agent.scripted_policy import ScriptedPolicy
    from m2rl.agent.trajectory import Trajectory


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'm2rl.agent' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
