"""The success/reward curve of a run, drawn from its metrics.jsonl (pure I/O at the edge)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from m2rl.runs import atomic_write


def plot_training_curve(records: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Held-out success (eval) and mean training reward against the step, written as a PNG."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train/reward_mean"]) for r in records if "train/reward_mean" in r]
    train_success = [(r["step"], r["train/success_rate"]) for r in records if "train/success_rate" in r]
    evals = [(r["step"], r["eval/success_rate"]) for r in records if "eval/success_rate" in r]
    greedy = [(r["step"], r["eval/greedy_success_rate"]) for r in records if "eval/greedy_success_rate" in r]
    tool_use = [(r["step"], r["eval/tool_use_rate"]) for r in records if "eval/tool_use_rate" in r]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        axis.plot(*zip(*train), color="tab:gray", alpha=0.6, label="train reward (mean)")
    if train_success:
        axis.plot(*zip(*train_success), color="tab:blue", alpha=0.5, label="train success")
    if evals:
        axis.plot(*zip(*evals), color="tab:red", marker="o", label="held-out success")
    if greedy:
        axis.plot(*zip(*greedy), color="tab:red", marker="s", linestyle=":", label="held-out success (greedy)")
    if tool_use:
        axis.plot(*zip(*tool_use), color="tab:green", marker="^", linestyle="--", label="held-out tool use")
    axis.set_xlabel("step")
    axis.set_ylabel("rate / reward")
    axis.grid(alpha=0.3)
    axis.legend(loc="best")
    axis.set_title(title or "training curve")
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return atomic_write(path, buffer.getvalue())
