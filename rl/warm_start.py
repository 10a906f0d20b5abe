"""Build the shipped SFT warm-start checkpoint of the `tiny` policy (reproducible: script + seed).

    m2rl warm-start collect --demos 4096 --out demos.pt     # CPU: real env + bwrap sandboxes
    m2rl warm-start train --demos-file demos.pt --out DIR   # any device (cuda is faster)
    m2rl warm-start all --out model/assets/tiny-python-sft  # both, here

`python -m m2rl.rl.warm_start ...` is the same command (the spelling model/assets/tiny-python-sft/
warm_start.json records), kept as an alias of `m2rl warm-start ...`.

Demonstrations are scripted-expert episodes of the Python env's `arith` tasks (train split), collected
through the real agent loop, so their ids and loss masks are exactly what RL will produce. They mix two
correct strategies, as real SFT data does: computing with the python tool (a fraction `tool_fraction`
of the tasks) and answering from mental arithmetic (the rest). Random `tiny` weights (seeded) are trained
with cross-entropy on the policy tokens. The small model imitates both, but only the tool strategy is
one it can execute reliably (copying the expression into code); mental arithmetic in 2 M parameters is
mostly wrong. Which strategy to use is what the RL main job has to learn from rewards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch and the SFT loop are imported where they are used: `m2rl` imports this module to register its
# command, and `m2rl tasks` must not pay for torch.

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "model/assets/tiny-python-sft"
KINDS = ("arith",)
TOOL_FRACTION = 0.5  # of the demonstrations that use the python tool; the rest answer from mental arithmetic


class Demo:
    """The two fields SFT needs from a Trajectory (lets `train` run where gymnasium is absent)."""

    def __init__(self, ids: list[int], loss_mask: list[int]) -> None:
        self.ids = ids
        self.loss_mask = loss_mask
        self.logprobs = [0.0] * len(ids)


def collect(count: int, sandbox: str = "bwrap", tool_fraction: float = TOOL_FRACTION) -> list[Demo]:
    if not 0.0 <= tool_fraction <= 1.0:
        raise ValueError(f"tool_fraction must be in [0, 1], got {tool_fraction}")
    import gymnasium
    import m2rl.envs  # noqa: F401  (registers the env ids)
    from m2rl.agent.loop import LoopConfig
    from m2rl.envs.experts import mixture, python_expert, python_mental_arith
    from m2rl.model import M2Tokenizer
    from m2rl.rl.sft import collect_demonstrations

    tokenizer = M2Tokenizer.tiny()

    def make_env() -> Any:
        return gymnasium.make("m2rl/Python-v0", backend=sandbox, split="train", max_steps=4, kinds=KINDS)

    probe = make_env()
    task_ids = [t.id for t in probe.unwrapped.task_set.tasks("train", count, kinds=KINDS)]
    probe.close()
    script = mixture([(python_expert, tool_fraction), (python_mental_arith, 1.0 - tool_fraction)])
    trajectories = asyncio.run(collect_demonstrations(
        make_env, script, task_ids, tokenizer, LoopConfig(max_turns=4, max_context_tokens=2048),
        concurrency=16))
    return [Demo(list(t.ids), list(t.loss_mask)) for t in trajectories]


def save_demos(demos: list[Demo], path: Path, tool_fraction: float) -> None:
    import torch

    torch.save({"ids": [d.ids for d in demos], "loss_mask": [d.loss_mask for d in demos],
                "tool_fraction": tool_fraction}, path)


def load_demos(path: Path) -> tuple[list[Demo], float | None]:
    """The demonstrations and the tool fraction they were collected with (None in older files)."""
    import torch

    data = torch.load(path, weights_only=True)
    return [Demo(ids, mask) for ids, mask in zip(data["ids"], data["loss_mask"])], data.get("tool_fraction")


def train(demos: list[Demo], out: Path, steps: int, batch_size: int, lr: float, seed: int,
          device: str = "cpu", save_every: int = 0, tool_fraction: float | None = None) -> dict[str, Any]:
    from m2rl.model import M2Config, M2ForCausalLM, M2Tokenizer, save_pretrained
    from m2rl.rl.sft import SFTConfig, train_sft

    tokenizer = M2Tokenizer.tiny()
    model = M2ForCausalLM(M2Config.from_preset("tiny")).init_weights(seed=seed).to(device)
    start = time.perf_counter()

    def on_step(step: int, loss: float) -> None:
        if step % 50 == 0:
            print(f"sft step {step:5d} loss {loss:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            _save(model, out.parent / f"{out.name}-step{step + 1}", tokenizer, save_pretrained)

    config = SFTConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    losses = train_sft(model, demos, config, pad_id=tokenizer.eos_id, on_step=on_step)
    _save(model, out, tokenizer, save_pretrained)
    info = {"demonstrations": len(demos), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
            "device": device, "final_loss": round(losses[-1], 4), "train_s": round(time.perf_counter() - start, 1),
            "task_kinds": list(KINDS), "tool_fraction": tool_fraction}
    (out / "warm_start.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _save(model: torch.nn.Module, out: Path, tokenizer: Any, save_pretrained: Any) -> None:
    import torch

    # bf16 on disk keeps the asset a few MB; the trainer loads it back as fp32.
    copy = type(model)(model.config).to(torch.bfloat16)
    copy.load_state_dict({k: v.detach().to("cpu", torch.bfloat16) for k, v in model.state_dict().items()})
    save_pretrained(copy, out, tokenizer=tokenizer)


def build_warm_start(out: Path, demos: int, steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                     sandbox: str = "bwrap", threads: int = 2, tool_fraction: float = TOOL_FRACTION) -> dict[str, Any]:
    """Collect demonstrations and train, here (the `all` command)."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return train(collect(demos, sandbox, tool_fraction), Path(out), steps, batch_size, lr, seed,
                 tool_fraction=tool_fraction)


