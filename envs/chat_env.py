"""`ChatEnv`: step an m2rl env with OpenAI chat messages (native `tool_calls`) instead of M2 text.

For users whose agents speak chat (verifiers, SkyRL-gym, inspect, the OpenAI SDK). Each assistant message is
mapped onto exactly the M2 text an M2 model would have written (`m2rl.agent.chat_adapter.assistant_text`),
so the wrapped env parses, runs and grades it as it does our policies' text: same tools, same errors, same
reward. See docs/chat_adapter.md.

    env = ChatEnv(gymnasium.make("m2rl/Python-v0", split="test"))
    obs, info = env.reset(seed=0)        # {"messages": [system, user], "tools": [OpenAI function specs]}
    obs, reward, terminated, truncated, info = env.step(assistant_message)
    # obs == {"messages": [{"role": "tool", "tool_call_id": ..., "content": ...}, ...]}

Observations are dicts of chat messages, which no Gymnasium space describes: `observation_space` and
`action_space` stay the wrapped env's text spaces (the M2 form of the same observations and actions).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gymnasium as gym
from m2rl.agent.chat_adapter import answer_calls, assistant_message, assistant_text, observation_messages
from m2rl.agent.loop import PromptedEnv


class ChatEnv(gym.Wrapper):
    """Wraps an env whose prompt is messages and tools (`ToolEnv` and every registered m2rl env).

    `reset()` returns ({"messages": [...], "tools": [...]}, info); `step(message)` takes an assistant message
    (a dict, or an object with `model_dump()` such as the OpenAI SDK's) and returns ({"messages": the tool or
    user messages the env replied with}, reward, terminated, truncated, info), info being the wrapped env's.
    `messages` holds the whole conversation so far; `last_action` the M2 text the last message became.
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        if not isinstance(env.unwrapped, PromptedEnv):
            raise TypeError(f"ChatEnv needs an env with prompt_messages() and tools_spec(), got "
                            f"{type(env.unwrapped).__name__}")
        self.messages: list[dict[str, Any]] = []
        self.tools: list[dict[str, Any]] = []
        self.last_action = ""
        self.done = True  # until reset

    @property
    def enable_thinking(self) -> bool:
        """Whether the env's prompt opens a `<think>` block (as the agent loop reads it)."""
        return bool(getattr(getattr(self.env.unwrapped, "config", None), "enable_thinking", True))

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
        _, info = self.env.reset(seed=seed, options=options)
        unwrapped: Any = self.env.unwrapped  # a PromptedEnv (checked in __init__)
        self.messages = [dict(m) for m in unwrapped.prompt_messages()]
        self.tools = unwrapped.tools_spec()
        self.last_action, self.done = "", False
        return {"messages": [dict(m) for m in self.messages], "tools": self.tools}, info

    def step(self, message: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        if hasattr(message, "model_dump"):  # an SDK object (openai's ChatCompletionMessage)
            message = message.model_dump(exclude_none=True)
        if not isinstance(message, Mapping):
            raise TypeError(f"step takes an assistant message (a dict), got {type(message).__name__}")
        if self.done:
            raise RuntimeError("the episode is over (or was never started): call reset() first")
        turn = sum(m.get("role") == "assistant" for m in self.messages)
        assistant = assistant_message(message, self.enable_thinking, turn)
        self.last_action = assistant_text(assistant, self.enable_thinking)
        obs, reward, terminated, truncated, info = self.env.step(self.last_action)
        replies = observation_messages(obs, info.get("responses"), self.enable_thinking)
        new = answer_calls(assistant.get("tool_calls", []), replies)
        self.messages += [assistant, *new]
        self.done = terminated or truncated
        return {"messages": new}, float(reward), terminated, truncated, info
