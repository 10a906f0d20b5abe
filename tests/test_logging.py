"""Logging: one `m2rl` logger tree into run.log, no silently swallowed errors, experiment trackers,
trajectory samples."""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from m2rl.cli import main
from m2rl.config import ConfigError, load_config
from m2rl.runs import Run, read_jsonl

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ run.log


def test_records_of_every_package_reach_run_log(tmp_path: Path) -> None:
    with Run.create("r", root=tmp_path, trackers=()) as run:
        logging.getLogger("m2rl.rl.rollout").warning("episode 3 of task t failed: boom")
        logging.getLogger("m2rl.envs.tool_env").info("an info record of the env")
        logging.getLogger("elsewhere").warning("not ours")  # other libraries' records stay out
        run.logger.info("a note of the run")
    text = (tmp_path / "r" / "run.log").read_text()
    assert "WARNING m2rl.rl.rollout: episode 3 of task t failed: boom" in text
    assert "INFO m2rl.envs.tool_env: an info record of the env" in text
    assert "a note of the run" in text and "not ours" not in text
    assert not [h for h in logging.getLogger("m2rl").handlers if isinstance(h, logging.FileHandler)]  # detached


def test_a_failed_run_leaves_its_traceback_in_run_log(tmp_path: Path) -> None:
    def fail() -> None:
        raise RuntimeError("the learner exploded")

    with pytest.raises(RuntimeError), Run.create("r", root=tmp_path, trackers=()):
        fail()
    text = (tmp_path / "r" / "run.log").read_text()
    assert "ERROR m2rl.runs: run failed" in text
    assert "Traceback (most recent call last)" in text and "in fail" in text
    assert "RuntimeError: the learner exploded" in text


def test_console_shows_library_warnings_as_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from m2rl.cli import console_logging

    tree = logging.getLogger("m2rl")
    handlers_before = list(tree.handlers)
    with console_logging(debug=False):
        try:
            raise ValueError("sandbox gone")
        except ValueError:
            logging.getLogger("m2rl.rl.rollout").warning("episode failed\nsecond line", exc_info=True)
        logging.getLogger("m2rl.runs").warning("interrupted (the command says so itself)")
        logging.getLogger("m2rl.rl.rollout").info("progress detail")
    logging.getLogger("m2rl.rl.rollout").warning("after the command: not on this console")
    assert capsys.readouterr().err == "m2rl: warning: episode failed second line\n"
    assert tree.handlers == handlers_before


# ------------------------------------------------------------------------------------ swallowed errors


def _package_files() -> list[Path]:
    skip = {".venv", "tests", "build", ".git"}
    return [p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts)]