def register(subparsers: argparse._SubParsersAction) -> None:
    """`m2rl warm-start collect|train|all [flags]` (the m2rl CLI registers every package's commands this way)."""
    parser = subparsers.add_parser("warm-start", help="build the SFT warm start of the tiny policy "
                                   "(collect scripted demonstrations, train on them)",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("warm_start_command", metavar="{collect,train,all}", choices=["collect", "train", "all"],
                        help="collect: demonstrations to a file; train: a checkpoint from that file; all: both")
    parser.add_argument("--out", type=Path, help="demos file (collect, default demos.pt) or checkpoint dir "
                        "(train/all, default model/assets/tiny-python-sft)")
    parser.add_argument("--demos", type=int, default=8192, help="demonstrations to collect")
    parser.add_argument("--demos-file", type=Path, help="demonstrations collected earlier (train)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--save-every", type=int, default=0, help="also save intermediate checkpoints")
    parser.add_argument("--sandbox", default="bwrap")
    parser.add_argument("--tool-fraction", type=float, default=TOOL_FRACTION,
                        help="share of demonstrations using the python tool (the rest answer mentally)")
    parser.set_defaults(func=cmd_warm_start)


def cmd_warm_start(args: argparse.Namespace) -> int:
    import torch
    from m2rl.cli import UserError

    command = args.warm_start_command
    if command == "train" and args.demos_file is None:
        raise UserError("warm-start train needs --demos-file (from `m2rl warm-start collect --out FILE`)")
    torch.manual_seed(args.seed)
    if command == "collect":
        out = args.out or Path("demos.pt")
        demos = collect(args.demos, args.sandbox, args.tool_fraction)
        save_demos(demos, out, args.tool_fraction)
        print(json.dumps({"demonstrations": len(demos), "file": str(out)}))
        return 0
    if command == "train":
        demos, tool_fraction = load_demos(args.demos_file)
    else:
        demos, tool_fraction = collect(args.demos, args.sandbox, args.tool_fraction), args.tool_fraction
    info = train(demos, args.out or DEFAULT_OUT, args.steps, args.batch_size, args.lr, args.seed, args.device,
                 args.save_every, tool_fraction)
    print(json.dumps(info))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m m2rl.rl.warm_start ARGS` is `m2rl warm-start ARGS` (same parser, same one-line errors)."""
    from m2rl.cli import main as m2rl_main

    return m2rl_main(["warm-start", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
