"""The eval report: summary.json, report.md, plots, report.html (the viewer) and, for SWE, predictions.jsonl.

    runs/<name>/summary.json      the numbers (`summarize`): resolved rate with its 95% Wilson interval and
                                  counts, pass@1..K, turns, tokens, tool-call error rate, cost, per group
    runs/<name>/report.md         the same as Markdown, with the plots
    runs/<name>/plots/*.png       evaluation/plots.py
    runs/<name>/report.html       the trajectory viewer (evaluation/viewer.py), one static page
    runs/<name>/predictions.jsonl SWE envs: {instance_id, model_name_or_path, model_patch} per task (sample 0;
                                  predictions-sample<k>.jsonl for the others), what the official SWE-bench
                                  harness takes (`python -m swebench.harness.run_evaluation --predictions_path`)

Everything but the `timing` section of the summary is a function of results.jsonl alone, so a resumed eval
reports exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from m2rl.evaluation.records import EpisodeRecord
from m2rl.evaluation.stats import mean_pass_at_k, wilson_interval
from m2rl.runs import atomic_write

SUMMARY_FILE = "summary.json"
REPORT_FILE = "report.md"
HTML_FILE = "report.html"
PREDICTIONS_FILE = "predictions.jsonl"
TIMING_KEY = "timing"  # the one part of the summary that depends on the machine and the load
TOKENS_PER_PRICE = 1_000_000  # prices are USD per 1M tokens


def write_report(directory: Path, records: Sequence[EpisodeRecord], trajectories: Mapping[str, dict[str, Any]],
                 context: Mapping[str, Any]) -> dict[str, Any]:
    """Write every report file of an eval directory; returns the summary."""
    from m2rl.evaluation.plots import write_plots

    summary = summarize(records, context)
    files = [SUMMARY_FILE, REPORT_FILE]
    files += write_plots(directory, records, summary["by_group"]) if records else []
    if any(r.family == "swe" for r in records):
        files += write_predictions(directory, records, trajectories, str(context.get("name") or "m2rl"))
    html_note = write_viewer(directory, records, trajectories, summary)
    if html_note is None:
        files.append(HTML_FILE)
    summary["files"] = files
    atomic_write(directory / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    atomic_write(directory / REPORT_FILE, report_markdown(summary, html_note))
    return summary


# ------------------------------------------------------------------ the numbers


def summarize(records: Sequence[EpisodeRecord], context: Mapping[str, Any]) -> dict[str, Any]:
    """The summary of an eval's records (pure); `context` names the eval and holds the prices."""
    n = len(records)
    resolved = sum(r.resolved for r in records)
    samples = int(context.get("samples") or max((r.sample + 1 for r in records), default=1))
    summary: dict[str, Any] = {key: context.get(key) for key in (
        "name", "env", "split", "policy", "policy_description", "mode", "seed", "temperature")}
    tool_calls = sum(r.tool_calls for r in records)
    tool_errors = sum(r.tool_errors for r in records)
    summary.update({
        "tasks": len({r.task_id for r in records}),
        "samples": samples,
        "episodes": n,
        "resolved": resolved,
        "failed": sum(r.error is not None for r in records),
        "resolved_rate": resolved / n if n else 0.0,
        "resolved_rate_ci95": list(wilson_interval(resolved, n)),
        "pass_at_k": pass_at_k_table(records),
        "score_mean": _mean([r.score for r in records]),
        "reward_mean": _mean([r.reward for r in records]),
        "turns": _spread([r.turns for r in records]),
        "tokens": {
            "prompt_mean": _mean([r.tokens.prompt for r in records]),
            "sampled_mean": _mean([r.tokens.sampled for r in records]),
            "total_mean": _mean([r.tokens.total for r in records]),
            "sampled_total": sum(r.tokens.sampled for r in records),
            "billed_input_total": sum(r.tokens.billed_input for r in records),
            "server_usage": server_usage(records),
        },
        "tool_calls": {"total": tool_calls, "errors": tool_errors,
                       "error_rate": tool_errors / tool_calls if tool_calls else 0.0,
                       "per_episode": tool_calls / n if n else 0.0},
        "format_errors": sum(r.format_errors for r in records),
        "exit_reasons": dict(sorted(Counter(r.exit_reason for r in records).items())),
        "policy_versions": sorted({r.policy_version for r in records}),
        "cost_usd": cost(records, context.get("price_in"), context.get("price_out")),
        "by_group": by_group(records),
        TIMING_KEY: {"wall_s_mean": _mean([r.wall_s for r in records]),
                     "wall_s_median": statistics.median([r.wall_s for r in records]) if records else 0.0,
                     "wall_s_sum": round(sum(r.wall_s for r in records), 3)},
    })
    return summary


