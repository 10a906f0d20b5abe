"""The curriculum's own state: what a checkpoint saves and how a resumed run (perhaps with another task pool)
gets it back."""

from __future__ import annotations

import pytest
from m2rl.rl.curriculum import DifficultyCurriculum


def test_state_round_trips_and_a_changed_pool_resumes_without_strict() -> None:
    cur = DifficultyCurriculum(["a", "b"])
    for task, score in (("a", 1.0), ("a", 0.0), ("b", 1.0)):
        cur.update(task, score)
    same = DifficultyCurriculum(["a", "b"])
    same.load_state_dict(cur.state_dict())
    assert same.state_dict() == cur.state_dict()
    grown = DifficultyCurriculum(["a", "c"])  # the run resumed with another pool: b left, c came
    with pytest.raises(ValueError, match="lacks 1 tasks"):
        grown.load_state_dict(cur.state_dict())
    grown.load_state_dict(cur.state_dict(), strict=False)
    assert grown.state_dict() == {"attempts": {"a": 2.0, "c": 0.0}, "successes": {"a": 1.0, "c": 0.0},
                                  "raw_attempts": {"a": 2, "c": 0}}
