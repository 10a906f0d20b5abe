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
        Run.create("../escape", root=tmp_path, trackers=())


def test_progress_advances() -> None:
    with runs.progress("work", total=3, disable=True) as advance:
        for _ in range(3):
            advance(status="ok")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_every_run_file_honours_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    from m2rl.rl.checkpoint import save_checkpoint
    from torch import nn

    old = os.umask(umask)
    try:
        with Run.create("perm", root=tmp_path, config={"lr": 0.1}) as run:
            run.log_metrics(0, {"loss": 1.0})
            run.write_file("summary.json", "{}")
            run.logger.info("line")
            save_checkpoint(run.directory / "checkpoints", 1, nn.Linear(2, 2))
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "perm").rglob("*") if p.is_file()]
    assert len(files) >= 8
    assert {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files} == {
        str(p.relative_to(tmp_path)): oct(mode) for p in files
    }


def test_a_run_name_in_use_is_refused(tmp_path: Path) -> None:
    with Run.create("r1", root=tmp_path, config={"lr": 0.1}, trackers=()) as run:
        run.log_metrics(0, {"loss": 1.0})
    with pytest.raises(runs.RunError, match=r"run directory .*r1 already exists; pass resume=true to continue it "
                                            r"or choose another name="):
        Run.create("r1", root=tmp_path, config={"lr": 0.2}, trackers=())
    assert yaml.safe_load((tmp_path / "r1" / "config.yaml").read_text()) == {"lr": 0.1}  # untouched
    with Run.open("r1", root=tmp_path, trackers=()) as run:
        run.log_metrics(1, {"loss": 0.5})
    assert [r["step"] for r in read_jsonl(tmp_path / "r1" / "metrics.jsonl")] == [0, 1]
    with pytest.raises(runs.RunError, match="no run directory"):
        Run.open("r2", root=tmp_path, trackers=())
    (tmp_path / "empty").mkdir()
    Run.create("empty", root=tmp_path, trackers=()).close()  # an empty folder is free to use


def test_default_run_names_never_collide(tmp_path: Path) -> None:
    first = runs.default_run_name("train", tmp_path)
    (tmp_path / first).mkdir()
    second = runs.default_run_name("train", tmp_path)
    assert second != first and second.startswith(first)
