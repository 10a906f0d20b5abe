"""Collect episodes: G samples per task from any `Policy` on any tool env, run concurrently.

Environments are built once and reused across steps (their sandboxes reset in place), handed out
through an asyncio queue so at most `len(envs)` episodes run at a time. The policy batches the
concurrent generate calls itself (LocalPolicy) or the server does (vLLM).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from m2rl.agent.loop import LoopConfig, arun_episode
from m2rl.agent.policy import Policy, SamplingParams
from m2rl.agent.trajectory import Trajectory


@dataclass
class Episode:
    """One finished episode with what the learner and the metrics need."""

    task_id: str
    group: int  # index of the task in this batch: the G samples of one task share it
    trajectory: Trajectory
    reward: float  # sum of the env's per-step rewards
    resolved: bool  # the grader's verdict on the final state/answer
    exit_reason: str
    reward_breakdown: dict[str, float] = field(default_factory=dict)

    @property
    def sampled_tokens(self) -> int:
        return int(sum(self.trajectory.loss_mask))


def episode_from_trajectory(task_id: str, group: int, trajectory: Trajectory) -> Episode:
    steps = trajectory.metadata.get("steps", [])
    resolved = False
    breakdown: dict[str, float] = {}
    for step in steps:
        verification = step.get("verification")
        if isinstance(verification, dict):
            resolved = bool(verification.get("resolved", False))
        for name, value in (step.get("reward_breakdown") or {}).items():
            breakdown[name] = breakdown.get(name, 0.0) + float(value)
    return Episode(
        task_id=task_id,
        group=group,
        trajectory=trajectory,
        reward=float(sum(trajectory.rewards)),
        resolved=resolved,
        exit_reason=str(trajectory.metadata.get("exit_reason", "")),
        reward_breakdown=breakdown,
    )


class EpisodeRunner:
    """Owns a set of reusable envs and runs episodes on them against one policy."""

    def __init__(self, make_env: Callable[[], Any], num_envs: int, tokenizer: Any) -> None:
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
    ) -> list[Episode]:
        """`group_size` episodes of every task; results ordered by (task, sample)."""
        free: asyncio.Queue[Any] = asyncio.Queue()
        for env in self.envs:
            free.put_nowait(env)

        async def one(group: int, sample: int, task_id: str) -> Episode:
            env = await free.get()
            try:
                # One SamplingParams for all episodes so the policy can batch their turns together.
                trajectory = await arun_episode(
                    policy, env, self.tokenizer, params, loop_config, options={"task_id": task_id}
                )
            finally:
                free.put_nowait(env)
            return episode_from_trajectory(task_id, group, trajectory)

        jobs = [
            one(group, sample, task_id)
            for group, task_id in enumerate(task_ids)
            for sample in range(group_size)
        ]
        return list(await asyncio.gather(*jobs))

    def close(self) -> None:
        for env in self.envs:
            try:
                env.close()
            except Exception:  # a dead sandbox must not stop the shutdown of the others
                pass
        self.envs = []