def pass_at_k_table(records: Sequence[EpisodeRecord]) -> dict[str, float]:
    """{k: unbiased pass@k over tasks} for k = 1 .. the fewest samples any task has."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for record in records:
        counts[record.task_id][0] += 1
        counts[record.task_id][1] += record.resolved
    if not counts:
        return {}
    pairs = [(n, c) for n, c in counts.values()]
    return {str(k): mean_pass_at_k(pairs, k) for k in range(1, min(n for n, _ in pairs) + 1)}


def by_group(records: Sequence[EpisodeRecord]) -> dict[str, dict[str, Any]]:
    """Per repository (SWE) or family/kind: episodes, resolved, rate and its interval."""
    groups: dict[str, list[EpisodeRecord]] = defaultdict(list)
    for record in records:
        groups[record.group].append(record)
    out = {}
    for label in sorted(groups):
        members = groups[label]
        resolved = sum(r.resolved for r in members)
        out[label] = {"episodes": len(members), "tasks": len({r.task_id for r in members}), "resolved": resolved,
                      "resolved_rate": resolved / len(members), "ci95": list(wilson_interval(resolved, len(members)))}
    return out


def server_usage(records: Sequence[EpisodeRecord]) -> dict[str, int]:
    """The server's own token counts summed over every episode that has them (hosted chat APIs report them)."""
    total: Counter[str] = Counter()
    for r in records:
        total.update(r.server_usage)
    return dict(sorted(total.items()))


def _server_billed(record: EpisodeRecord) -> bool:
    return {"prompt_tokens", "completion_tokens"} <= record.server_usage.keys()


def cost(records: Sequence[EpisodeRecord], price_in: float | None, price_out: float | None) -> dict[str, Any] | None:
    """USD at the given prices per 1M tokens. From the server's own counts (`usage`: prompt_tokens and
    completion_tokens, in its tokenizer) where every episode has them, as the provider bills; otherwise from
    ours, every turn's whole prompt counted as input (no prompt caching assumed)."""
    if price_in is None and price_out is None:
        return None
    from_server = bool(records) and all(_server_billed(r) for r in records)
    if from_server:
        tokens_in = sum(r.server_usage["prompt_tokens"] for r in records)
        tokens_out = sum(r.server_usage["completion_tokens"] for r in records)
    else:
        tokens_in = sum(r.tokens.billed_input for r in records)
        tokens_out = sum(r.tokens.sampled for r in records)
    input_usd = tokens_in * (price_in or 0.0) / TOKENS_PER_PRICE
    output_usd = tokens_out * (price_out or 0.0) / TOKENS_PER_PRICE
    total = input_usd + output_usd
    return {"input": input_usd, "output": output_usd, "total": total,
            "per_episode": total / len(records) if records else 0.0,
            "counted_by": "server usage" if from_server else "m2rl tokenizer"}


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _spread(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "median": 0.0, "max": 0}
    return {"mean": _mean(values), "median": float(statistics.median(values)), "max": max(values)}


# ------------------------------------------------------------------ the files


