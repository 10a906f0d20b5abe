from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from m2rl import runs
from m2rl.runs import Run, atomic_write, read_jsonl


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, "old")
    atomic_write(target, "new contents")
    assert target.read_text() == "new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp files left


def test_atomic_write_crash_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, "old")

    def crash(src: str, dst: str) -> None:
        raise OSError("disk died during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk died"):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_read_jsonl_skips_torn_last_line_only(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_run_writes_config_metrics_tensorboard_and_log(tmp_path: Path) -> None:
    with Run.create("demo", root=tmp_path, config={"lr": 0.1, "nested": {"a": [1, 2]}}) as run:
        run.log_metrics(0, {"loss": 1.5, "note": "text"})
        run.log_metrics(1, {"loss": 1.25})
        run.logger.info("hello from the test")
    directory = tmp_path / "demo"
    assert yaml.safe_load((directory / "config.yaml").read_text()) == {"lr": 0.1, "nested": {"a": [1, 2]}}
    records = read_jsonl(directory / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(0, 1.5), (1, 1.25)]
    assert "hello from the test" in (directory / "run.log").read_text()
    events = list((directory / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_run_name_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bad run name"):
        Run.create("../escape", root=tmp_path, tensorboard=False)


def test_progress_advances() -> None:
    with runs.progress("work", total=3, disable=True) as advance:
        for _ in range(3):
            advance(status="ok")
