"""Ablation of the CISPO upper clip eps_high, with GRPO / DAPO / GSPO side by side, on a toy RL task.

Task: the prompt is one token p; the policy writes K tokens; reward = fraction of positions k where it
wrote (p + k) mod V. G samples per prompt, group-relative advantages, several off-policy updates per
rollout batch (epochs x mini-batches) so that the clip range matters. Policy: a small GRU LM (any causal
LM works with the learner). Same seeds for every variant.

Reported per variant (mean over seeds): reward of the last 10 steps, the first step whose batch reward
reached --target (--steps if never), the mean upper clip fraction, the entropy of the last 10 steps,
and wall time. With --epochs 1 --mini-batches 1 every update is on-policy (ratio 1) and CISPO, GRPO and
DAPO must give identical curves: a check of the harness itself.

    python -m m2rl.benchmarks.rl_loss_ablation [--steps 60 --seeds 3 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from m2rl.rl.advantages import broadcast_to_tokens, group_advantages
from m2rl.rl.learner import Learner, LearnerConfig, RolloutBatch
from m2rl.rl.losses import LossConfig
from torch import nn

VOCAB = 16
PROMPTS = 8
LENGTH = 6  # generated tokens per sample


class GRULM(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(input_ids))[0])  # [B, T, V]


@torch.no_grad()
def rollout(
    model: nn.Module, groups: int, group_size: int, gen: torch.Generator
) -> tuple[RolloutBatch, float]:
    prompts = torch.randint(0, PROMPTS, (groups,), generator=gen).repeat_interleave(group_size)
    ids = prompts[:, None]
    logps = [torch.zeros(len(prompts))]
    for _ in range(LENGTH):
        logp = torch.log_softmax(model(ids)[:, -1].float(), dim=-1)
        nxt = torch.multinomial(logp.exp(), 1, generator=gen)
        logps.append(logp.gather(1, nxt)[:, 0])
        ids = torch.cat([ids, nxt], dim=1)
    targets = (prompts[:, None] + torch.arange(LENGTH)[None]) % VOCAB
    rewards = (ids[:, 1:] == targets).float().mean(dim=1)
    loss_mask = torch.ones_like(ids)
    loss_mask[:, 0] = 0
    adv = group_advantages(rewards.view(groups, group_size)).reshape(-1)
    batch = RolloutBatch(
        input_ids=ids,
        loss_mask=loss_mask,
        old_logprobs=torch.stack(logps, dim=1) * loss_mask,
        advantages=broadcast_to_tokens(adv.float(), loss_mask),
    )
    return batch, float(rewards.mean())


def run_variant(loss: LossConfig, seed: int, args: argparse.Namespace) -> dict[str, float]:
    steps, target = args.steps, args.target
    torch.manual_seed(seed)
    model = GRULM()
    config = LearnerConfig(
        lr=args.lr, epochs=args.epochs, mini_batches=args.mini_batches, loss=loss, seed=seed
    )
    learner = Learner(model, config)
    gen = torch.Generator().manual_seed(seed)
    rewards, clip_high, entropy = [], [], []
    start = time.perf_counter()
    for _ in range(steps):
        batch, reward = rollout(model, groups=16, group_size=8, gen=gen)
        metrics = learner.update(batch)
        rewards.append(reward)
        clip_high.append(metrics["clip_frac_high"])
        entropy.append(metrics["entropy"])
    hit = next((i for i, r in enumerate(rewards) if r >= target), steps)
    return {
        "final_reward": statistics.mean(rewards[-10:]),
        "steps_to_target": float(hit),
        "clip_frac_high": statistics.mean(clip_high),
        "final_entropy": statistics.mean(entropy[-10:]),
        "time_s": time.perf_counter() - start,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--target", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--mini-batches", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = {
        "cispo eps_high=0.2": LossConfig(kind="cispo", eps_high=0.2),
        "cispo eps_high=1.0": LossConfig(kind="cispo", eps_high=1.0),
        "cispo eps_high=4.0 (default)": LossConfig(kind="cispo"),
        "cispo eps_high=6.0": LossConfig(kind="cispo", eps_high=6.0),
        "grpo (0.2/0.2)": LossConfig(kind="grpo"),
        "dapo (0.2/0.28)": LossConfig(kind="dapo"),
        "gspo (3e-4/4e-4)": LossConfig(kind="gspo"),
    }
    results = {}
    for name, loss in variants.items():
        runs = [run_variant(loss, seed, args) for seed in range(args.seeds)]
        results[name] = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
        f"{args.steps} steps x {args.seeds} seeds, 16 groups x 8 samples, lr {args.lr}, "
        f"{args.epochs} epochs x {args.mini_batches} mini-batches per rollout batch"
    )
    head = f"{'variant':<30} {'final reward':>12} {'steps to ' + str(args.target):>14} {'clip high':>10}"
    print(head + f" {'entropy':>8} {'time s':>8}")
    for name, r in results.items():
        print(
            f"{name:<30} {r['final_reward']:>12.3f} {r['steps_to_target']:>14.1f} "
            f"{r['clip_frac_high']:>10.3f} {r['final_entropy']:>8.3f} {r['time_s']:>8.1f}"
        )
    print(json.dumps({"benchmark": "rl_loss_ablation", "args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