def _silent_broad_handlers(path: Path) -> list[int]:
    """Lines of `except Exception:` (or BaseException) blocks that neither log, re-raise nor bind the error."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    silent = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ExceptHandler) or node.name is not None:
            continue
        if not (isinstance(node.type, ast.Name) and node.type.id in ("Exception", "BaseException")):
            continue
        logs = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                   and isinstance(n.func.value, ast.Name) and n.func.value.id in ("logger", "log")
                   for n in ast.walk(node))
        raises = any(isinstance(n, ast.Raise) for n in ast.walk(node))
        if not (logs or raises):
            silent.append(node.lineno)
    return silent


def test_no_broad_except_swallows_an_error_silently() -> None:
    # sandboxes/executor.py runs inside the sandbox, where no m2rl logger exists: its handlers report
    # back to the host through its own protocol instead.
    exempt = {"sandboxes/executor.py"}
    silent = {str(p.relative_to(REPO)): lines for p in _package_files()
              if str(p.relative_to(REPO)) not in exempt and (lines := _silent_broad_handlers(p))}
    assert silent == {}, f"broad except blocks without a log record: {silent}"


def test_a_failing_env_close_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    from m2rl.rl.rollout import EpisodeRunner

    class BrokenEnv:
        def close(self) -> None:
            raise OSError("sandbox already dead")

    runner = EpisodeRunner(BrokenEnv, 2, tokenizer=None)
    with caplog.at_level(logging.DEBUG, logger="m2rl"):
        runner.close()
    assert [r.name for r in caplog.records] == ["m2rl.rl.rollout", "m2rl.rl.rollout"]
    assert "sandbox already dead" in caplog.text


# ------------------------------------------------------------------------------------------ trackers


def test_tensorboard_tracker_writes_the_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with Run.create("tb", root=tmp_path, trackers=["tensorboard"]) as run:
        run.log_metrics(1, {"train/reward_mean": 0.5, "note": "text", "flag": True, "bad": float("nan")})
        run.log_metrics(2, {"train/reward_mean": 0.75})
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    assert events.Tags()["scalars"] == ["train/reward_mean"]  # text, bools and non-finite values left out
    assert [(e.step, e.value) for e in events.Scalars("train/reward_mean")] == [(1, 0.5), (2, 0.75)]


def test_trackers_are_chosen_in_the_train_config() -> None:
    from m2rl.rl.trainer import TrainConfig

    assert load_config(TrainConfig).logging.trackers == ["tensorboard"]
    assert load_config(TrainConfig, None, ["logging.trackers=[]"]).logging.trackers == []
    with pytest.raises(ConfigError, match=r"config key 'logging.trackers\[0\]'.*expected one of"):
        load_config(TrainConfig, None, ["logging.trackers=[comet]"])


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_missing_tracker_package_is_one_line_before_the_run_exists(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        Run.create("w", root=tmp_path, trackers=["wandb"])
    assert str(info.value).startswith("logging.trackers: wandb needs the 'wandb' package (pip install wandb)")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "w").exists()


class FakeTrackerModules:
    """TEST DOUBLE for wandb, mlflow and trackio (not installed here; tensorboard is tested for real above):
    module objects that record how m2rl calls them, put in sys.modules in place of the real packages."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, Any]] = []
        calls = self.calls

        class WandbRun:
            def log(self, data: dict[str, float], step: int) -> None:
                calls.append(("wandb.log", (step, data)))

            def finish(self) -> None:
                calls.append(("wandb.finish", None))

        wandb = types.ModuleType("wandb")
        wandb.init = lambda **kwargs: calls.append(("wandb.init", kwargs)) or WandbRun()  # type: ignore[attr-defined]

        trackio = types.ModuleType("trackio")
        trackio.init = lambda **kwargs: calls.append(("trackio.init", kwargs))  # type: ignore[attr-defined]
        trackio.log = lambda data, step: calls.append(("trackio.log", (step, data)))  # type: ignore[attr-defined]
        trackio.finish = lambda: calls.append(("trackio.finish", None))  # type: ignore[attr-defined]

        class MlflowClient:
            def __init__(self, tracking_uri: str) -> None:
                calls.append(("mlflow.client", tracking_uri))

            def get_experiment_by_name(self, name: str) -> None:
                return None

            def create_experiment(self, name: str) -> str:
                calls.append(("mlflow.create_experiment", name))
                return "0"

            def create_run(self, experiment_id: str, run_name: str) -> Any:
                calls.append(("mlflow.create_run", run_name))
                return types.SimpleNamespace(info=types.SimpleNamespace(run_id="run-1"))

            def log_batch(self, run_id: str, metrics: list[Any] = (), params: list[Any] = ()) -> None:  # type: ignore[assignment]
                for m in metrics:
                    calls.append(("mlflow.metric", (m.step, m.key, m.value)))

            def set_terminated(self, run_id: str) -> None:
                calls.append(("mlflow.terminated", run_id))

        mlflow = types.ModuleType("mlflow")
        entities = types.ModuleType("mlflow.entities")
        entities.Metric = lambda key, value, timestamp, step: types.SimpleNamespace(  # type: ignore[attr-defined]
            key=key, value=value, step=step)
        entities.Param = lambda key, value: (key, value)  # type: ignore[attr-defined]
        tracking = types.ModuleType("mlflow.tracking")
        tracking.MlflowClient = MlflowClient  # type: ignore[attr-defined]
        for name, module in {"wandb": wandb, "trackio": trackio, "mlflow": mlflow,
                             "mlflow.entities": entities, "mlflow.tracking": tracking}.items():
            monkeypatch.setitem(sys.modules, name, module)


def test_optional_trackers_run_offline_under_the_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTrackerModules(monkeypatch)
    with Run.create("all", root=tmp_path, config={"lr": 0.1}, trackers=["wandb", "mlflow", "trackio"],
                    project="proj") as run:
        run.log_metrics(3, {"loss": 1.5, "note": "x"})
    calls = {name: args for name, args in fake.calls if name.endswith(("init", "client"))}
    assert calls["wandb.init"] == {"project": "proj", "name": "all", "dir": str(tmp_path / "all"),
                                   "mode": "offline", "config": {"lr": 0.1}}
    assert calls["mlflow.client"] == (tmp_path / "all" / "mlflow").resolve().as_uri()  # a file store in the run
    assert calls["trackio.init"] == {"project": "proj", "name": "all", "config": {"lr": 0.1}}  # no space_id: local
    assert ("wandb.log", (3, {"loss": 1.5})) in fake.calls
    assert ("mlflow.metric", (3, "loss", 1.5)) in fake.calls
    assert ("trackio.log", (3, {"loss": 1.5})) in fake.calls
    assert {"wandb.finish", "mlflow.terminated", "trackio.finish"} <= {name for name, _ in fake.calls}


