"""The trajectory viewer: `report.html`, one static page that lists episodes and shows each turn by turn.

The page is a single file with its CSS, its script (viewer.css, viewer.js beside this module) and its
data inlined: it opens from disk, offline, with no server, and loads nothing (its Content-Security-Policy
forbids every fetch). The data is one JSON document in a `<script type="application/json">` tag, escaped
so that no model text can close that tag (`embed_json`); the script builds every element with
`textContent`, never `innerHTML`, so model text is always shown as text.

An episode, as `write_report_html` takes it (`ViewerEpisode`), is what an eval writes per episode plus
the episode's `Trajectory` as its JSON dict (agent/trajectory.py). The page reads the trajectory's
`messages` for the human view (reasoning, text, tool calls, tool results, per turn), `metadata["steps"]`
for what the env said of each turn (failed tool calls, errors, reward breakdown, the verdict), `rewards`
for each turn's reward, and `ids` / `loss_mask` / `logprobs` / `policy_versions` / `spans` for the token
view, which is built only when opened (a long trajectory costs nothing until then).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from m2rl.runs import atomic_write

ASSETS = Path(__file__).parent
# Nothing may be fetched: inline style and script only, images only as data: URLs.
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"
LOGPROB_DIGITS = 4  # per-token log-probs are rounded in the page (the JSONL keeps them exact)
# Trajectories the page embeds, in the order given, until their JSON reaches this size: a browser opens a page of
# this size in seconds, while a big eval's trajectories (hundreds of long SWE episodes) would not open at all.
# The others keep their row, with a note; trajectories.jsonl holds them whole.
MAX_TRAJECTORY_BYTES = 64_000_000


class ViewerEpisode(TypedDict):
    """One row of the page and the trajectory it opens."""

    id: str  # unique within the page (also the URL fragment that opens it: report.html#ID)
    task_id: str
    sample: int  # index of this sample of the task
    resolved: bool
    score: float  # the grader's score in [0, 1]
    family: str | None  # task family or repository (a training report puts the step here)
    error: str | None  # why the episode failed to run; None when it ran
    exit_reason: str
    reward_breakdown: dict[str, float]
    turns: int
    tokens: int
    wall_s: float | None
    trajectory: dict[str, Any]  # Trajectory.to_dict(); {} when none was kept
    text: NotRequired[str]  # optional: the decoded transcript, shown raw under the turns


def write_report_html(path: Path, title: str, summary: Mapping[str, Any], episodes: Sequence[Mapping[str, Any]],
                      max_trajectory_bytes: int = MAX_TRAJECTORY_BYTES) -> Path:
    """Write the viewer page for `episodes` under the headline numbers `summary` (atomically)."""
    return atomic_write(path, render_report_html(title, summary, episodes, max_trajectory_bytes))


def render_report_html(title: str, summary: Mapping[str, Any], episodes: Sequence[Mapping[str, Any]],
                       max_trajectory_bytes: int = MAX_TRAJECTORY_BYTES) -> str:
    data = {"title": title, "summary": dict(summary),
            "episodes": capped(list(map(page_episode, episodes)), max_trajectory_bytes)}
    css = (ASSETS / "viewer.css").read_text(encoding="utf-8")
    script = (ASSETS / "viewer.js").read_text(encoding="utf-8")
    return "".join([
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n",
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CONTENT_SECURITY_POLICY}\">\n",
        f"<title>{html.escape(title)}</title>\n<style>\n{css}</style>\n</head>\n<body>\n",
        PAGE_BODY,
        f"<script type=\"application/json\" id=\"report-data\">{embed_json(data)}</script>\n",
        f"<script>\n{script}</script>\n</body>\n</html>\n",
    ])


def embed_json(value: Any) -> str:
    """JSON that is safe as the content of a `<script>` element.

    `<`, `>` and `&` become `\\u003c`, `\\u003e`, `\\u0026` (the same string to JSON.parse), so neither
    `</script>` nor `<!--` (which would switch the HTML parser into a state where `</script>` no longer
    closes the tag) can appear, whatever the episodes contain. Non-finite numbers (a forced token's -inf
    log-prob) become null: JSON.parse rejects Infinity and NaN.
    """
    text = json.dumps(finite(value), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for raw, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(raw, escaped)
    return text


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None (containers copied)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


# ----------------------------------------------------------------------------- what the page embeds

REQUIRED_FIELDS = ("id", "task_id", "sample", "resolved", "score", "exit_reason", "turns", "tokens")


def page_episode(episode: Mapping[str, Any]) -> dict[str, Any]:
    """An episode as the page reads it: its fields, its return and tool-error count, the compact trajectory."""
    missing = [k for k in REQUIRED_FIELDS if k not in episode]
    if missing:
        raise ValueError(f"episode {episode.get('id', '?')!r} lacks {missing} (see ViewerEpisode)")
    trajectory = episode.get("trajectory") or {}
    out = {
        "id": str(episode["id"]), "task_id": str(episode["task_id"]), "sample": episode["sample"],
        "resolved": bool(episode["resolved"]), "score": episode["score"], "family": episode.get("family"),
        "error": episode.get("error"), "exit_reason": episode["exit_reason"],
        "reward_breakdown": dict(episode.get("reward_breakdown") or {}), "turns": episode["turns"],
        "tokens": episode["tokens"], "wall_s": episode.get("wall_s"),
        "return": float(sum(trajectory.get("rewards") or [])),
        "tool_errors": tool_error_count(trajectory),
        "trajectory": page_trajectory(trajectory),
    }
    if episode.get("text"):
        out["text"] = episode["text"]
    return out


def capped(episodes: list[dict[str, Any]], max_trajectory_bytes: int) -> list[dict[str, Any]]:
    """The episodes with their trajectories embedded, in order, while their JSON fits `max_trajectory_bytes`;
    each one past that keeps its row, its trajectory replaced by `trajectory_omitted` (its size in bytes)."""
    used = 0
    for episode in episodes:
        size = len(json.dumps(episode["trajectory"], ensure_ascii=False, separators=(",", ":")))
        if used + size > max_trajectory_bytes and episode["trajectory"]:
            episode["trajectory"], episode["trajectory_omitted"] = {}, size
        else:
            used += size
    return episodes


def tool_error_count(trajectory: Mapping[str, Any]) -> int:
    """Tool calls that failed plus errors the env reported (format, unknown tool, schema...), all steps."""
    steps = (trajectory.get("metadata") or {}).get("steps") or []
    return sum(len(s.get("errors") or []) + sum(1 for r in s.get("tool_results") or [] if not r.get("ok", True))
               for s in steps)


def page_trajectory(trajectory: Mapping[str, Any]) -> dict[str, Any]:
    """The trajectory in a compact form: loss mask and policy versions run-length encoded ([value, count]
    pairs: they change only at span borders), log-probs rounded, and the steps' copies of tool outputs
    dropped (the tool messages hold them)."""
    if not trajectory:
        return {}
    metadata = dict(trajectory.get("metadata") or {})
    metadata["steps"] = [slim_step(s) for s in metadata.get("steps") or []]
    return {
        "ids": list(trajectory.get("ids") or []),
        "loss_mask": run_lengths(trajectory.get("loss_mask") or []),
        "logprobs": [round_logprob(x) for x in trajectory.get("logprobs") or []],
        "policy_versions": run_lengths(trajectory.get("policy_versions") or []),
        "spans": [span_dict(s) for s in trajectory.get("spans") or []],
        "rewards": list(trajectory.get("rewards") or []),
        "messages": list(trajectory.get("messages") or []),
        "tools": trajectory.get("tools") or [],
        "metadata": metadata,
    }


def slim_step(step: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in step.items() if k != "responses"}
    out["tool_results"] = [{k: v for k, v in r.items() if k != "output"} for r in step.get("tool_results") or []]
    return out


def span_dict(span: Any) -> dict[str, Any]:
    """A span as {kind, start, end, turn}, from its dict form or a [start, end, kind, turn] list."""
    if isinstance(span, Mapping):
        return {"kind": span["kind"], "start": span["start"], "end": span["end"], "turn": span["turn"]}
    start, end, kind, turn = span
    return {"kind": kind, "start": start, "end": end, "turn": turn}


def run_lengths(values: Sequence[Any]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return out


def round_logprob(x: float) -> float | int | None:
    if not math.isfinite(x):
        return None
    return 0 if x == 0 else round(x, LOGPROB_DIGITS)


PAGE_BODY = """\
<header>
  <h1 id="title"></h1>
  <dl id="summary" class="summary"></dl>
</header>
<section id="list" aria-label="episodes">
  <div class="filters">
    <label>Outcome <select id="f-outcome">
      <option value="">all</option><option value="resolved">resolved</option>
      <option value="unresolved">unresolved</option></select></label>
    <label>Family <select id="f-family"><option value="">all</option></select></label>
    <label>Errors <select id="f-errors">
      <option value="">all</option><option value="any">any error</option>
      <option value="episode">episode failed</option><option value="tool">tool errors</option>
      <option value="none">no errors</option></select></label>
    <label>Task <input id="f-task" type="search" placeholder="task id contains" autocomplete="off"></label>
    <span id="count" class="count"></span><span id="count-resolved" class="count muted"></span>
  </div>
  <div class="table-wrap">
    <table id="episodes"><thead><tr id="columns"></tr></thead><tbody></tbody></table>
  </div>
</section>
<section id="detail" aria-label="trajectory" hidden></section>
<noscript>This page needs JavaScript to show its episodes.</noscript>
"""
