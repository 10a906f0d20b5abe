"""A few episodes of each training step, saved for reading: `runs/<name>/trajectories/step_NNNNNN.jsonl`.

Metrics say how often the policy succeeds; a sample says what it actually wrote. Each line is one episode:

    {"step": 10, "task_id": "python/add/17", "group": 3, "reward": 1.02, "resolved": true,
     "exit_reason": "submitted", "error": null, "reward_breakdown": {"resolved": 1.0, ...},
     "detectors": {}, "tokens": {"total": 412, "sampled": 96, "turns": 2},
     "text": "]~!b[]~b]system\n...", "text_chars": 1530, "trajectory": {"ids": [...], "spans": [...], ...}}

`text` is the whole trajectory decoded with its markers (what the policy read and wrote, token-exact),
cut in the middle beyond `max_chars`. `trajectory` is the episode's `Trajectory` dict for the viewer: all
its per-token lists (ids, loss mask, log-probs, policy versions: small), its spans and rewards, and its
messages and step records with each string cut in the middle to a share of `max_chars` (the steps' copies
of tool outputs are dropped: the tool messages hold them). A step's file is then about
`count * (2 * max_chars + 20 * tokens)` characters.

`write_sample_report` renders the samples of every step so far as `trajectories/report.html`, the
trajectory viewer of `m2rl eval` (evaluation/viewer.py) with the step as the family.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from m2rl.agent.trajectory import Trajectory
from m2rl.evaluation.viewer import ViewerEpisode, slim_step, write_report_html
from m2rl.runs import read_jsonl

REPORT_MAX_BYTES = 32_000_000  # step files the report embeds, newest first (a browser opens 32 MB quickly)


class SampledEpisode(Protocol):
    """What a sample reads of a finished episode (rl.rollout's episode record has these)."""

    task_id: str
    group: int
    trajectory: Trajectory
    exit_reason: str
    error: str | None

    @property
    def reward(self) -> float: ...

    @property
    def resolved(self) -> bool: ...

    @property
    def reward_breakdown(self) -> Mapping[str, float]: ...

    @property
    def detectors(self) -> Mapping[str, int]: ...

    @property
    def sampled_tokens(self) -> int: ...


def pick_episodes(episodes: Sequence[SampledEpisode], count: int) -> list[SampledEpisode]:
    """`count` episodes spread evenly over the batch (so over its groups, which are consecutive); all of
    them when there are fewer."""
    if count <= 0 or not episodes:
        return []
    n = len(episodes)
    if count >= n:
        return list(episodes)
    return [episodes[i * n // count] for i in range(count)]


def clip_middle(text: str, limit: int) -> str:
    """Head and tail of `text` within `limit` characters, with a note of what was cut between them."""
    if len(text) <= limit:
        return text
    note = f"\n[... {len(text) - limit} characters cut ...]\n"
    head = max(0, (limit - len(note)) * 2 // 3)
    tail = max(0, limit - len(note) - head)
    return f"{text[:head]}{note}{text[len(text) - tail:] if tail else ''}"


def episode_record(episode: SampledEpisode, tokenizer: Any, step: int, max_chars: int) -> dict[str, Any]:
    """One JSON-ready line of a sample (see the module docstring)."""
    trajectory = episode.trajectory
    text = tokenizer.decode(list(trajectory.ids))
    return {
        "step": step,
        "task_id": episode.task_id,
        "group": episode.group,
        "reward": episode.reward,
        "resolved": episode.resolved,
        "exit_reason": episode.exit_reason,
        "error": episode.error,
        "reward_breakdown": dict(episode.reward_breakdown),
        "detectors": dict(episode.detectors),
        "tokens": {"total": len(trajectory.ids), "sampled": episode.sampled_tokens, "turns": trajectory.num_turns},
        "text": clip_middle(text, max_chars),
        "text_chars": len(text),
        "trajectory": sample_trajectory(trajectory, max_chars),
    }


def sample_trajectory(trajectory: Trajectory, max_chars: int) -> dict[str, Any]:
    """The trajectory dict with every string of its messages, tools and step records cut to a share of
    `max_chars` (one message's worth), and without the steps' copies of tool outputs."""
    record = trajectory.to_dict()
    limit = max(100, max_chars // max(1, len(trajectory.messages)))
    record["messages"] = clip_strings(record["messages"], limit)
    record["tools"] = clip_strings(record["tools"], limit)
    metadata = dict(record["metadata"])
    metadata["steps"] = [clip_strings(slim_step(s), limit) for s in metadata.get("steps") or []]
    record["metadata"] = metadata
    return record


def clip_strings(value: Any, limit: int) -> Any:
    """`value` with every string in it cut by `clip_middle` to `limit` characters (containers copied)."""
    if isinstance(value, str):
        return clip_middle(value, limit)
    if isinstance(value, Mapping):
        return {k: clip_strings(v, limit) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clip_strings(v, limit) for v in value]
    return value


def trajectory_sample(episodes: Sequence[SampledEpisode], tokenizer: Any, step: int, count: int,
                      max_chars: int) -> list[dict[str, Any]]:
    """The records saved for one training step: `count` episodes (0: none), each text within `max_chars`."""
    return [episode_record(e, tokenizer, step, max_chars) for e in pick_episodes(episodes, count)]


def write_sample_report(directory: Path, max_bytes: int = REPORT_MAX_BYTES) -> Path | None:
    """`directory/report.html`: the viewer over the samples of every step file in `directory`, newest
    first until `max_bytes` of step files (the summary says how many older steps were left out).
    Nothing is written when there is no sample yet."""
    files = sorted(directory.glob("step_*.jsonl"), reverse=True)
    kept: list[Path] = []
    size = 0
    for path in files:
        size += path.stat().st_size
        if kept and size > max_bytes:
            break
        kept.append(path)
    records = [r for path in reversed(kept) for r in read_jsonl(path)]
    if not records:
        return None
    episodes = [viewer_episode(r, n) for n, r in enumerate(records)]
    steps = sorted({r["step"] for r in records})
    resolved = sum(e["resolved"] for e in episodes)
    summary: dict[str, Any] = {
        "steps": f"{steps[0]}\u2013{steps[-1]}" if len(steps) > 1 else str(steps[0]),
        "episodes": len(episodes),
        "resolved": resolved,
        "resolved rate": resolved / len(episodes),
        "mean return": sum(float(r["reward"]) for r in records) / len(records),
        "failed episodes": sum(1 for e in episodes if e["error"]),
    }
    if len(kept) < len(files):
        summary["older steps left out"] = len(files) - len(kept)
    return write_report_html(directory / "report.html", f"Training trajectories: {directory.parent.name}",
                             summary, episodes)


def viewer_episode(record: Mapping[str, Any], index: int) -> ViewerEpisode:
    """A sample record as the viewer's episode; the step is its family, so the family filter picks steps."""
    trajectory = record.get("trajectory") or {}  # records written before the viewer have only `text`
    steps = (trajectory.get("metadata") or {}).get("steps") or []
    verdicts = [s["verification"] for s in steps if s.get("verification")]
    score = float(verdicts[-1].get("score", 0.0)) if verdicts else float(bool(record["resolved"]))
    return {
        "id": f"{record['step']}-{index}", "task_id": record["task_id"], "sample": record["group"],
        "resolved": bool(record["resolved"]), "score": score, "family": f"step {record['step']}",
        "error": record.get("error"), "exit_reason": record.get("exit_reason", ""),
        "reward_breakdown": dict(record.get("reward_breakdown") or {}), "turns": record["tokens"]["turns"],
        "tokens": record["tokens"]["total"], "wall_s": (trajectory.get("metadata") or {}).get("elapsed_s"),
        "trajectory": trajectory, "text": record.get("text", ""),
    }