# ---------------------------------------------------------------------------------- trajectory samples


@dataclass
class FinishedEpisode:
    """The fields of rl.rollout's episode record that a trajectory sample reads (a plain stand-in, so this
    test of a pure function does not depend on how the rollout builds its records)."""

    task_id: str
    group: int
    trajectory: Any
    reward: float
    resolved: bool
    exit_reason: str = "submitted"
    error: str | None = None
    reward_breakdown: dict[str, float] = field(default_factory=dict)
    detectors: dict[str, int] = field(default_factory=dict)

    @property
    def sampled_tokens(self) -> int:
        return int(sum(self.trajectory.loss_mask))


def _episode(task: str, group: int, text: str, tokenizer: Any, reward: float = 1.0) -> FinishedEpisode:
    from m2rl.agent.trajectory import Trajectory

    trajectory = Trajectory()
    ids = tokenizer.encode(text)
    trajectory.append_prompt(ids[:2])
    trajectory.append_sampled(ids[2:], [-0.5] * len(ids[2:]), 0)
    return FinishedEpisode(task, group, trajectory, reward=reward, resolved=reward > 0,
                           reward_breakdown={"resolved": reward})


def test_trajectory_sample_spreads_over_groups_and_bounds_the_text() -> None:
    from m2rl.model import M2Tokenizer
    from m2rl.rl.trajectory_samples import trajectory_sample

    tokenizer = M2Tokenizer.tiny()
    episodes = [_episode(f"t{g}", g, f"answer {g}-{i} " + "x" * (600 if g == 2 else 5), tokenizer)
                for g in range(4) for i in range(2)]
    records = trajectory_sample(episodes, tokenizer, step=7, count=4, max_chars=200)
    assert [(r["task_id"], r["group"]) for r in records] == [("t0", 0), ("t1", 1), ("t2", 2), ("t3", 3)]
    first = records[0]
    assert first["step"] == 7 and first["reward_breakdown"] == {"resolved": 1.0} and first["resolved"]
    assert first["text"] == tokenizer.decode(episodes[0].trajectory.ids)
    assert first["tokens"] == {"total": len(episodes[0].trajectory.ids),
                               "sampled": len(episodes[0].trajectory.ids) - 2, "turns": 1}
    long = records[2]
    assert len(long["text"]) <= 200 < long["text_chars"] and "characters cut" in long["text"]
    assert trajectory_sample(episodes, tokenizer, step=7, count=0, max_chars=200) == []
    assert len(trajectory_sample(episodes, tokenizer, step=7, count=50, max_chars=200)) == 8


@pytest.mark.bwrap
def test_training_writes_samples_and_library_records_to_the_run(tmp_path: Path) -> None:
    small = ["model.init=null", "steps=2", "eval.every=0", "eval.num_tasks=2", "rollout.num_envs=4",
             "rollout.group_size=2", "rollout.max_new_tokens=12", "rollout.batch_warmup.start_size=4",
             "rollout.batch_warmup.target_size=4", "rollout.batch_warmup.multiple_of=2",
             "rollout.dynamic_sampling=false", "env.max_steps=2", "env.num_train_tasks=8", "checkpoint_every=0",
             "threads=1", "logging.trajectory_samples=3", "logging.trajectory_max_chars=500"]
    assert main(["train", *small, f"run_root={tmp_path}", "name=t"]) == 0
    run = tmp_path / "t"
    for step in (1, 2):
        records = read_jsonl(run / "trajectories" / f"step_{step:06d}.jsonl")
        assert len(records) == 3 and all(r["step"] == step for r in records)
        assert all(len(r["text"]) <= 500 and r["text"].startswith("]~!b[") for r in records)
        assert all(r["task_id"].startswith("python/") and r["tokens"]["sampled"] > 0 for r in records)
        assert all(r["trajectory"]["ids"] and len(r["trajectory"]["ids"]) == r["tokens"]["total"] for r in records)
    report = (run / "trajectories" / "report.html").read_text()  # the viewer over both steps
    assert '"family":"step 1"' in report and '"family":"step 2"' in report
    log = (run / "run.log").read_text()
    assert "INFO m2rl.runs: training t for 2 steps" in log
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and json.loads((run / "summary.json").read_text())["steps"] == 2
