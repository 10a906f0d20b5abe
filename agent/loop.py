"""The agent loop: a policy against a Gymnasium tool env, recorded as a token-exact Trajectory.

mini-swe-agent style: one linear transcript, limits as exceptions carrying their message (the exit
reason in the trajectory's metadata), the trajectory written after every step so a crash loses nothing.

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
- The message view (for humans and `check_continuity`) is the parsed assistant message of each turn
  plus the tool/user messages recovered from the suffix; `metadata["continuity_violations"]` counts the
  segments whose ids differ from re-rendering that view.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m2rl.agent.format import EOS, MESSAGE_OPEN, generation_prompt, parse, render_ids, render_tool_suffix
from m2rl.agent.policy import Policy, SamplingParams
from m2rl.agent.trajectory import Trajectory
from m2rl.runs import atomic_write


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


def run_episode(policy: Policy, env: Any, tokenizer: Any, params: SamplingParams, config: LoopConfig | None = None,
                **kwargs: Any) -> Trajectory:
    """Synchronous wrapper of `arun_episode` (not callable from inside a running event loop)."""
    return asyncio.run(arun_episode(policy, env, tokenizer, params, config, **kwargs))


async def arun_episode(
    policy: Policy,
    env: Any,
    tokenizer: Any,
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
    thinking = config.enable_thinking
    if thinking is None:
        thinking = bool(getattr(getattr(env.unwrapped, "config", None), "enable_thinking", True))
    start = time.monotonic()
    deadline = None if config.time_limit_s is None else start + config.time_limit_s
    traj = Trajectory(enable_thinking=thinking)
    traj.metadata.update(exit_reason="running", exit_message="", length_cut_turns=0, steps=[])

    def save() -> None:
        traj.metadata["elapsed_s"] = round(time.monotonic() - start, 3)
        if trajectory_path is not None:
            atomic_write(trajectory_path, _to_json_line(traj))

    async def within_time(awaitable: Any, what: str) -> Any:
        if deadline is None:
            return await awaitable
        try:
            return await asyncio.wait_for(awaitable, timeout=max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            raise TimeLimitExceeded(f"time limit of {config.time_limit_s} s reached during {what}") from None

    try:
        obs, info = await within_time(asyncio.to_thread(env.reset, seed=seed, options=options), "env.reset")
        traj.metadata["task_id"] = info.get("task_id") if isinstance(info, dict) else None
        unwrapped = env.unwrapped
        if hasattr(unwrapped, "prompt_messages"):
            traj.messages = [dict(m) for m in unwrapped.prompt_messages()]
            traj.tools = unwrapped.tools_spec() if hasattr(unwrapped, "tools_spec") else None
            prompt_ids = render_ids(tokenizer, traj.messages, traj.tools, add_generation_prompt=True,
                                    enable_thinking=thinking)
            # The env shows the same prompt as text; a mismatch means its renderer and ours disagree.
            traj.metadata["reset_observation_matches"] = isinstance(obs, str) and tokenizer.encode(obs) == prompt_ids
        else:  # a plain text env: its first observation is the prompt; no message view
            prompt_ids = tokenizer.encode(obs)
        traj.append_prompt(prompt_ids)
        save()

        while True:
            if traj.num_turns >= config.max_turns:
                raise TurnLimitExceeded(f"reached the limit of {config.max_turns} turns")
            budget = config.max_context_tokens - len(traj.ids)
            if budget <= 0:
                raise ContextLimitExceeded(f"context of {len(traj.ids)} tokens reached the limit of "
                                           f"{config.max_context_tokens}")
            turn_params = dataclasses.replace(params, max_tokens=min(params.max_tokens, budget))
            out = await within_time(policy.generate(list(traj.ids), turn_params), "generation")
            traj.append_sampled(out.ids, out.logprobs, out.policy_version)
            ended_with_eos = bool(out.ids) and out.ids[-1] == tokenizer.eos_id
            traj.metadata["length_cut_turns"] += not ended_with_eos
            action = tokenizer.decode(out.ids)
            traj.messages.append(parse(action, traj.tools, enable_thinking=thinking).to_message())

            obs, reward, terminated, truncated, info = await within_time(asyncio.to_thread(env.step, action),
                                                                         "env.step")
            traj.rewards.append(float(reward))
            traj.metadata["steps"].append(_step_record(reward, info, out.finish_reason))
            if terminated or truncated:
                traj.metadata["exit_reason"] = "terminated" if terminated else "truncated"
                break
            suffix_ids, messages = _suffix(obs, info, tokenizer, ended_with_eos, thinking)
            traj.append_env(suffix_ids)
            traj.messages.extend(messages)
            save()
    except EpisodeStop as e:
        traj.metadata["exit_reason"], traj.metadata["exit_message"] = e.exit_reason, str(e)
    except BaseException as e:  # keep what was collected, then let the caller see the failure
        traj.metadata["exit_reason"] = "error"
        traj.metadata["exit_message"] = f"{type(e).__name__}: {e}"
        save()
        raise
    if config.check_continuity:
        report = traj.check_continuity(tokenizer)
        traj.metadata["continuity_ok"] = report.ok
        # None when the check could not run (e.g. an error reply to a turn without valid tool calls has
        # no message view the renderer accepts): unknown, not zero.
        traj.metadata["continuity_violations"] = None if report.error else report.violations
        traj.metadata["continuity_first_divergence"] = report.first_divergence
        if report.error:
            traj.metadata["continuity_error"] = report.error
    save()
    return traj


def _suffix(obs: Any, info: Any, tokenizer: Any, ended_with_eos: bool,
            thinking: bool) -> tuple[list[int], list[dict[str, Any]]]:
    """Ids to append after a sampled segment, and the messages they stand for."""
    if not isinstance(obs, str):
        raise EnvProtocolError(f"observation must be text, got {type(obs).__name__}")
    body, lead = obs, []
    if obs.startswith(EOS):  # the env closed a length-cut segment itself
        if ended_with_eos:
            raise EnvProtocolError("observation starts with [e~[ after a segment that already ended with it")
        body, lead = obs[len(EOS):], [tokenizer.eos_id]
    elif not ended_with_eos:
        lead = [tokenizer.eos_id]  # close the cut assistant message (env token, loss mask 0)
    gen = generation_prompt(thinking)
    if not body.startswith(f"\n{MESSAGE_OPEN}") or not body.endswith(f"{EOS}\n{gen}"):
        raise EnvProtocolError(f"observation is not a rendered suffix ('\\n]~b]ROLE\\n...[e~[\\n' + {gen!r}): "
                               f"{obs[:120]!r}...{obs[-60:]!r}")
    return lead + list(tokenizer.encode(body)), _suffix_messages(body, info, thinking)


def _suffix_messages(body: str, info: Any, thinking: bool) -> list[dict[str, Any]]:
    gen = generation_prompt(thinking)
    user_head = f"\n{MESSAGE_OPEN}user\n"
    if body.startswith(user_head):
        return [{"role": "user", "content": body[len(user_head):-len(f"{EOS}\n{gen}")]}]
    head, tail = f"\n{MESSAGE_OPEN}tool\n<response>", f"</response>{EOS}\n{gen}"
    if not (body.startswith(head) and body.endswith(tail)):
        raise EnvProtocolError(f"observation is neither a tool nor a user reply: {body[:80]!r}")
    # Prefer the env's own list of responses (right count even if a response quotes the separator).
    responses = info.get("responses") if isinstance(info, dict) else None
    if isinstance(responses, list) and responses and all(isinstance(r, str) for r in responses) \
            and render_tool_suffix(responses, thinking) == body:
        return [{"role": "tool", "content": r} for r in responses]
    parts = body[len(head):-len(tail)].split("</response>\n<response>")
    return [{"role": "tool", "content": p} for p in parts]


def _step_record(reward: Any, info: Any, finish_reason: str) -> dict[str, Any]:
    info = info if isinstance(info, dict) else {}
    # detectors: {detector: [evidence]} of this step (bounded per step), summed into the run's metrics.
    keep = ("reward_breakdown", "errors", "verification", "answer", "error", "detectors")
    record = {k: info[k] for k in keep if k in info}
    # Which tools ran this step (names only): enough for tool-use metrics without the bulky outputs.
    results = info.get("tool_results")
    if isinstance(results, list):
        record["tools"] = [r.get("name") for r in results if isinstance(r, dict)]
    record.update(reward=float(reward), finish_reason=finish_reason)
    return _jsonable(record)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _to_json_line(traj: Trajectory) -> str:
    return traj.to_json() + "\n"
