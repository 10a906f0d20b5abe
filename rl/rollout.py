"""Collect episodes: G samples per task from any `Policy` on any tool env, run concurrently.

Environments are built once and reused across steps (their sandboxes reset in place), handed out
through an asyncio queue so at most `len(envs)` episodes run at a time. The policy batches the
concurrent generate calls itself (LocalPolicy) or the server does (vLLM).

A failing episode (its env's reset or step raised, a tool bug, the policy failed mid-episode) ends that
episode only, so one broken sandbox never stops `m2rl train` or an evaluation:
- it becomes a failed `ScoredTrajectory` (`error` set, `exit_reason` "error", reward 0, not resolved) in its
  place, so every group keeps its G members;
- its trajectory is one EOS token with loss mask 0 (no tokens to learn from), and the trainer leaves it
  out of its group's baseline, the batch and the curriculum: a crash says nothing about the policy;
- the env it ran on is closed and replaced by a fresh `make_env()` (kept if that fails, so nothing hangs);
- the error is logged and counted (`rollout_metrics`: `rollout/failed_episodes`).
If every episode of a call fails, `run` raises `RolloutError` instead of returning nothing to train on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from m2rl.agent.loop import LoopConfig, TextEnv, Tokenizer, arun_episode
from m2rl.agent.policy import Policy, SamplingParams
from m2rl.agent.trajectory import Trajectory
from m2rl.rewards import DETECTORS, Episode

logger = logging.getLogger(__name__)


class RolloutError(RuntimeError):
    """Every episode of a rollout failed: there is nothing to learn from or to evaluate."""


@dataclass
class ScoredTrajectory:
    """One finished episode as the learner and the metrics read it: the token-exact trajectory, the env's
    record of its steps (`episode`, typed StepInfos), and the group it was sampled in."""

    task_id: str
    group: int  # the group of this batch it belongs to: the G samples of one task share it
    trajectory: Trajectory
    episode: Episode = field(default_factory=lambda: Episode(steps=()))  # no steps when it failed
    exit_reason: str = ""
    error: str | None = None  # why the episode failed (see the module docstring); None when it ran

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def reward(self) -> float:
        """The episode's return: the sum of the env's per-step rewards."""
        return float(sum(self.trajectory.rewards))

    @property
    def turn_rewards(self) -> list[float]:
        """One reward per sampled turn (0 for a last turn the env never scored, e.g. cut by a time limit)."""
        rewards = list(self.trajectory.rewards)
        return rewards + [0.0] * (self.trajectory.num_turns - len(rewards))

    @property
    def resolved(self) -> bool:
        """The grader's verdict on the final state/answer."""
        return self.episode.resolved

    @property
    def reward_breakdown(self) -> dict[str, float]:
        return self.episode.reward_breakdown()

    @property
    def detectors(self) -> dict[str, int]:
        """{detector: steps it fired on}."""
        return self.episode.detector_steps()

    @property
    def sampled_tokens(self) -> int:
        return int(sum(self.trajectory.loss_mask))


def failed_episode(task_id: str, group: int, error: str, eos_id: int) -> ScoredTrajectory:
    """The stand-in for an episode that raised: one EOS token (loss mask 0), reward 0, not resolved."""
    trajectory = Trajectory()
    trajectory.append_prompt([eos_id])
    trajectory.metadata.update(exit_reason="error", exit_message=error, steps=[])
    return ScoredTrajectory(task_id=task_id, group=group, trajectory=trajectory, exit_reason="error",
                            error=error)


def scored_trajectory(task_id: str, group: int, trajectory: Trajectory) -> ScoredTrajectory:
    """A finished episode, its step records read back as StepInfos."""
    return ScoredTrajectory(
        task_id=task_id,
        group=group,
        trajectory=trajectory,
        episode=Episode.from_infos(trajectory.metadata.get("steps", [])),
        exit_reason=str(trajectory.metadata.get("exit_reason", "")),
    )


