"""The multi-stage pipeline (SFT short -> SFT long -> RL short -> RL long) runs from one config, and every
stage leaves its model as a Hugging Face directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from m2rl.config import ConfigError, load_config
from m2rl.model import load_pretrained
from m2rl.rl.pipeline import run_pipeline, stage_config
from m2rl.rl.preflight import resolve_init
from m2rl.rl.trainer import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def test_pipeline_config_loads_and_validates(tmp_path: Path) -> None:
    config = load_config(TrainConfig, REPO / "configs" / "pipeline.yaml")
    assert [(s.name, s.kind) for s in config.stages] == [
        ("sft-short", "sft"), ("sft-long", "sft"), ("rl-short", "rl"), ("rl-long", "rl")]
    long_rl = stage_config(config, config.stages[3], "p")
    assert long_rl.rollout.context.max_tokens(0) == 1536 and long_rl.steps == 40
    assert long_rl.env.kinds == ["arith", "sum_primes", "fib_mod", "collatz"]
    assert long_rl.name == "p-rl-long" and long_rl.stages == []
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [{name: a, kind: distill, steps: 1, max_tokens: 8}]\n")
    with pytest.raises(ConfigError, match=r"stages\[0\]\.kind.*bad.yaml.*expected one of \['sft', 'rl'\]"):
        load_config(TrainConfig, bad)


@pytest.mark.bwrap
def test_four_stage_pipeline_runs_in_order(tmp_path: Path) -> None:
    overrides = [
        f"run_root={tmp_path}", "name=p", "threads=1", "model.init=null", "sft.demos=4", "sft.batch_size=2",
        "env.num_train_tasks=8", "env.max_steps=2", "eval.num_tasks=2", "eval.every=0", "rollout.num_envs=4",
        "rollout.group_size=2", "rollout.max_new_tokens=8", "rollout.dynamic_sampling=false",
        "rollout.batch_warmup={start_size: 4, target_size: 4, warmup_steps: 0, multiple_of: 2}",
        "stages=[{name: sft-short, kind: sft, steps: 2, max_tokens: 700},"
        " {name: sft-long, kind: sft, steps: 1, max_tokens: 1200, overrides: {env.kinds: [arith, collatz]}},"
        " {name: rl-short, kind: rl, steps: 1, max_tokens: 700},"
        " {name: rl-long, kind: rl, steps: 1, max_tokens: 1200}]",
    ]
    config = load_config(TrainConfig, REPO / "configs" / "pipeline.yaml", overrides)
    torch.manual_seed(0)
    summary = run_pipeline(config)
    assert [s["stage"] for s in summary["stages"]] == ["sft-short", "sft-long", "rl-short", "rl-long"]
    sft_short = summary["stages"][0]
    assert sft_short["demonstrations"] == 4 and sft_short["steps"] == 2
    for stage in ("sft-short", "sft-long", "rl-short", "rl-long"):
        assert (tmp_path / f"p-{stage}" / "config.yaml").exists()
        # each stage's model, for transformers, vLLM and `model.init=runs/p-<stage>`
        assert resolve_init(str(tmp_path / f"p-{stage}")) == tmp_path / f"p-{stage}" / "final"
        assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
            p.name for p in (tmp_path / f"p-{stage}" / "final").iterdir()}
    assert summary["stages"][1]["model"] == str(tmp_path / "p-sft-long" / "final")
    # an SFT stage exports the model as it trained it, not as it started: sft-long trained on from sft-short
    short, long = (load_pretrained(tmp_path / f"p-{stage}" / "final").state_dict()
                   for stage in ("sft-short", "sft-long"))
    assert not all(torch.equal(short[k], long[k]) for k in short)
    saved = json.loads((tmp_path / "p-rl-long" / "summary.json").read_text())
    assert saved["steps"] == 1
