"""The agent loop: a policy against a Gymnasium tool env, recorded as a token-exact Trajectory.

mini-swe-agent style: one linear transcript, limits as exceptions carrying their message (the exit
reason in the trajectory's metadata), the trajectory written after every step so a crash loses nothing.
`run()` reads as the episode: start, then `step()` (= observe(act(query()))) until the env ends it.

Token-in, token-out (shared/reference/m2-format.md): history is never re-rendered.
- The first prompt is `render_ids(env prompt messages, tools, add_generation_prompt=True)`.
- Each turn appends exactly the ids the sampler returned (loss mask 1), then the ids of the env's
  observation text, which must be the rendered suffix `\\n]~b]tool\\n<response>..</response>[e~[\\n]~b]ai\\n<think>\\n`
  (or a user reply). Tokenizing the suffix on its own is exact because it follows the EOS special token.
- A segment cut at max_tokens has no EOS. The transcript must still close the assistant message, so an
  EOS id goes in front of the suffix as an env token (loss mask 0: the policy never sampled it). ToolEnv
  itself starts such an observation with `[e~[`; for an env that does not, the loop adds the id.
  Either way the cut segment cannot re-render exactly, so it counts in `metadata["length_cut_turns"]`.
- The terminal observation is not appended: the policy never reads it.
- A `ChatPolicy` (a hosted chat model, agent/chat_adapter.py) is asked with the message view instead of the
  ids; its reply comes back as the ids of the M2 text it stands for, and `metadata["chat_mode"]` marks the
  episode as evaluation-only.
- Each step's info is read once as a `StepInfo` (the env -> everyone contract, rewards/episode.py) and
  kept in its dict form in `metadata["steps"]`, one per env step; the step's reward is `rewards[k]`.
- The message view (for humans and `check_continuity`) is the parsed assistant message of each turn
  plus the tool/user messages recovered from the suffix; `metadata["continuity_violations"]` counts the
  segments whose ids differ from re-rendering that view.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, SupportsFloat, TypeVar, runtime_checkable

from m2rl.agent.format import EOS, MESSAGE_OPEN, generation_prompt, parse, render_ids, render_tool_suffix
from m2rl.agent.policy import ChatPolicy, Policy, PolicyOutput, SamplingParams
from m2rl.agent.trajectory import Trajectory
from m2rl.rewards.episode import StepInfo
from m2rl.runs import atomic_write

T = TypeVar("T")


class Tokenizer(Protocol):
    """What the loop (and the rollout) need of a tokenizer; `m2rl.model.M2Tokenizer` is one."""

    @property
    def eos_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class TextEnv(Protocol):
    """A Gymnasium env whose actions and observations are text (`gymnasium.Env[str, str]`, e.g. ToolEnv).

    `step`'s info is the dict form of a `StepInfo`; `reset`'s info may carry the `task_id`.
    """

    @property
    def unwrapped(self) -> Any: ...

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]: ...

    def step(self, action: str) -> tuple[str, SupportsFloat, bool, bool, dict[str, Any]]: ...

    def close(self) -> None: ...


@runtime_checkable
class PromptedEnv(Protocol):
    """An env (its `unwrapped`) that gives its first prompt as messages and tools, rendered by the loop."""

    def prompt_messages(self) -> list[dict[str, Any]]: ...

    def tools_spec(self) -> list[dict[str, Any]]: ...


@dataclass
class LoopConfig:
    max_turns: int = 32  # sampled segments per episode
    max_context_tokens: int = 32768  # prompt + everything appended; also caps each turn's max_tokens
    time_limit_s: float | None = None  # wall clock for the whole episode
    enable_thinking: bool | None = None  # None: the env's config.enable_thinking, else True
    check_continuity: bool = True  # re-render the message view at the end and count violations


class EpisodeStop(Exception):
    """Ends an episode early; `exit_reason` goes into the trajectory metadata with the message."""

    exit_reason = "stopped"


class LimitExceeded(EpisodeStop):
    exit_reason = "limit"


class TurnLimitExceeded(LimitExceeded):
    exit_reason = "max_turns"


class ContextLimitExceeded(LimitExceeded):
    exit_reason = "context_limit"


class TimeLimitExceeded(LimitExceeded):
    exit_reason = "time_limit"


class EnvProtocolError(EpisodeStop):
    """The env returned an observation that is not a rendered suffix: appending it would corrupt the ids."""

    exit_reason = "env_protocol_error"


def run_episode(policy: Policy, env: TextEnv, tokenizer: Tokenizer, params: SamplingParams,
                config: LoopConfig | None = None, **kwargs: Any) -> Trajectory:
    """Synchronous wrapper of `arun_episode` (not callable from inside a running event loop)."""
    return asyncio.run(arun_episode(policy, env, tokenizer, params, config, **kwargs))


async def arun_episode(
    policy: Policy,
    env: TextEnv,
    tokenizer: Tokenizer,
    params: SamplingParams,
    config: LoopConfig | None = None,
    *,
    seed: int | None = None,
    options: dict[str, Any] | None = None,
    trajectory_path: str | Path | None = None,
) -> Trajectory:
    """Run one episode; env calls run in a worker thread so many episodes can share one event loop."""
    config = config or LoopConfig()
    if config.max_turns < 1 or config.max_context_tokens < 1:
        raise ValueError("max_turns and max_context_tokens must be >= 1")
    return await EpisodeRun(policy, env, tokenizer, params, config, trajectory_path).run(seed, options)


class EpisodeRun:
    """One episode in progress: the trajectory so far and the named steps that extend it."""

    def __init__(self, policy: Policy, env: TextEnv, tokenizer: Tokenizer, params: SamplingParams,
                 config: LoopConfig, trajectory_path: str | Path | None = None) -> None:
        self.policy, self.env, self.tokenizer = policy, env, tokenizer
        self.params, self.config = params, config
        self.trajectory_path = trajectory_path
        thinking = config.enable_thinking
        if thinking is None:
            thinking = bool(getattr(getattr(env.unwrapped, "config", None), "enable_thinking", True))
        self.thinking = thinking
        self.start_time = time.monotonic()
        self.deadline = None if config.time_limit_s is None else self.start_time + config.time_limit_s
        self.traj = Trajectory(enable_thinking=thinking)
        self.traj.metadata.update(exit_reason="running", exit_message="", length_cut_turns=0, steps=[])

    async def run(self, seed: int | None = None, options: dict[str, Any] | None = None) -> Trajectory:
        try:
            await self.start(seed, options)
            while not await self.step():
                self.save()
        except EpisodeStop as stop:
            self.finish(stop.exit_reason, str(stop))
        except BaseException as exc:  # keep what was collected, then let the caller see the failure
            self.finish("error", f"{type(exc).__name__}: {exc}")
            self.save()
            raise
        self.check_continuity()
        self.save()
        return self.traj

    async def start(self, seed: int | None, options: dict[str, Any] | None) -> None:
        """Reset the env and append the first prompt."""
        obs, info = await self.within_time(asyncio.to_thread(self.env.reset, seed=seed, options=options),
                                           "env.reset")
        self.traj.metadata["task_id"] = info.get("task_id") if isinstance(info, dict) else None
        self.traj.append_prompt(self.prompt_ids(obs))
        self.save()

    def prompt_ids(self, obs: Any) -> list[int]:
        unwrapped = self.env.unwrapped
        if not isinstance(unwrapped, PromptedEnv):  # a plain text env: its first observation is the prompt
            return self.tokenizer.encode(obs)
        self.traj.messages = [dict(m) for m in unwrapped.prompt_messages()]
        self.traj.tools = unwrapped.tools_spec()
        ids = render_ids(self.tokenizer, self.traj.messages, self.traj.tools, add_generation_prompt=True,
                         enable_thinking=self.thinking)
        # The env shows the same prompt as text; a mismatch means its renderer and ours disagree.
        self.traj.metadata["reset_observation_matches"] = (
            isinstance(obs, str) and self.tokenizer.encode(obs) == ids
        )
        return ids

    async def step(self) -> bool:
        """One turn: sample, act on the env, append its reply. True when the env ended the episode."""
        out = await self.query()
        return await self.act(out)

    async def query(self) -> PolicyOutput:
        """Sample the next segment within the turn and context limits, and append it."""
        traj = self.traj
        if traj.num_turns >= self.config.max_turns:
            raise TurnLimitExceeded(f"reached the limit of {self.config.max_turns} turns")
        budget = self.config.max_context_tokens - len(traj.ids)
        if budget <= 0:
            raise ContextLimitExceeded(f"context of {len(traj.ids)} tokens reached the limit of "
                                       f"{self.config.max_context_tokens}")
        params = dataclasses.replace(self.params, max_tokens=min(self.params.max_tokens, budget))
        if isinstance(self.policy, ChatPolicy):  # a chat model reads the message view, not the ids
            traj.metadata["chat_mode"] = True  # its ids are our tokenization, its log-probs 0: never trained on
            sample = self.policy.chat_turn([dict(m) for m in traj.messages], traj.tools, params, self.thinking)
        else:
            sample = self.policy.generate(list(traj.ids), params)
        out = await self.within_time(sample, "generation")
        traj.append_sampled(out.ids, out.logprobs, out.policy_version)
        traj.metadata["length_cut_turns"] += not self.ended_with_eos(out)
        return out

    async def act(self, out: PolicyOutput) -> bool:
        """Send the sampled text to the env and record its step; append the reply unless the episode ended."""
        action = self.tokenizer.decode(out.ids)
        message = out.message  # a chat policy's own message keeps its calls' ids, invalid calls included
        if message is None:
            message = parse(action, self.traj.tools, enable_thinking=self.thinking).to_message()
        self.traj.messages.append(message)
        obs, reward, terminated, truncated, info = await self.within_time(
            asyncio.to_thread(self.env.step, action), "env.step")
        step = StepInfo.from_dict(info, len(self.traj.rewards))
        self.traj.rewards.append(float(reward))
        self.traj.metadata["steps"].append(step.to_dict())
        if terminated or truncated:
            self.finish("terminated" if terminated else "truncated")
            return True
        self.observe(obs, step, self.ended_with_eos(out))
        return False

    def observe(self, obs: Any, step: StepInfo, ended_with_eos: bool) -> None:
        """Append the env's reply: its ids (after an env EOS that closes a cut segment) and messages."""
        body, lead = self.suffix_body(obs, ended_with_eos)
        self.traj.append_env(lead + list(self.tokenizer.encode(body)))
        self.traj.messages.extend(suffix_messages(body, step.responses, self.thinking))

    def suffix_body(self, obs: Any, ended_with_eos: bool) -> tuple[str, list[int]]:
        """The observation's rendered suffix, and the ids to put before it (an EOS closing a cut segment)."""
        if not isinstance(obs, str):
            raise EnvProtocolError(f"observation must be text, got {type(obs).__name__}")
        body, lead = obs, []
        if obs.startswith(EOS):  # the env closed a length-cut segment itself
            if ended_with_eos:
                raise EnvProtocolError(
                    "observation starts with [e~[ after a segment that already ended with it"
                )
            body, lead = obs[len(EOS):], [self.tokenizer.eos_id]
        elif not ended_with_eos:
            lead = [self.tokenizer.eos_id]  # close the cut assistant message (env token, loss mask 0)
        gen = generation_prompt(self.thinking)
        if not body.startswith(f"\n{MESSAGE_OPEN}") or not body.endswith(f"{EOS}\n{gen}"):
            raise EnvProtocolError(
                f"observation is not a rendered suffix ('\\n]~b]ROLE\\n...[e~[\\n' + {gen!r}): "
                f"{obs[:120]!r}...{obs[-60:]!r}"
            )
        return body, lead

    def ended_with_eos(self, out: PolicyOutput) -> bool:
        return bool(out.ids) and out.ids[-1] == self.tokenizer.eos_id

    def finish(self, exit_reason: str, message: str = "") -> None:
        self.traj.metadata["exit_reason"], self.traj.metadata["exit_message"] = exit_reason, message

    def check_continuity(self) -> None:
        if not self.config.check_continuity:
            return
        report = self.traj.check_continuity(self.tokenizer)
        meta = self.traj.metadata
        meta["continuity_ok"] = report.ok
        # None when the check could not run (e.g. an error reply to a turn without valid tool calls has
        # no message view the renderer accepts): unknown, not zero.
        meta["continuity_violations"] = None if report.error else report.violations
        meta["continuity_first_divergence"] = report.first_divergence
        if report.error:
            meta["continuity_error"] = report.error

    def save(self) -> None:
        self.traj.metadata["elapsed_s"] = round(time.monotonic() - self.start_time, 3)
        if self.trajectory_path is not None:
            atomic_write(self.trajectory_path, self.traj.to_json() + "\n")

    async def within_time(self, awaitable: Awaitable[T], what: str) -> T:
        if self.deadline is None:
            return await awaitable
        try:
            return await asyncio.wait_for(awaitable, timeout=max(self.deadline - time.monotonic(), 0.0))
        except TimeoutError:
            limit = self.config.time_limit_s
            raise TimeLimitExceeded(f"time limit of {limit} s reached during {what}") from None


def suffix_messages(body: str, responses: Sequence[str], thinking: bool) -> list[dict[str, Any]]:
    """The tool or user messages a rendered suffix stands for."""
    gen = generation_prompt(thinking)
    user_head = f"\n{MESSAGE_OPEN}user\n"
    if body.startswith(user_head):
        return [{"role": "user", "content": body[len(user_head):-len(f"{EOS}\n{gen}")]}]
    head, tail = f"\n{MESSAGE_OPEN}tool\n<response>", f"</response>{EOS}\n{gen}"
    if not (body.startswith(head) and body.endswith(tail)):
        raise EnvProtocolError(f"observation is neither a tool nor a user reply: {body[:80]!r}")
    # Prefer the env's own list of responses (right count even if a response quotes the separator).
    if responses and render_tool_suffix(list(responses), thinking) == body:
        return [{"role": "tool", "content": r} for r in responses]
    parts = body[len(head):-len(tail)].split("</response>\n<response>")
    return [{"role": "tool", "content": p} for p in parts]