def rollout_metrics(episodes: Sequence[ScoredTrajectory], prefix: str) -> dict[str, float]:
    """Failed episodes (a count) and, per detector, the share of episodes it fired in.

    Training rollouts (`prefix` "train") log `rollout/failed_episodes` and `detectors/<name>`; any other
    batch (e.g. "eval") logs `<prefix>/failed_episodes` and `<prefix>/detectors/<name>`.
    """
    if not episodes:
        return {}
    space = "" if prefix == "train" else f"{prefix}/"
    names = dict.fromkeys([*DETECTORS, *(name for e in episodes for name in e.detectors)])
    metrics = {f"{space}detectors/{name}": sum(e.detectors.get(name, 0) > 0 for e in episodes) / len(episodes)
               for name in names}
    metrics[f"{space or 'rollout/'}failed_episodes"] = float(sum(e.error is not None for e in episodes))
    return metrics


class EpisodeRunner:
    """Owns a set of reusable envs and runs episodes on them against one policy."""

    def __init__(self, make_env: Callable[[], TextEnv], num_envs: int, tokenizer: Tokenizer) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.make_env = make_env
        self.tokenizer = tokenizer
        self.envs = [make_env() for _ in range(num_envs)]

    async def run(
        self,
        policy: Policy,
        task_ids: Sequence[str],
        group_size: int,
        params: SamplingParams,
        loop_config: LoopConfig,
    ) -> list[ScoredTrajectory]:
        """`group_size` episodes of every task, ordered by (task, sample); group = the task's index."""
        free: asyncio.Queue[TextEnv] = asyncio.Queue()
        for env in self.envs:
            free.put_nowait(env)

        async def one(group: int, sample: int, task_id: str) -> ScoredTrajectory:
            env = await free.get()
            try:
                # One SamplingParams for all episodes so the policy can batch their turns together.
                episode, env = await self.episode(env, policy, task_id, group, params, loop_config)
            finally:
                free.put_nowait(env)
            return episode

        jobs = [
            one(group, sample, task_id)
            for group, task_id in enumerate(task_ids)
            for sample in range(group_size)
        ]
        episodes = list(await asyncio.gather(*jobs))
        errors = [e.error for e in episodes if e.error is not None]
        if episodes and len(errors) == len(episodes):
            raise RolloutError(f"all {len(episodes)} episodes failed; the first: {errors[0]}")
        return episodes

    async def episode(self, env: TextEnv, policy: Policy, task_id: str, group: int, params: SamplingParams,
                      loop_config: LoopConfig) -> tuple[ScoredTrajectory, TextEnv]:
        """One episode of `task_id` on `env`, and the env to run the next one on: `env`, or a fresh one when
        the episode failed (see the module docstring; the failure is returned as a failed episode)."""
        try:
            trajectory = await arun_episode(policy, env, self.tokenizer, params, loop_config,
                                            options={"task_id": task_id})
        except Exception as exc:  # this episode only (see the module docstring)
            error = f"{type(exc).__name__}: {exc}"
            logger.warning("an episode of task %s failed: %s", task_id, error)
            fresh = await asyncio.to_thread(self.replace_env, env)
            return failed_episode(task_id, group, error, self.tokenizer.eos_id), fresh
        return scored_trajectory(task_id, group, trajectory), env

    def replace_env(self, env: TextEnv) -> TextEnv:
        """Close an env whose episode failed and put a fresh one in its place; keep it if none can be made
        (its next reset may recover: a ToolEnv replaces a sandbox that cannot be reset)."""
        try:
            fresh = self.make_env()
        except Exception as exc:  # noqa: BLE001  a failed replacement must not stop the other episodes
            logger.warning("could not make a replacement env (%s: %s); reusing the old one", type(exc).__name__, exc)
            return env
        try:
            env.close()
        except Exception:  # noqa: BLE001  a broken env may fail to close; it is dropped either way
            logger.debug("closing the replaced env failed", exc_info=True)
        self.envs = [fresh if e is env else e for e in self.envs]
        return fresh

    def close(self) -> None:
        for env in self.envs:
            try:
                env.close()
            except Exception:  # a dead sandbox must not stop the shutdown of the others
                logger.debug("closing an env failed", exc_info=True)
        self.envs = []
