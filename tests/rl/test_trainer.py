"""The training loop end to end on the real stack: tiny M2 policy, Python env in bubblewrap, CISPO."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from m2rl.config import load_config
from m2rl.rl.checkpoint import latest_checkpoint
from m2rl.runs import read_jsonl as read_metrics
from m2rl.agent.trajectory import Trajectory
from m2rl.rl.rollout import Episode
from m2rl.rl.trainer import TrainConfig, Trainer, summarize_episodes

REPO = Path(__file__).resolve().parents[2]

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
    saved = torch.load(latest_checkpoint(tmp_path / "t" / "checkpoints") / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in resumed.model.state_dict().items())
    assert resumed.learner.optimizer.state  # AdamW moments came back
    summary = resumed.train()
    assert summary["steps"] == 2


def _episode(resolved: bool, tools_per_step: list[list[str]]) -> Episode:
    trajectory = Trajectory(metadata={"steps": [{"tools": tools} for tools in tools_per_step]})
    return Episode("python/arith/1", 0, trajectory, reward=float(resolved), resolved=resolved, exit_reason="terminated")


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
