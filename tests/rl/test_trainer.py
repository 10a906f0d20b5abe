"""The training loop end to end on the real stack: tiny M2 policy, Python env in bubblewrap, CISPO."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from m2rl.config import load_config
from m2rl.rl.checkpoint import latest_checkpoint
from m2rl.runs import read_jsonl as read_metrics
from m2rl.agent.trajectory import Trajectory
from m2rl.rewards.episode import Episode, StepInfo, ToolResultInfo, Verification
from m2rl.rl.rollout import ScoredTrajectory
from m2rl.rl.trainer import TrainConfig, Trainer, summarize_episodes

REPO = Path(__file__).resolve().parents[2]
M2RL = Path(sys.executable).parent / "m2rl"

SMALL = [
    "model.init=null", "steps=2", "eval.every=1", "eval.num_tasks=2", "rollout.num_envs=4",
    "rollout.group_size=2", "rollout.max_new_tokens=12", "rollout.batch_warmup.start_size=4",
    "rollout.batch_warmup.target_size=4", "rollout.batch_warmup.multiple_of=2", "rollout.batch_warmup.warmup_steps=0",
    "rollout.dynamic_sampling=false", "env.max_steps=2", "env.num_train_tasks=8", "checkpoint_every=1",
    "threads=1",
]


def small_config(tmp_path: Path, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, REPO / "configs" / "train.yaml",
                       [*SMALL, f"run_root={tmp_path}", "name=t", *extra])


def test_default_config_loads() -> None:
    config = load_config(TrainConfig, REPO / "configs" / "train.yaml")
    assert config.learner.loss.kind == "cispo"
    assert config.env.id == "m2rl/Python-v0"
    assert config.max_minutes <= 10


@pytest.mark.bwrap
def test_train_writes_run_files_and_updates_weights(tmp_path: Path) -> None:
    sampled_eval = ["eval.greedy=false", "eval.samples_per_task=2", "eval.report_greedy=true"]
    trainer = Trainer(small_config(tmp_path, *sampled_eval))
    summary = trainer.train()
    after = trainer.model.state_dict()
    assert trainer.learner.optimizer_steps == 2
    # the generator received the learner's weights (weight sync) and carries a new version
    gen = trainer.generator.state_dict()
    assert all(torch.equal(gen[k], after[k]) for k in after)
    assert trainer.policy.policy_version == 2
    run = tmp_path / "t"
    records = read_metrics(run / "metrics.jsonl")
    steps = [r for r in records if "learner/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("learner/clip_frac_high", "learner/entropy", "learner/approx_kl", "learner/grad_norm",
                "learner/logp_gap_gen_learner", "learner/tokens_per_s", "train/continuity_violations",
                "train/tool_use_rate", "train/tool_calls_mean"):
        assert key in steps[0], key
    evals = [r for r in records if "eval/success_rate" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    assert all("eval/greedy_success_rate" in r for r in evals)
    assert {"initial_eval_greedy_success", "final_eval_greedy_success"} <= set(summary)
    assert (run / "curve.png").stat().st_size > 1000
    assert (run / "config.yaml").exists() and list((run / "tensorboard").iterdir())
    assert json.loads((run / "summary.json").read_text())["steps"] == 2 == summary["steps"]
    assert latest_checkpoint(run / "checkpoints") is not None


@pytest.mark.bwrap
def test_resume_continues_from_the_checkpoint(tmp_path: Path) -> None:
    Trainer(small_config(tmp_path, "steps=1")).train()
    resumed = Trainer(small_config(tmp_path, "steps=2", "resume=true"))
    assert resumed.step == 1
    assert resumed.policy.policy_version == 1
    from m2rl.model.checkpoint import read_state_dict  # the checkpoint's weights are its Hugging Face files

    saved = read_state_dict(latest_checkpoint(tmp_path / "t" / "checkpoints"))
    assert all(torch.equal(saved[k], v) for k, v in resumed.model.state_dict().items())
    assert resumed.learner.optimizer.state  # AdamW moments came back
    summary = resumed.train()
    assert summary["steps"] == 2


def _episode(resolved: bool, tools_per_step: list[list[str]]) -> ScoredTrajectory:
    steps = [StepInfo(tool_results=tuple(ToolResultInfo(name, ok=True) for name in tools)) for tools in tools_per_step]
    if steps:
        steps[-1] = dataclasses.replace(steps[-1], verification=Verification(resolved, float(resolved)))
    trajectory = Trajectory(rewards=[0.0] * (len(steps) - 1) + [float(resolved)] if steps else [])
    return ScoredTrajectory("python/arith/1", 0, trajectory, Episode(tuple(steps)), exit_reason="terminated")


def test_summary_counts_tool_calls_but_not_submit() -> None:
    episodes = [
        _episode(True, [["python"], ["submit"]]),
        _episode(False, [["submit"]]),  # answered without using a tool
        _episode(False, [["python", "python"], ["python"], []]),
        _episode(False, []),
    ]
    metrics = summarize_episodes(episodes, "eval")
    assert metrics["eval/success_rate"] == 0.25
    assert metrics["eval/tool_calls_mean"] == (1 + 0 + 3 + 0) / 4
    assert metrics["eval/tool_use_rate"] == 0.5


def cli_train(tmp_path: Path, *extra: str) -> int:
    from m2rl.cli import main

    return main(["train", "--config", str(REPO / "configs" / "train.yaml"), *SMALL, f"run_root={tmp_path}",
                 "name=t", *extra])


def test_resume_needs_something_to_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_train(tmp_path, "resume=true") == 2
    assert capsys.readouterr().err == (f"m2rl: error: resume=true but there is no run directory {tmp_path / 't'}; "
                                       "drop resume=true to start a new run\n")
    assert not (tmp_path / "t").exists()
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "config.yaml").write_text("steps: 1\n")
    assert cli_train(tmp_path, "resume=true") == 2
    assert capsys.readouterr().err == (f"m2rl: error: resume=true but {tmp_path / 't'} has no checkpoint to resume "
                                       "from; start a new run with another name=\n")
    assert cli_train(tmp_path, "resume=true", "name=") == 2
    assert capsys.readouterr().err == "m2rl: error: resume=true needs name=<the run to continue>\n"


@pytest.mark.bwrap
def test_a_name_in_use_is_refused_and_the_run_kept(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Trainer(small_config(tmp_path, "steps=1")).train()
    run = tmp_path / "t"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert cli_train(tmp_path, "steps=1") == 2
    assert capsys.readouterr().err == (f"m2rl: error: run directory {run} already exists; pass resume=true to "
                                       "continue it or choose another name=\n")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.bwrap
def test_resume_says_where_keeps_the_initial_eval_and_warns_of_changes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = Trainer(small_config(tmp_path, "steps=1")).train()
    assert first["initial_eval_success"] is not None
    run = tmp_path / "t"
    assert cli_train(tmp_path, "steps=2", "resume=true", "eval.num_tasks=3") == 0
    err = capsys.readouterr().err.splitlines()
    assert f"m2rl: resuming {run} at step 1 from {run / 'checkpoints' / 'step_000000001'}" in err
    assert (f"m2rl: warning: settings changed since {run / 'config.yaml'}: eval.num_tasks (2 -> 3), "
            "steps (1 -> 2)") in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["initial_eval_success"] == first["initial_eval_success"]
    assert summary["resumed_from_step"] == 1 and summary["steps"] == 2
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if "learner/loss" in r] == [1, 2]
    assert [r["step"] for r in records if "eval/success_rate" in r] == [0, 1, 2]  # no second initial eval
    assert yaml_steps(run / "config.yaml") == 1  # the original config is kept


def yaml_steps(path: Path) -> int:
    import yaml

    return int(yaml.safe_load(path.read_text())["steps"])


@pytest.mark.bwrap
def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Trainer(small_config(tmp_path, "steps=2", "eval.every=0")).train()
    checkpoints = tmp_path / "t" / "checkpoints"
    weights = checkpoints / "step_000000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert cli_train(tmp_path, "steps=3", "eval.every=0", "resume=true") == 0
    err = capsys.readouterr().err.splitlines()
    assert (f"m2rl: warning: checkpoint {checkpoints / 'step_000000002'} is damaged (model.safetensors is "
            f"damaged (sha256 mismatch)); set aside as damaged-step_000000002") in err
    assert f"m2rl: resuming {tmp_path / 't'} at step 1 from {checkpoints / 'step_000000001'}" in err
    assert "m2rl: warning: dropped 2 metrics records logged after step 1 (the checkpoint does not cover them)" in err
    records = read_metrics(tmp_path / "t" / "metrics.jsonl")
    assert [r["step"] for r in records if "learner/loss" in r] == [1, 2, 3]
    assert latest_checkpoint(checkpoints).name == "step_000000003"


def leftover_sandboxes(pid: int) -> list[str]:
    from m2rl.sandboxes import bwrap_backend, docker_backend

    dirs = [str(d) for root in (bwrap_backend.STATE_ROOT, docker_backend.STATE_ROOT) if root.is_dir()
            for d in root.iterdir() if d.name.startswith(f"{pid}-")]
    try:
        from m2rl.sandboxes.gc import labelled_containers

        dirs += [c["Id"][:12] for c in labelled_containers(owner_pid=pid)]
    except Exception:  # no Docker engine here: no containers either
        pass
    from m2rl.sandboxes import cgroup

    layout = cgroup.detect_layout()
    if not isinstance(layout, str):  # a str says why this machine gives sandboxes no cgroups
        dirs += [group.name for group in cgroup.leaked(layout, lambda name: not name.startswith(f"{pid}-"))]
    return dirs


def wait_for_a_completed_step(run: Path, process: subprocess.Popen[bytes], timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, (run.parent / "stderr").read_text()
        if any("learner/loss" in r for r in read_metrics(run / "metrics.jsonl")):
            return
        time.sleep(0.2)
    raise AssertionError("no training step completed in time")


@pytest.mark.parametrize("backend", [pytest.param("bwrap", marks=pytest.mark.bwrap),
                                     pytest.param("docker", marks=pytest.mark.docker)])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupt_cleans_up_and_leaves_a_resumable_checkpoint(tmp_path: Path, signum: int, backend: str) -> None:
    args = [str(M2RL), "train", *SMALL, f"run_root={tmp_path}", "name=t", "steps=50", "eval.every=0",
            "checkpoint_every=0", f"env.sandbox={backend}"]
    # the default disposition, whatever this test runner inherited (a shell's background jobs ignore SIGINT)
    with open(tmp_path / "stderr", "w") as stderr:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for_a_completed_step(tmp_path / "t", process)
        process.send_signal(signum)
        process.wait(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
    err = (tmp_path / "stderr").read_text()
    assert process.returncode == 128 + signum, err
    assert "Traceback" not in err
    steps = [r["step"] for r in read_metrics(tmp_path / "t" / "metrics.jsonl") if "learner/loss" in r]
    checkpoint = latest_checkpoint(tmp_path / "t" / "checkpoints")
    assert checkpoint is not None and checkpoint.name == f"step_{steps[-1]:09d}"
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"m2rl: interrupted by {signal.Signals(signum).name} after step {steps[-1]}; "
                           f"saved {checkpoint}; resume with: m2rl train "), last
    assert last.endswith(" name=t resume=true"), last
    assert leftover_sandboxes(process.pid) == []
    resumed = Trainer(small_config(tmp_path, f"steps={steps[-1] + 1}", "eval.every=0", "resume=true",
                                   f"env.sandbox={backend}"))
    assert resumed.step == steps[-1]
    assert resumed.train()["steps"] == steps[-1] + 1


def test_a_signal_during_an_update_is_raised_when_the_update_ends() -> None:
    from m2rl.rl.interrupts import TrainingInterrupted, deferred_interrupts, stop_on_signals

    before = signal.getsignal(signal.SIGTERM)
    finished = False
    with stop_on_signals():
        with pytest.raises(TrainingInterrupted) as info:
            with deferred_interrupts():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler has run by now, and must not have raised
                finished = True
    assert finished and info.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_signal_during_async_work_cancels_it_and_is_raised_after() -> None:
    import asyncio

    from m2rl.rl.interrupts import TrainingInterrupted, run_async, stop_on_signals

    cancelled = []

    async def work() -> None:
        async def child() -> None:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append("child")
                raise

        task = asyncio.ensure_future(child())
        await asyncio.sleep(0)
        os.kill(os.getpid(), signal.SIGINT)
        await task

    start = time.monotonic()
    # A shell starts background jobs with SIGINT ignored, and stop_on_signals keeps that; this test is about
    # a job that receives Ctrl-C, whatever started the test run.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stop_on_signals(), pytest.raises(TrainingInterrupted) as info:
            run_async(work())
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert info.value.signum == signal.SIGINT and cancelled == ["child"]
    assert time.monotonic() - start < 10


def test_the_rewards_section_is_the_default_spec_and_checked_at_load(tmp_path: Path) -> None:
    """Before: configs/rewards/default.yaml was read by no code (and differed from the default: it voided the
    outcome on fake_test_output), and `m2rl train` could not set a RewardSpec."""
    from m2rl.config import ConfigError
    from m2rl.rewards import RewardSpec
    from m2rl.rl.trainer import reward_spec_of

    config = load_config(TrainConfig, REPO / "configs" / "train.yaml")
    assert config.rewards == "configs/rewards/default.yaml" and config.rollout.advantage == "episode"
    assert reward_spec_of(config.rewards) == RewardSpec.default()  # the main job scores as before
    assert reward_spec_of({}) is None  # an empty section: the env's own default
    custom = load_config(TrainConfig, REPO / "configs" / "train.yaml", ["rewards={shaping: none}"])
    assert reward_spec_of(custom.rewards) == RewardSpec(shaping="none")
    (tmp_path / "mine.yaml").write_text("components: {resolved: 2.0}\n")
    assert reward_spec_of(str(tmp_path / "mine.yaml")).weights == {"resolved": 2.0}
    with pytest.raises(ConfigError, match="'rewards.clip.step': expected 2 items"):
        load_config(TrainConfig, REPO / "configs" / "train.yaml", ["rewards={clip: {step: [1]}}"])
    with pytest.raises(ConfigError, match="'rewards.': unknown reward component 'resolve'"):
        load_config(TrainConfig, REPO / "configs" / "train.yaml", ["rewards={components: {resolve: 1}}"])
    with pytest.raises(ConfigError, match="config file not found: .*configs/rewards/nothing.yaml"):
        load_config(TrainConfig, REPO / "configs" / "train.yaml", ["rewards=configs/rewards/nothing.yaml"])


def test_the_env_factory_passes_the_spec_and_lists_tasks_without_a_probe_env() -> None:
    from m2rl.rewards import RewardSpec
    from m2rl.rl.trainer import make_env_factory

    config = load_config(TrainConfig, REPO / "configs" / "train.yaml")
    factory = make_env_factory(config.env, "test", RewardSpec(shaping="none"))
    with pytest.raises(RuntimeError, match="no m2rl/Python-v0 env has been made yet"):
        factory.task_ids("test", 2)
    env = factory()
    try:
        assert env.unwrapped.reward_spec == RewardSpec(shaping="none")
        assert factory.task_ids("test", 3, ["arith"]) == [t.id for t in env.unwrapped.task_set.tasks("test", 3, ("arith",))]
    finally:
        env.close()


@pytest.mark.bwrap
def test_turn_advantages_and_the_curriculum_train_and_resume(tmp_path: Path) -> None:
    """rollout.advantage=turn trains end to end; the curriculum goes through its own state_dict into the
    checkpoint and back (before: the trainer copied its three dicts by hand)."""
    extra = ["rollout.advantage=turn", "rollout.curriculum=true", "eval.every=0"]
    first = Trainer(small_config(tmp_path, "steps=1", *extra))
    first.train()
    saved = first.curriculum.state_dict()
    assert sum(saved["raw_attempts"].values()) > 0
    resumed = Trainer(small_config(tmp_path, "steps=2", "resume=true", *extra))
    assert resumed.curriculum.state_dict() == saved
    assert resumed.train()["steps"] == 2
