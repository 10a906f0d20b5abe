"""What an eval writes per episode: one `EpisodeRecord` line in results.jsonl, one trajectory line in
trajectories.jsonl.

    runs/<name>/results.jsonl       one EpisodeRecord per finished episode (see the class for each field)
    runs/<name>/trajectories.jsonl  the episode's token-exact Trajectory (agent/trajectory.py's JSONL format:
                                    `load_jsonl` reads it), its metadata also holding task_id, sample and key

Both files are appended to, one fsynced line per finished episode (m2rl.runs.append_jsonl), the
trajectory first: a results line is the commit record of its episode, so a crash between the two leaves
a trajectory without a result, which a resumed eval drops and runs again (`EvalFiles.load`). Once every
episode is in, the runner rewrites both files in task order, so two evals of the same settings give the
same files line for line (timings aside).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m2rl.agent.trajectory import Trajectory
from m2rl.rl.rollout import ScoredTrajectory
from m2rl.runs import append_text, atomic_write, read_jsonl

RESULTS_FILE = "results.jsonl"
TRAJECTORIES_FILE = "trajectories.jsonl"
INVALID_CALL_ERRORS = ("unknown_tool", "schema")  # a call the env could not run: no tool_results entry


def episode_key(task_id: str, sample: int) -> str:
    """The id of an episode within an eval: the trajectory's key and the viewer's row id."""
    return f"{task_id}#{sample}"


@dataclass(frozen=True)
class TokenCounts:
    prompt: int = 0  # tokens of the final context the policy did not sample: the prompt and the env's replies
    sampled: int = 0  # tokens the policy sampled
    total: int = 0  # prompt + sampled: the final context
    billed_input: int = 0  # prompt tokens sent over all turns (each turn resends the context): what an API bills

    @classmethod
    def of(cls, trajectory: Trajectory) -> TokenCounts:
        sampled = sum(trajectory.loss_mask)
        billed = sum(span.start for span in trajectory.sampled_spans())
        return cls(len(trajectory.ids) - sampled, sampled, len(trajectory.ids), billed)


@dataclass(frozen=True)
class EpisodeRecord:
    """One episode of an eval, as results.jsonl holds it."""

    task_id: str
    sample: int  # 0 .. samples-1
    resolved: bool  # the grader's verdict; False for a failed episode
    score: float  # the grader's score in [0, 1] (partial credit where the task set gives it)
    reward: float  # the episode's return under the env's RewardSpec
    reward_breakdown: dict[str, float]  # {component: the episode's sum}
    turns: int  # sampled segments
    tokens: TokenCounts
    tool_calls: int  # calls the policy wrote, the ones the env could not run (unknown tool, bad arguments) too
    tool_errors: int  # of those: the ones that failed or could not run
    format_errors: int  # turns whose text could not be read as tool calls, and other format errors
    wall_s: float  # wall time of the episode, env and policy together
    policy_version: int  # the weights that sampled it (a checkpoint's step; 0 for a fixed model)
    exit_reason: str  # terminated | truncated | max_turns | context_limit | time_limit | error | ...
    error: str | None  # why the episode failed to run (a sandbox, a tool bug); None when it ran
    seed: int  # its sampling seed (evaluation/seeds.py)
    family: str  # the task family (python, shell, swe, ...)
    kind: str  # the task kind within the family (for SWE: the repository)
    repository: str | None = None  # SWE tasks: the repository; None otherwise
    trajectory: str = ""  # its key in trajectories.jsonl (episode_key)
    # The server's own token counts summed over the episode's requests (prompt_tokens, completion_tokens, ...),
    # where it reports them (hosted chat APIs): what the provider bills. Empty otherwise.
    server_usage: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        return episode_key(self.task_id, self.sample)

    @property
    def group(self) -> str:
        """What the report breaks results down by: the repository, else family/kind."""
        return self.repository or f"{self.family}/{self.kind}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EpisodeRecord:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["tokens"] = TokenCounts(**data.get("tokens", {}))
        return cls(**values)


def episode_record(scored: ScoredTrajectory, sample: int, *, family: str, kind: str, wall_s: float, seed: int,
                   policy_version: int, server_usage: Mapping[str, int] | None = None) -> EpisodeRecord:
    """The record of a finished episode (a failed one too: resolved False, no tokens)."""
    steps = scored.episode.steps
    invalid = sum(step.error_count(*INVALID_CALL_ERRORS) for step in steps)
    versions = [v for v, m in zip(scored.trajectory.policy_versions, scored.trajectory.loss_mask) if m]
    verification = scored.episode.verification
    return EpisodeRecord(
        task_id=scored.task_id,
        sample=sample,
        resolved=scored.resolved,
        score=float(verification.score) if verification is not None else 0.0,
        reward=scored.reward,
        reward_breakdown=dict(scored.reward_breakdown),
        turns=scored.trajectory.num_turns,
        tokens=TokenCounts() if scored.failed else TokenCounts.of(scored.trajectory),
        tool_calls=sum(len(step.tool_results) for step in steps) + invalid,
        tool_errors=sum(not r.ok for step in steps for r in step.tool_results) + invalid,
        format_errors=sum(step.error_count("format") for step in steps),
        wall_s=round(wall_s, 3),
        policy_version=max(versions) if versions else policy_version,
        exit_reason=scored.exit_reason,
        error=scored.error,
        seed=seed,
        family=family,
        kind=kind,
        repository=kind if family == "swe" else None,
        trajectory=episode_key(scored.task_id, sample),
        server_usage=dict(server_usage or {}),
    )


def trajectory_line(trajectory: Trajectory, task_id: str, sample: int) -> dict[str, Any]:
    """The trajectory as trajectories.jsonl holds it: Trajectory.to_dict() with the episode named in metadata."""
    data = trajectory.to_dict()
    data["metadata"] = {**data["metadata"], "task_id": task_id, "sample": sample,
                        "key": episode_key(task_id, sample)}
    return data


@dataclass
class EvalFiles:
    """The per-episode files of one eval directory."""

    directory: Path
    records: dict[str, EpisodeRecord] = field(default_factory=dict)  # by key, as loaded or appended

    @property
    def results_path(self) -> Path:
        return self.directory / RESULTS_FILE

    @property
    def trajectories_path(self) -> Path:
        return self.directory / TRAJECTORIES_FILE

    def load(self, retry_errors: bool = False) -> dict[str, EpisodeRecord]:
        """The finished episodes on disk, after repairing what a crash may have left: a torn last line, a
        trajectory whose result never came, duplicates (the last one wins). `retry_errors`: failed episodes
        are dropped too, so they run again."""
        records = {}
        for data in read_jsonl(self.results_path):
            record = EpisodeRecord.from_dict(data)
            if not (retry_errors and record.error is not None):
                records[record.key] = record
        trajectories = {t["metadata"]["key"]: t for t in read_jsonl(self.trajectories_path)
                        if t.get("metadata", {}).get("key") in records}
        # Appending after a torn line would glue the next line onto it: rewrite both files clean.
        self.rewrite(list(records.values()), list(trajectories.values()))
        self.records = records
        return records

    def append(self, record: EpisodeRecord, trajectory: Mapping[str, Any]) -> None:
        """One finished episode: its trajectory, then its result (the commit record), each one fsynced line."""
        append_text(self.trajectories_path, _line(trajectory))
        append_text(self.results_path, _line(record.to_dict()))
        self.records[record.key] = record

    def rewrite(self, records: Iterable[EpisodeRecord], trajectories: Iterable[Mapping[str, Any]]) -> None:
        atomic_write(self.trajectories_path, "".join(_line(t) for t in trajectories))
        atomic_write(self.results_path, "".join(_line(r.to_dict()) for r in records))

    def trajectories(self) -> dict[str, dict[str, Any]]:
        """The saved trajectory dicts by key."""
        return {t["metadata"]["key"]: t for t in read_jsonl(self.trajectories_path)}


def _line(data: Mapping[str, Any]) -> str:
    # allow_nan: a -inf log-prob of a forced token is legal in a trajectory (Trajectory.to_json does the same)
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"


def read_records(directory: Path) -> list[EpisodeRecord]:
    """The records of a finished (or partial) eval directory, as written."""
    return [EpisodeRecord.from_dict(d) for d in read_jsonl(directory / RESULTS_FILE)]
