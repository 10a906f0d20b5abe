"""A few episodes of each training step, saved for reading: `runs/<name>/trajectories/step_NNNNNN.jsonl`.

Metrics say how often the policy succeeds; a sample says what it actually wrote. Each line is one episode:

    {"step": 10, "task_id": "python/add/17", "group": 3, "reward": 1.02, "resolved": true,
     "exit_reason": "submitted", "error": null, "reward_breakdown": {"resolved": 1.0, ...},
     "detectors": {}, "tokens": {"total": 412, "sampled": 96, "turns": 2},
     "text": "]~!b[]~b]system\n...", "text_chars": 1530}

`text` is the whole trajectory decoded with its markers (what the policy read and wrote, token-exact),
cut in the middle beyond `max_chars`, so a step's file is at most about `count * max_chars` characters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from m2rl.agent.trajectory import Trajectory


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
    }


def trajectory_sample(episodes: Sequence[SampledEpisode], tokenizer: Any, step: int, count: int,
                      max_chars: int) -> list[dict[str, Any]]:
    """The records saved for one training step: `count` episodes (0: none), each text within `max_chars`."""
    return [episode_record(e, tokenizer, step, max_chars) for e in pick_episodes(episodes, count)]
