"""Weight sync: versioned pushes checked by the parity probe, rejected when the generator is not serving the
learner's weights; the policy backend's configuration; a dead server reported with its log tail.

Oracles: the learner's own log-probs (a synced generator samples with them), a corrupted or wrong transport
(test doubles wrapping the real one), the preflight's messages, a real exited subprocess."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from m2rl.agent.openai_policy import OpenAIPolicy
from m2rl.agent.vllm_server import VLLMServer, VLLMServerConfig, VLLMServerError
from m2rl.config import ConfigError, load_config
from m2rl.model import M2Config, M2ForCausalLM, save_pretrained
from m2rl.rl.parity import model_logprobs
from m2rl.rl.preflight import config_problems
from m2rl.rl.weight_sync import (
    InProcessSync,
    NoSync,
    PolicyBackend,
    PolicySection,
    SyncRejected,
    build_backend,
)
from m2rl.runs import read_jsonl
from sync_test_helpers import GREEDY, PROMPT, TOK, generate, learn
from torch import nn

REPO = Path(__file__).resolve().parents[2]


def tiny_m2(seed: int = 0) -> M2ForCausalLM:
    return M2ForCausalLM(M2Config.from_preset("tiny")).init_weights(seed=seed)


def local_backend(model: nn.Module, tmp_path: Path, retries: int = 1) -> PolicyBackend:
    return build_backend(PolicySection(parity_retries=retries), model, TOK, tmp_path, max_batch_size=4)


class Corrupting:
    """A transport that delivers the weights, then damages one expert's tensor of the generator's copy
    (a partial or corrupted transfer), for its first `times` pushes."""

    def __init__(self, inner: InProcessSync, generator: nn.Module, times: int = 1_000) -> None:
        self.inner, self.generator, self.times = inner, generator, times
        self.name = "corrupting"

    def push(self, model: nn.Module, version: int) -> None:
        self.inner.push(model, version)
        if self.times > 0:
            self.times -= 1
            with torch.no_grad():
                self.generator.model.layers[1].block_sparse_moe.experts.w2[5].mul_(-1.0)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- in process

def test_in_process_sync_changes_outputs_and_passes_the_probe(tmp_path: Path) -> None:
    model = tiny_m2()
    backend = local_backend(model, tmp_path)
    ids_before, logprobs_before, version_before = generate(backend)
    learn(model)
    report = backend.push(model, version=1)
    ids_after, logprobs_after, version_after = generate(backend)
    assert (version_before, version_after) == (0, 1) and report.version == 1
    assert report.parity is not None and report.parity.max_abs_diff == 0.0 and report.rejected == 0
    assert report.metrics() == {"policy_version": 1.0, "sync/seconds": report.seconds, "sync/rejected": 0.0,
                                "sync/parity_max_abs_diff": 0.0}
    assert (ids_after, logprobs_after) != (ids_before, logprobs_before)
    # The generator now samples with the learner's distribution: its log-probs are the learner's.
    learner = model_logprobs(model, PROMPT + ids_after)[len(PROMPT) - 1:]
    assert torch.allclose(torch.tensor(logprobs_after), torch.tensor(learner, dtype=torch.float32), atol=1e-4)


def test_a_corrupted_update_is_rejected_and_reported(tmp_path: Path) -> None:
    model = tiny_m2()
    backend = local_backend(model, tmp_path, retries=2)
    assert backend.generator_model is not None and isinstance(backend.sync, InProcessSync)
    backend.sync = Corrupting(backend.sync, backend.generator_model)
    learn(model)
    with pytest.raises(SyncRejected, match="rejected 3 time") as info:
        backend.push(model, version=1)
    report = info.value.report
    assert report.rejected == 3 and report.parity is not None and report.parity.max_abs_diff > 1e-2
    assert report.metrics()["sync/rejected"] == 3.0


def test_a_transient_corruption_passes_on_retry_and_is_counted(tmp_path: Path) -> None:
    model = tiny_m2()
    backend = local_backend(model, tmp_path, retries=1)
    assert backend.generator_model is not None and isinstance(backend.sync, InProcessSync)
    backend.sync = Corrupting(backend.sync, backend.generator_model, times=1)
    learn(model)
    report = backend.push(model, version=1)
    assert report.rejected == 1 and report.parity is not None and report.parity.passed


def test_a_wrong_checkpoint_is_rejected(tmp_path: Path) -> None:
    model, other = tiny_m2(seed=0), tiny_m2(seed=7)
    backend = local_backend(model, tmp_path, retries=0)

    class WrongWeights(InProcessSync):
        def push(self, model: nn.Module, version: int) -> None:
            super().push(other, version)  # a transfer of another run's checkpoint

    assert isinstance(backend.sync, InProcessSync)
    backend.sync = WrongWeights(backend.sync.policy)
    with pytest.raises(SyncRejected, match="not serving the learner's weights"):
        backend.push(model, version=1)


def test_a_frozen_server_is_not_probed_and_keeps_its_version(tmp_path: Path) -> None:
    section = PolicySection(kind="openai", base_url="http://127.0.0.1:9", model="m")
    backend = build_backend(section, tiny_m2(), TOK, tmp_path, max_batch_size=4)
    assert isinstance(backend.sync, NoSync) and backend.generator_logprobs is None
    report = backend.push(tiny_m2(), version=3)
    assert report.version == 0 and report.parity is None
    assert "sync/parity_max_abs_diff" not in report.metrics()


# ---------------------------------------------------------------------------------------------- configuration

SMALL = [
    "model.init=null", "steps=2", "eval.every=0", "eval.num_tasks=2", "rollout.num_envs=4",
    "rollout.group_size=2", "rollout.max_new_tokens=12", "rollout.batch_warmup.start_size=4",
    "rollout.batch_warmup.target_size=4", "rollout.batch_warmup.multiple_of=2", "rollout.batch_warmup.warmup_steps=0",
    "rollout.dynamic_sampling=false", "env.max_steps=2", "env.num_train_tasks=8", "checkpoint_every=1",
    "threads=1", "eval.greedy=true", "eval.report_greedy=false",
]


def small_config(tmp_path: Path, *extra: str):
    from m2rl.rl.trainer import TrainConfig

    return load_config(TrainConfig, REPO / "configs" / "train.yaml",
                       [*SMALL, f"run_root={tmp_path}", "name=t", *extra])


def policy_problems(tmp_path: Path, *extra: str) -> list[str]:
    return [p for p in config_problems(small_config(tmp_path, *extra), run_directory=False) if p.startswith("policy")]


def test_the_loader_refuses_an_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="policy.kind"):
        small_config(tmp_path, "policy.kind=sglang")
    with pytest.raises(ConfigError, match="policy.sync"):
        small_config(tmp_path, "policy.kind=m2rl", "policy.sync=ftp")


def test_preflight_names_each_policy_problem(tmp_path: Path) -> None:
    import dataclasses

    config = small_config(tmp_path)
    config.policy = dataclasses.replace(config.policy, kind="sglang")  # built in Python: no loader to refuse it
    assert [p for p in config_problems(config, run_directory=False) if p.startswith("policy")] == [
        "policy.kind: unknown generator 'sglang'; choose one of local, m2rl, vllm, openai"]
    assert policy_problems(tmp_path) == []
    openai = policy_problems(tmp_path, "policy.kind=openai")
    assert any(p.startswith("policy.base_url: kind openai needs the server's URL") for p in openai)
    assert "policy.model: kind openai needs the served model's name" in openai
    assert policy_problems(tmp_path, "policy.kind=openai", "policy.base_url=http://127.0.0.1:8000",
                           "policy.model=m") == []
    assert any("needs policy.kind=vllm" in p for p in policy_problems(tmp_path, "policy.launch=true"))
    assert any("kind vllm needs launch=true" in p for p in policy_problems(tmp_path, "policy.kind=vllm"))
    assert policy_problems(tmp_path, "policy.kind=m2rl", "policy.sync=collective") == []
    assert policy_problems(tmp_path, "policy.kind=m2rl", "policy.bucket_mb=0", "policy.dtype=fp8") == [
        "policy.bucket_mb: must be > 0, got 0", "policy.dtype: must be float32, bfloat16 or float16, got 'fp8'"]
    assert policy_problems(tmp_path, "policy.parity_retries=-1", "policy.request_timeout_s=0") == [
        "policy.request_timeout_s: must be > 0, got 0.0", "policy.parity_retries: must be >= 0, got -1"]


def test_a_bad_policy_section_stops_the_trainer_before_the_run_directory(tmp_path: Path) -> None:
    from m2rl.rl.trainer import Trainer

    with pytest.raises(ConfigError, match="policy.base_url"):
        Trainer(small_config(tmp_path, "policy.kind=openai", "policy.model=m"))
    assert not (tmp_path / "t").exists()


# ---------------------------------------------------------------------------------------------- a dead server

def exited_server(tmp_path: Path) -> VLLMServer:
    """A VLLMServer whose process has exited (no vLLM needed): a real subprocess, a real log file."""
    save_pretrained(tiny_m2(), tmp_path / "ckpt", tokenizer=TOK)
    server = VLLMServer(VLLMServerConfig(tmp_path / "ckpt", log_path=tmp_path / "vllm.log"))
    (tmp_path / "vllm.log").write_text("INFO starting\nERROR EngineCore died: out of memory\n")
    server.process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    server.process.wait()
    return server


def test_check_alive_reports_the_exit_code_and_the_log_tail(tmp_path: Path) -> None:
    server = exited_server(tmp_path)
    with pytest.raises(VLLMServerError, match="exited with code 3") as info:
        server.check_alive()
    assert "EngineCore died: out of memory" in str(info.value) and str(tmp_path / "vllm.log") in str(info.value)


def test_a_dead_server_fails_the_request_at_once_with_its_log_tail(tmp_path: Path) -> None:
    server = exited_server(tmp_path)
    calls: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("[Errno 111] Connection refused")

    policy = server.policy(transport=httpx.MockTransport(refuse), max_retries=4, backoff_s=0.01)
    assert isinstance(policy, OpenAIPolicy) and policy.server_check == server.check_alive
    with pytest.raises(VLLMServerError, match="(?s)exited with code 3.*out of memory"):
        asyncio.run(policy.generate(PROMPT, GREEDY))
    assert len(calls) == 1  # no retries against a server known to be dead


def test_without_a_server_check_connection_errors_are_retried(tmp_path: Path) -> None:
    from m2rl.agent.policy import PolicyUnavailableError

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    policy = OpenAIPolicy("http://127.0.0.1:9", "m", transport=httpx.MockTransport(refuse), max_retries=2,
                          backoff_s=0.0)
    with pytest.raises(PolicyUnavailableError, match="after 3 attempts"):
        asyncio.run(policy.generate(PROMPT, GREEDY))


# ---------------------------------------------------------------------------------------------- in training

@pytest.mark.bwrap
def test_training_logs_sync_and_gap_and_stops_on_a_rejected_sync_with_its_data(tmp_path: Path) -> None:
    from m2rl.rl.checkpoint import latest_checkpoint
    from m2rl.rl.trainer import Trainer

    trainer = Trainer(small_config(tmp_path, "policy.parity_retries=1"))
    assert trainer.generator is not None and isinstance(trainer.backend.sync, InProcessSync)
    # Weights delivered intact at step 1, damaged at every push from step 2 on.
    inner, generator = trainer.backend.sync, trainer.generator

    class FromStep2(Corrupting):
        def push(self, model: nn.Module, version: int) -> None:
            if version < 2:
                self.inner.push(model, version)
            else:
                super().push(model, version)

    trainer.backend.sync = FromStep2(inner, generator)
    with pytest.raises(SyncRejected, match="weight sync to version 2 rejected 2 time"):
        trainer.train()
    records = read_jsonl(tmp_path / "t" / "metrics.jsonl")
    first, second = [r for r in records if "learner/loss" in r]
    assert first["step"] == 1 and first["policy_version"] == 1.0 and first["sync/rejected"] == 0.0
    assert first["sync/parity_max_abs_diff"] == 0.0 and first["sync/seconds"] >= 0
    assert 0 <= first["rollout/logprob_gap_mean"] <= first["rollout/logprob_gap_max"]
    # The learner's mean gap is the same quantity on the same batch, before the same update.
    assert first["rollout/logprob_gap_mean"] == pytest.approx(first["learner/logp_gap_gen_learner"], abs=1e-6)
    assert second["step"] == 2 and second["sync/rejected"] == 2.0 and second["sync/parity_max_abs_diff"] > 1e-2
    checkpoint = latest_checkpoint(tmp_path / "t" / "checkpoints")
    assert checkpoint is not None and checkpoint.name.endswith("2")  # the learner's step 2 is kept
    log = (tmp_path / "t" / "run.log").read_text()
    assert "the generator failed after step 2" in log
