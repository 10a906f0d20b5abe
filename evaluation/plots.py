"""The eval report's figures (PNG, matplotlib's Agg backend): resolved rate by family or repository with its
95% interval, and histograms of turns and tokens per episode."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from m2rl.evaluation.records import EpisodeRecord
from m2rl.runs import atomic_write

PLOTS_DIR = "plots"
RESOLVED_PLOT = f"{PLOTS_DIR}/resolved_by_group.png"
TURNS_PLOT = f"{PLOTS_DIR}/turns.png"
TOKENS_PLOT = f"{PLOTS_DIR}/tokens.png"


def write_plots(directory: Path, records: Sequence[EpisodeRecord],
                by_group: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The three figures under `directory/plots/`; their paths relative to `directory`."""
    import matplotlib

    matplotlib.use("Agg")  # no display where evals run
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    written = []
    labels = sorted(by_group)
    rates = [by_group[g]["resolved_rate"] for g in labels]
    low = [rate - by_group[g]["ci95"][0] for g, rate in zip(labels, rates)]
    high = [by_group[g]["ci95"][1] - rate for g, rate in zip(labels, rates)]
    figure, axis = plt.subplots(figsize=(7, 1.2 + 0.4 * len(labels)), dpi=110)
    axis.barh(labels, rates, xerr=[low, high], color="tab:blue", alpha=0.8, capsize=3)
    axis.set_xlim(0, 1)
    axis.set_xlabel("resolved rate (95% Wilson interval)")
    axis.invert_yaxis()  # first group on top, as in the report's table
    axis.grid(axis="x", alpha=0.3)
    written.append(_save(plt, figure, directory / RESOLVED_PLOT, RESOLVED_PLOT))

    histograms = ((TURNS_PLOT, [r.turns for r in records], "turns per episode"),
                  (TOKENS_PLOT, [r.tokens.total for r in records], "tokens per episode (final context)"))
    for relative, values, label in histograms:
        figure, axis = plt.subplots(figsize=(6, 3.5), dpi=110)
        resolved = [v for v, r in zip(values, records) if r.resolved]
        unresolved = [v for v, r in zip(values, records) if not r.resolved]
        bins = _bins(values, integer=relative == TURNS_PLOT)
        axis.hist([resolved, unresolved], bins=bins, stacked=True, color=["tab:green", "tab:gray"],
                  label=["resolved", "not resolved"])
        axis.set_xlabel(label)
        axis.set_ylabel("episodes")
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 0.5-episode ticks
        axis.legend(loc="best")
        axis.grid(alpha=0.3)
        written.append(_save(plt, figure, directory / relative, relative))
    return written


def _bins(values: Sequence[int], integer: bool) -> Any:
    if not values:
        return 1
    low, high = min(values), max(values)
    if integer:  # one bar per turn count
        return [x - 0.5 for x in range(low, high + 2)]
    return min(30, max(1, len(set(values))))


def _save(plt: Any, figure: Any, path: Path, relative: str) -> str:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write(path, buffer.getvalue())
    return relative
