"""benchmarks/rollout.py: its --smoke run (the real stack: tiny M2 warm start, Python env in bubblewrap) and its table."""

from __future__ import annotations

import json

import pytest
from m2rl.benchmarks.rollout import Row, format_table, main


def test_the_table_compares_each_row_with_sync_at_the_same_number_of_envs() -> None:
    rows = [Row(2, "sync", 10, 60.0, 0.4, 0, 0), Row(2, "async k=1", 25, 60.0, 0.9, 1, 2),
            Row(4, "async k=1", 8, 30.0, 0.5, 1, 0)]
    lines = format_table(rows).splitlines()
    assert lines[0].startswith("| envs | mode |") and len(lines) == 5
    assert lines[2] == "| 2 | sync | 10 | 60.0 | 10.0 | 40% | 0 | 0 | 1.00x |"
    assert lines[3] == "| 2 | async k=1 | 25 | 60.0 | 25.0 | 90% | 1 | 2 | 2.50x |"
    assert lines[4].endswith("| - |")  # no sync row with 4 envs


@pytest.mark.bwrap
def test_the_smoke_run_measures_sync_and_async(capsys: pytest.CaptureFixture[str]) -> None:
    rows = main(["--smoke"])
    assert [r.mode for r in rows] == ["sync", "async k=1"]
    for row in rows:
        assert row.trajectories == 2 and row.seconds > 0 and 0 <= row.busy <= 1
    assert rows[1].staleness_max <= 1
    out = capsys.readouterr().out
    assert out.startswith("# ") and "| 2 | async k=1 |" in out
    assert json.loads(out.strip().splitlines()[-1])["benchmark"] == "rollout"
