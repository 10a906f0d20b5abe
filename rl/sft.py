"""SFT warm start: demonstrations from a scripted expert, trained with cross-entropy on policy tokens.

Demonstrations go through the very agent loop RL uses (`arun_episode`), with `ExpertPolicy` in the
policy seat, so SFT sees exactly the token layout RL will produce: prompt ids, the expert's turn
tokens (loss mask 1), and the env's rendered replies (loss mask 0). Only policy tokens are trained.

We train with our own loop rather than TRL's SFTTrainer: TRL re-tokenizes chat text, while this
loop consumes the token-exact trajectories (and their masks) that RL consumes.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium
import torch
from m2rl.agent.loop import LoopConfig, arun_episode
from m2rl.agent.policy import PolicyOutput, SamplingParams
from m2rl.agent.trajectory import Trajectory
from m2rl.rewards.episode import Episode
from m2rl.rl.batch import collate


class RecordInfo(gymnasium.Wrapper):
    """Keeps the last step's info so a scripted expert can read its tool outputs."""

    def __init__(self, env: gymnasium.Env) -> None:
        super().__init__(env)
        self.last_info: dict[str, Any] = {}

    def reset(self, **kwargs: Any) -> Any:
        self.last_info = {}
        return self.env.reset(**kwargs)

    def step(self, action: Any) -> Any:
        result = self.env.step(action)
        self.last_info = result[-1]
        return result


class ExpertPolicy:
    """SCRIPTED POLICY (test double / demonstration source): plays an expert script for one episode.

    The script (see `m2rl.envs.experts`) yields the tool calls of each turn and receives the outputs of
    the previous calls, which this adapter reads from the wrapped env's last info.
    """

    def __init__(self, env: RecordInfo, script: Callable[[Any], Any], tokenizer: Any,
                 enable_thinking: bool = True) -> None:
        self.env = env
        self.script_fn = script
        self.tokenizer = tokenizer
        self.enable_thinking = enable_thinking
        self._turns: Any = None

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> PolicyOutput:
        if self._turns is None:
            self._turns = self.script_fn(self.env.unwrapped.task)
            calls = next(self._turns)
        else:
            outputs = [r["output"] for r in self.env.last_info.get("tool_results", [])]
            try:
                calls = self._turns.send(outputs)
            except StopIteration:
                calls = [("submit", {"answer": ""})]
        from m2rl.envs.experts import action_text, expert_reasoning

        text = action_text(calls, reasoning=expert_reasoning(calls), enable_thinking=self.enable_thinking)
        ids = self.tokenizer.encode(text)
        return PolicyOutput(ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop", policy_version=0)


async def collect_demonstrations(
    make_env: Callable[[], gymnasium.Env],
    script: Callable[[Any], Any],
    task_ids: Sequence[str],
    tokenizer: Any,
    loop_config: LoopConfig,
    concurrency: int = 8,
) -> list[Trajectory]:
    """Expert trajectories, one per task id; only resolved episodes are kept as demonstrations."""
    envs = [RecordInfo(make_env()) for _ in range(max(1, min(concurrency, len(task_ids))))]
    free: asyncio.Queue[RecordInfo] = asyncio.Queue()
    for env in envs:
        free.put_nowait(env)
    params = SamplingParams(max_tokens=loop_config.max_context_tokens, stop_ids=(tokenizer.eos_id,))

    async def one(task_id: str) -> Trajectory:
        env = await free.get()
        try:
            policy = ExpertPolicy(env, script, tokenizer, enable_thinking=loop_config.enable_thinking is not False)
            return await arun_episode(policy, env, tokenizer, params, loop_config, options={"task_id": task_id})
        finally:
            free.put_nowait(env)

    try:
        trajectories = await asyncio.gather(*(one(t) for t in task_ids))
    finally:
        for env in envs:
            env.close()
    return [t for t in trajectories if _resolved(t)]


def _resolved(trajectory: Trajectory) -> bool:
    return Episode.from_infos(trajectory.metadata.get("steps", [])).resolved


@dataclass
class SFTConfig:
    steps: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    seed: int = 0


def sft_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    """Mean negative log-likelihood of the policy tokens (loss mask 1) over the whole batch."""
    from m2rl.model.logprobs import token_logprobs

    device = next(model.parameters()).device
    ids, attention, loss_mask = (t.to(device) for t in (batch.input_ids, batch.attention_mask, batch.loss_mask))
    logprobs = token_logprobs(model, ids, attention_mask=attention, target_mask=loss_mask)
    mask = loss_mask.to(logprobs.dtype)
    return -(logprobs * mask).sum() / mask.sum().clamp(min=1)


def train_sft(
    model: torch.nn.Module,
    demonstrations: Sequence[Trajectory],
    config: SFTConfig,
    pad_id: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """AdamW on shuffled mini-batches of demonstrations; returns the loss of every step."""
    if not demonstrations:
        raise ValueError("no demonstrations to train on (did the expert solve any task?)")
    if any(getattr(t, "chat_mode", False) for t in demonstrations):  # warm_start's Demo holds ids and mask only
        raise ValueError("a demonstration was played by a chat policy (Trajectory.chat_mode): evaluation only")
    rng = random.Random(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95),
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps))
    )
    losses: list[float] = []
    model.train()
    order: list[int] = []
    for step in range(config.steps):
        if len(order) < config.batch_size:
            extra = list(range(len(demonstrations)))
            rng.shuffle(extra)
            order.extend(extra)
        rows, order = order[: config.batch_size], order[config.batch_size:]
        chosen = [demonstrations[i] for i in rows]
        batch = collate([t.ids for t in chosen], [t.loss_mask for t in chosen], [t.logprobs for t in chosen],
                        [0.0] * len(chosen), pad_id=pad_id)
        loss = sft_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses
