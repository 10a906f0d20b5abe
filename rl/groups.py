"""Group assembly: the G episodes of one task, handed to the learner only once all G have finished.

Advantages are relative to the group (rl/advantages.py), so a group is useful only whole. `GroupAssembler`
opens a group when its task is admitted, takes each finished episode into its slot, and returns the
`ScoredGroup` when the last slot fills. A group can be discarded (its episodes too stale to train on): its
later episodes are then ignored. `ScoredGroup.to_dict`/`from_dict` carry finished groups across a checkpoint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from m2rl.agent.trajectory import Trajectory
from m2rl.rl.rollout import ScoredTrajectory, scored_trajectory
from m2rl.rl.staleness import oldest_version


@dataclass
class ScoredGroup:
    """The G finished episodes of one task, in sample order."""

    group_id: int  # admission order: the orchestrator's count of groups opened
    task_id: str
    episodes: list[ScoredTrajectory]
    start_version: int  # the generator's version when the group was admitted

    @property
    def oldest_version(self) -> int | None:
        """The oldest version among all its sampled tokens (None: no episode sampled anything)."""
        olds = [v for e in self.episodes if (v := oldest_version(e.trajectory.policy_versions)) is not None]
        return min(olds) if olds else None

    def numbered(self, group: int) -> list[ScoredTrajectory]:
        """Its episodes as members of group `group` of a batch (`ScoredTrajectory.group`)."""
        return [dataclasses.replace(e, group=group) for e in self.episodes]

    def to_dict(self) -> dict[str, Any]:
        return {"group_id": self.group_id, "task_id": self.task_id, "start_version": self.start_version,
                "episodes": [{"trajectory": e.trajectory.to_dict(), "error": e.error} for e in self.episodes]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScoredGroup:
        episodes = []
        for record in d["episodes"]:
            episode = scored_trajectory(d["task_id"], 0, Trajectory.from_dict(record["trajectory"]))
            if record.get("error") is not None:
                episode = dataclasses.replace(episode, exit_reason="error", error=str(record["error"]))
            episodes.append(episode)
        return cls(int(d["group_id"]), str(d["task_id"]), episodes, int(d["start_version"]))


@dataclass
class _OpenGroup:
    task_id: str
    start_version: int
    slots: list[ScoredTrajectory | None]


@dataclass
class GroupAssembler:
    group_size: int
    next_id: int = 0
    open: dict[int, _OpenGroup] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")

    def start(self, task_id: str, version: int) -> int:
        """Open a group for `task_id`; returns its id (slots 0..G-1 are then filled by `finish`)."""
        group_id = self.next_id
        self.next_id += 1
        self.open[group_id] = _OpenGroup(task_id, version, [None] * self.group_size)
        return group_id

    def finish(self, group_id: int, index: int, episode: ScoredTrajectory) -> ScoredGroup | None:
        """Put a finished episode in its slot; the whole group once its last slot is filled, else None.
        An episode of a discarded group is ignored (None)."""
        group = self.open.get(group_id)
        if group is None:
            return None
        if group.slots[index] is not None:
            raise ValueError(f"slot {index} of group {group_id} is already filled")
        group.slots[index] = dataclasses.replace(episode, task_id=group.task_id)
        if any(slot is None for slot in group.slots):
            return None
        del self.open[group_id]
        return ScoredGroup(group_id, group.task_id, [e for e in group.slots if e is not None], group.start_version)

    def discard(self, group_id: int) -> str | None:
        """Forget an open group; returns its task id (None if it was not open)."""
        group = self.open.pop(group_id, None)
        return None if group is None else group.task_id

    def oldest(self, group_id: int) -> int | None:
        """The oldest version among the open group's finished episodes (None: none sampled anything yet)."""
        olds = [v for e in self.open[group_id].slots if e is not None
                and (v := oldest_version(e.trajectory.policy_versions)) is not None]
        return min(olds) if olds else None

    def task_of(self, group_id: int) -> str:
        return self.open[group_id].task_id

    def is_open(self, group_id: int) -> bool:
        return group_id in self.open

    def __len__(self) -> int:
        return len(self.open)
