"""Build the shipped SFT warm-start checkpoint of the `tiny` policy (reproducible: script + seed).

    python -m m2rl.rl.warm_start --out model/assets/tiny-python-sft

Random `tiny` weights (seeded) are trained with cross-entropy on the policy tokens of scripted-expert
demonstrations of the Python env's `arith` tasks (train split), collected through the real agent loop
and bubblewrap sandboxes. The SFT is deliberately short: the RL main job starts from a policy that
solves some held-out tasks but not most, so RL has room to show what it adds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import gymnasium
import torch

from m2rl.agent.loop import LoopConfig
from m2rl.rl.sft import SFTConfig, collect_demonstrations, train_sft


def build_warm_start(out: Path, demos: int, steps: int, batch_size: int, lr: float, seed: int,
                     sandbox: str = "bwrap", threads: int = 2) -> dict[str, object]:
    import m2rl.envs  # noqa: F401  (registers the env ids)
    from m2rl.envs.experts import python_expert
    from m2rl.model import M2Config, M2ForCausalLM, M2Tokenizer, save_pretrained

    torch.set_num_threads(threads)
    tokenizer = M2Tokenizer.tiny()
    kinds = ("arith",)

    def make_env() -> gymnasium.Env:
        return gymnasium.make("m2rl/Python-v0", backend=sandbox, split="train", max_steps=4, kinds=kinds)

    probe = make_env()
    task_ids = [t.id for t in probe.unwrapped.task_set.tasks("train", demos, kinds=kinds)]
    probe.close()
    start = time.perf_counter()
    demonstrations = asyncio.run(collect_demonstrations(
        make_env, python_expert, task_ids, tokenizer, LoopConfig(max_turns=4, max_context_tokens=2048)))
    collect_s = time.perf_counter() - start
    model = M2ForCausalLM(M2Config.from_preset("tiny")).init_weights(seed=seed)
    start = time.perf_counter()
    losses = train_sft(model, demonstrations, SFTConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed),
                       pad_id=tokenizer.eos_id,
                       on_step=lambda s, l: print(f"sft step {s:4d} loss {l:.4f}", flush=True) if s % 10 == 0 else None)
    train_s = time.perf_counter() - start
    # bf16 on disk keeps the asset a few MB; the trainer loads it back as fp32.
    save_pretrained(model.to(torch.bfloat16), out, tokenizer=tokenizer)
    info = {"demonstrations": len(demonstrations), "steps": steps, "batch_size": batch_size, "lr": lr,
            "seed": seed, "final_loss": losses[-1], "collect_s": round(collect_s, 1), "train_s": round(train_s, 1),
            "task_kinds": list(kinds)}
    (out / "warm_start.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "model/assets/tiny-python-sft")
    parser.add_argument("--demos", type=int, default=256)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sandbox", default="bwrap")
    args = parser.parse_args()
    info = build_warm_start(args.out, args.demos, args.steps, args.batch_size, args.lr, args.seed, args.sandbox)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