def report_markdown(summary: Mapping[str, Any], html_note: str | None = None) -> str:
    """report.md (pure): the headline table, pass@k, the groups, exit reasons, the plots."""
    lo, hi = summary["resolved_rate_ci95"]
    tokens, calls, timing = summary["tokens"], summary["tool_calls"], summary[TIMING_KEY]
    rows = [
        ("policy", f"`{summary['policy']}` ({summary.get('policy_description') or ''})"),
        ("env / split", f"`{summary['env']}` / {summary['split']}"),
        ("episodes", f"{summary['episodes']} ({summary['tasks']} tasks x {summary['samples']} samples; "
                     f"{summary['failed']} failed to run)"),
        ("resolved", f"{summary['resolved']} / {summary['episodes']} = {summary['resolved_rate']:.3f} "
                     f"(95% CI {lo:.3f}-{hi:.3f}, Wilson)"),
        ("score (mean)", f"{summary['score_mean']:.3f}"),
        ("reward (mean)", f"{summary['reward_mean']:.3f}"),
        ("turns", f"mean {summary['turns']['mean']:.2f}, median {summary['turns']['median']:g}, "
                  f"max {summary['turns']['max']}"),
        ("tokens per episode", f"{tokens['total_mean']:.0f} (sampled {tokens['sampled_mean']:.0f}, "
                               f"prompt and env {tokens['prompt_mean']:.0f})"),
        ("tool calls", f"{calls['total']} ({calls['per_episode']:.2f} per episode), {calls['errors']} failed: "
                       f"error rate {calls['error_rate']:.3f}; format errors {summary['format_errors']}"),
        ("wall time per episode", f"mean {timing['wall_s_mean']:.2f} s, median {timing['wall_s_median']:.2f} s"),
    ]
    if summary.get("cost_usd"):
        c = summary["cost_usd"]
        rows.append(("cost", f"${c['total']:.4f} (input ${c['input']:.4f}, output ${c['output']:.4f}; "
                             f"${c['per_episode']:.5f} per episode; tokens counted by {c['counted_by']})"))
    if tokens.get("server_usage"):
        usage = tokens["server_usage"]
        rows.append(("server-reported tokens", ", ".join(f"{k} {v}" for k, v in usage.items())))
    lines = [f"# Eval {summary.get('name') or ''}", "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    if summary["pass_at_k"]:
        ks = list(summary["pass_at_k"])
        lines += ["", "## pass@k (unbiased estimator)", "", "| " + " | ".join(f"pass@{k}" for k in ks) + " |",
                  "|" + "---|" * len(ks), "| " + " | ".join(f"{summary['pass_at_k'][k]:.3f}" for k in ks) + " |"]
    lines += ["", "## By family / repository", "", "| group | tasks | episodes | resolved | rate | 95% CI |",
              "|---|---|---|---|---|---|"]
    for label, g in summary["by_group"].items():
        lines.append(f"| {label} | {g['tasks']} | {g['episodes']} | {g['resolved']} | {g['resolved_rate']:.3f} | "
                     f"{g['ci95'][0]:.3f}-{g['ci95'][1]:.3f} |")
    lines += ["", "## Exit reasons", "", "| reason | episodes |", "|---|---|"]
    lines += [f"| {reason} | {count} |" for reason, count in summary["exit_reasons"].items()]
    plots = [f for f in summary.get("files", []) if f.endswith(".png")]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    lines += ["", "## Files", "", "`results.jsonl` (one line per episode), `trajectories.jsonl`, `summary.json`"
              + (", `report.html` (the trajectory viewer)" if html_note is None else "")
              + (f", `{PREDICTIONS_FILE}` (SWE-bench harness predictions)" if PREDICTIONS_FILE in
                 summary.get("files", []) else "")]
    if html_note:
        lines += ["", f"Note: {html_note}"]
    return "\n".join(lines) + "\n"


def swe_predictions(records: Sequence[EpisodeRecord], trajectories: Mapping[str, dict[str, Any]],
                    model_name: str) -> dict[int, list[dict[str, str]]]:
    """{sample: SWE-bench predictions}: the patch each episode's grader graded ("" when it never got one)."""
    out: dict[int, list[dict[str, str]]] = defaultdict(list)
    for record in records:
        if record.family != "swe":
            continue
        patch = graded_patch(trajectories.get(record.key, {}))
        out[record.sample].append({"instance_id": record.task_id, "model_name_or_path": model_name,
                                   "model_patch": patch})
    return dict(out)


def graded_patch(trajectory: Mapping[str, Any]) -> str:
    """The patch on the last verification of a saved trajectory's steps (rewards/episode.py: Verification.patch)."""
    for step in reversed(trajectory.get("metadata", {}).get("steps", [])):
        verification = step.get("verification")
        if isinstance(verification, dict) and verification.get("patch") is not None:
            return str(verification["patch"])
    return ""


def write_predictions(directory: Path, records: Sequence[EpisodeRecord], trajectories: Mapping[str, dict[str, Any]],
                      model_name: str) -> list[str]:
    written = []
    for sample, predictions in sorted(swe_predictions(records, trajectories, model_name).items()):
        name = PREDICTIONS_FILE if sample == 0 else f"predictions-sample{sample}.jsonl"
        atomic_write(directory / name, "".join(json.dumps(p) + "\n" for p in predictions))
        written.append(name)
    return written


def viewer_episodes(records: Sequence[EpisodeRecord],
                    trajectories: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The viewer's rows (evaluation/viewer.py: ViewerEpisode)."""
    return [{"id": r.key, "task_id": r.task_id, "sample": r.sample, "resolved": r.resolved, "score": r.score,
             "family": r.group, "error": r.error, "exit_reason": r.exit_reason, "reward_breakdown": r.reward_breakdown,
             "turns": r.turns, "tokens": r.tokens.total, "wall_s": r.wall_s,
             "trajectory": trajectories.get(r.key, {})} for r in records]


def write_viewer(directory: Path, records: Sequence[EpisodeRecord], trajectories: Mapping[str, dict[str, Any]],
                 summary: Mapping[str, Any]) -> str | None:
    """report.html; None when written, else a note saying why not (the viewer is not in this checkout)."""
    try:
        from m2rl.evaluation.viewer import write_report_html
    except ImportError as exc:
        return f"report.html was not written: the viewer cannot be imported ({exc})"
    headline = {k: v for k, v in summary.items() if k not in ("by_group", TIMING_KEY, "files")}
    write_report_html(directory / HTML_FILE, f"eval {summary.get('name') or ''}", headline,
                      viewer_episodes(records, trajectories))
    return None
