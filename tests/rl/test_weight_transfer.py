"""Weight transports into a running `m2rl serve`: a push of changed weights changes what the server answers,
passes the parity probe and advances the version; a corrupted update (NaN, wrong shape, missing or truncated
tensors) is refused with a 400 naming the problem and leaves the served weights and version as they were;
a learner that stops mid-broadcast costs the server its timeout, not forever; `policy.kind: m2rl` starts,
syncs, probes and stops its own server, and reports a dead one with its log tail.

Oracles: the learner's own log-probs (rl/parity.py), the server's log-probs before a refused update (which
must not move at all), the server's error messages, a real killed subprocess."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from m2rl.agent.openai_policy import OpenAIPolicy
from m2rl.model import M2Config, M2ForCausalLM, M2Tokenizer, load_pretrained
from m2rl.model.serving import weight_transfer as wire
from m2rl.model.serving.app import build_app
from m2rl.model.serving.scheduler import Scheduler, SchedulerConfig
from m2rl.model.serving.service import Service
from m2rl.rl.m2rl_server import M2RLServerError
from m2rl.rl.parity import ParityProbe, ServerLogprobs
from m2rl.rl.weight_sync import PolicySection, ServeSync, WeightTransferError, build_backend
from m2rl.rl.weight_transfer import (
    CollectiveSync,
    DiskSync,
    HTTPSync,
    IPCSync,
    WeightClient,
    nbytes,
    wire_tensors,
)
from safetensors.torch import save as save_safetensors
from sync_test_helpers import TOK, generate, learn

TINY_DIR = Path(__file__).resolve().parents[2] / "model" / "assets" / "tiny-python-sft"
MODEL_NAME = "tiny"
BUCKET = 2**20  # the tiny policy (~9 MB in float32) travels in ~10 buckets


@dataclass
class Served:
    url: str
    service: Service
    tokenizer: M2Tokenizer

    def logprobs(self, ids: list[int]) -> list[float]:
        return ServerLogprobs(OpenAIPolicy(f"{self.url}/v1", MODEL_NAME))(ids)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    """The tiny SFT policy served by uvicorn in a thread, over a real socket."""
    model = load_pretrained(TINY_DIR)
    tokenizer = M2Tokenizer.from_file(TINY_DIR)
    service = Service(model, tokenizer, Scheduler(model, SchedulerConfig(max_batch=2, max_model_len=512)), MODEL_NAME)
    server = uvicorn.Server(uvicorn.Config(build_app(service), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield Served(f"http://127.0.0.1:{port}", service, tokenizer)
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def learner(served: Served) -> M2ForCausalLM:
    """A learner whose weights are the ones served now."""
    model = load_pretrained(TINY_DIR)
    model.load_state_dict(served.service.model.state_dict())
    return model


def probe_ids(served: Served, model: M2ForCausalLM) -> list[int]:
    return ParityProbe.for_model(model, 1e-3, served.tokenizer).ids


def transport(kind: str, served: Served, tmp_path: Path, group_timeout_s: float = 30.0
              ) -> DiskSync | HTTPSync | CollectiveSync:
    client = WeightClient(served.url, timeout_s=30.0)
    if kind == "disk":
        return DiskSync(client, tmp_path / "shared", BUCKET)
    if kind == "http":
        return HTTPSync(client, BUCKET)
    return CollectiveSync(client, timeout_s=group_timeout_s)


def assert_unchanged(served: Served, model: M2ForCausalLM, version: int, logprobs: list[float]) -> None:
    """The served version, and the served log-probs bit for bit, are what they were."""
    assert served.service.policy_version == version
    assert served.logprobs(probe_ids(served, model)) == logprobs


# ---------------------------------------------------------------------------------------------- a push

@pytest.mark.parametrize("kind", ["disk", "http", "collective"])
def test_a_push_changes_the_served_weights_and_passes_the_probe(kind: str, served: Served, learner: M2ForCausalLM,
                                                                tmp_path: Path) -> None:
    sync = transport(kind, served, tmp_path)
    ids = probe_ids(served, learner)
    before = served.logprobs(ids)
    for step in (1, 2):  # the collective group is made by the first push and reused by the second
        learn(learner, seed=step)
        version = served.service.policy_version + 1
        sync.push(learner, version)
        assert served.service.policy_version == version
        parity = ParityProbe(1e-3, ids).check(learner, served.logprobs)
        assert parity.passed, parity
        after = served.logprobs(ids)
        assert max(abs(a - b) for a, b in zip(after, before)) > 0.1  # the answers moved with the weights
        before = after
    weight_bytes = sum(nbytes(t) for _, t in wire_tensors(learner))
    assert weight_bytes <= sync.last_bytes < 1.05 * weight_bytes  # safetensors headers: a few kB
    if kind == "disk":
        assert [p.name for p in (tmp_path / "shared").iterdir()] == [f"v{version:06d}"]  # older ones removed
        assert len(list((tmp_path / "shared" / f"v{version:06d}").glob("*.safetensors"))) > 1  # sharded
    sync.close()


# ---------------------------------------------------------------------------------------------- refused updates

@pytest.mark.parametrize("kind", ["disk", "http", "collective"])
def test_a_nan_update_is_refused_and_the_old_weights_stay(kind: str, served: Served, learner: M2ForCausalLM,
                                                          tmp_path: Path) -> None:
    sync = transport(kind, served, tmp_path)
    version, old = served.service.policy_version, served.logprobs(probe_ids(served, learner))
    with torch.no_grad():
        learner.model.layers[1].block_sparse_moe.experts.w2[5, 0, 0] = float("nan")
    with pytest.raises(WeightTransferError, match=r"answered 400: weight update refused.*w2.* NaN"):
        sync.push(learner, version + 1)
    assert_unchanged(served, learner, version, old)
    sync.close()


def upload(served: Served, body: bytes, version: int, bucket: int, buckets: int) -> httpx.Response:
    return httpx.post(f"{served.url}{wire.UPLOAD_PATH}", content=body, timeout=30,
                      params={"version": version, "bucket": bucket, "buckets": buckets})


def bodies(model: M2ForCausalLM, damage: str) -> list[bytes]:
    """The model's tensors in two safetensors buckets, one of them damaged."""
    tensors = {name: t for name, t in wire_tensors(model) if not (damage == "missing" and name == EXPERT)}
    if damage == "shape":
        tensors[EXPERT] = tensors[EXPERT][:-1]
    if damage == "renamed":
        tensors = {("model.embed_tokens.weights" if name == EMBED else name): t for name, t in tensors.items()}
    names = list(tensors)
    half = len(names) // 2
    return [save_safetensors({n: tensors[n] for n in part}) for part in (names[:half], names[half:])]


EMBED = "model.embed_tokens.weight"
EXPERT = "model.layers.0.block_sparse_moe.experts.3.w1.weight"


@pytest.mark.parametrize(("damage", "problem"), [
    ("truncated", "bucket 0 of 2: not a readable safetensors body"),
    ("shape", f"bucket 0 of 2: tensor {EXPERT} has shape (127, 128), expected (128, 128)"),
    ("missing", "the update is missing 1 of"),
    ("renamed", "bucket 0 of 2: tensor model.embed_tokens.weights is not a tensor of the served model"),
])
def test_a_malformed_upload_is_refused_by_name(damage: str, problem: str, served: Served,
                                               learner: M2ForCausalLM) -> None:
    version, old = served.service.policy_version, served.logprobs(probe_ids(served, learner))
    learn(learner)
    first, second = bodies(learner, damage)
    if damage == "truncated":
        first = first[: len(first) // 2]
    answers = [upload(served, body, version + 1, i, 2) for i, body in enumerate((first, second))]
    refused = next(a for a in answers if a.status_code != 200)
    assert refused.status_code == 400, refused.text
    message = refused.json()["error"]["message"]
    assert message.startswith("weight update refused, the served weights are unchanged: ") and problem in message
    if answers[0].status_code == 400:  # the rest of a refused version is refused with the first reason
        assert answers[1].status_code == 400 and "was already refused" in answers[1].json()["error"]["message"]
    assert_unchanged(served, learner, version, old)
    HTTPSync(WeightClient(served.url), BUCKET).push(learner, version + 2)  # a new version starts afresh
    assert served.service.policy_version == version + 2


def test_a_truncated_disk_shard_is_refused(served: Served, learner: M2ForCausalLM, tmp_path: Path) -> None:
    version, old = served.service.policy_version, served.logprobs(probe_ids(served, learner))
    sync = transport("disk", served, tmp_path)
    sync.push(learner, version + 1)
    shard = sorted((tmp_path / "shared" / f"v{version + 1:06d}").glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:1000])
    answer = httpx.post(f"{served.url}/v1/weights", json={"path": str(shard.parent), "version": version + 2})
    assert answer.status_code == 400 and shard.name in answer.json()["error"]["message"]
    assert_unchanged(served, learner, version + 1, old)


def test_collective_metadata_is_checked_before_any_broadcast(served: Served, learner: M2ForCausalLM,
                                                             tmp_path: Path) -> None:
    sync = transport("collective", served, tmp_path)
    sync.push(learner, served.service.policy_version + 1)  # joins the group
    version, old = served.service.policy_version, served.logprobs(probe_ids(served, learner))
    meta = [{"name": n, "shape": list(t.shape), "dtype": "float32"} for n, t in wire_tensors(learner)]
    wrong = [dict(m, shape=[1, 2]) if m["name"] == EMBED else m for m in meta]
    for tensors, problem in ((meta[1:], f"lists {len(meta) - 1} of {len(meta)} tensors; missing e.g. ['{EMBED}']"),
                             (wrong, f"tensor {EMBED} has shape (1, 2)"),
                             ([dict(meta[0], dtype="int64"), *meta[1:]], "dtype int64")):
        with pytest.raises(WeightTransferError, match="answered 400") as info:
            sync.client.post(wire.COLLECTIVE_UPDATE_PATH,
                             json={"version": version + 1, "tensors": tensors, "ready_key": "ready/never"})
        assert problem in str(info.value)
    assert_unchanged(served, learner, version, old)
    learn(learner)
    sync.push(learner, version + 1)  # nothing was broadcast: the group is still good
    assert served.service.policy_version == version + 1
    sync.close()


def test_a_learner_that_stops_mid_broadcast_costs_the_server_its_timeout(served: Served, learner: M2ForCausalLM,
                                                                          tmp_path: Path) -> None:
    sync = transport("collective", served, tmp_path, group_timeout_s=2.0)
    sync.push(learner, served.service.policy_version + 1)
    version, old = served.service.policy_version, served.logprobs(probe_ids(served, learner))
    tensors = wire_tensors(learner)
    meta = [{"name": n, "shape": list(t.shape), "dtype": "float32"} for n, t in tensors]
    started = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        update = {"version": version + 1, "tensors": meta, "ready_key": "ready/dying"}
        answer = pool.submit(sync.client.post, wire.COLLECTIVE_UPDATE_PATH, json=update)
        while not sync.store.check(["ready/dying"]):
            time.sleep(0.01)
        for _, tensor in tensors[:3]:  # then the learner dies
            wire.broadcast(sync.group, tensor)
        with pytest.raises(WeightTransferError, match=f"broadcast failed at tensor 4 of {len(meta)}.*closed"):
            answer.result(timeout=30)
    assert time.monotonic() - started < 15
    assert httpx.get(f"{served.url}/health").status_code == 200
    assert_unchanged(served, learner, version, old)
    with pytest.raises(WeightTransferError, match="no weight group"):  # the old group is gone on the server
        sync.push(learner, version + 1)
    sync.push(learner, version + 1)  # after a failure the next push makes a new group
    assert served.service.policy_version == version + 1
    sync.close()


def test_ipc_is_refused_by_a_cpu_server_and_a_cpu_learner(served: Served, learner: M2ForCausalLM) -> None:
    answer = httpx.post(f"{served.url}{wire.IPC_UPDATE_PATH}",
                        json={"version": 1, "tensors": [{"name": EMBED, "handle": {}}]})
    assert answer.status_code == 400 and "CUDA IPC needs the served model on CUDA" in answer.text
    with pytest.raises(WeightTransferError, match="CUDA IPC needs the learner's weights on CUDA"):
        IPCSync(WeightClient(served.url)).push(learner, 1)


# ---------------------------------------------------------------------------------------------- policy.kind m2rl

def tiny_m2(seed: int = 0) -> M2ForCausalLM:
    return M2ForCausalLM(M2Config.from_preset("tiny")).init_weights(seed=seed)


def m2rl_backend(tmp_path: Path, sync: str):
    section = PolicySection(kind="m2rl", sync=sync, bucket_mb=1, startup_timeout_s=60, request_timeout_s=60)
    return build_backend(section, tiny_m2(), TOK, tmp_path, max_batch_size=2)


@pytest.mark.parametrize("sync", ["http", "collective"])
def test_kind_m2rl_starts_syncs_probes_and_stops_its_server(sync: str, tmp_path: Path) -> None:
    model = tiny_m2()
    backend = m2rl_backend(tmp_path, sync)
    assert isinstance(backend.sync, ServeSync) and backend.sync.name == f"m2rl-{sync}"
    try:
        first = backend.push(model, version=1)  # starts m2rl serve on these weights
        ids, logprobs, version = generate(backend)
        learn(model)
        second = backend.push(model, version=2)
        ids_after, logprobs_after, version_after = generate(backend)
    finally:
        process = backend.sync.server.process
        backend.close()
    assert first.parity is not None and first.parity.passed and first.version == 1 and first.rejected == 0
    assert second.parity is not None and second.parity.passed and second.version == 2
    assert (version, version_after) == (1, 2) and (ids_after, logprobs_after) != (ids, logprobs)
    assert process is not None and process.poll() is not None  # stopped, and its whole group with it
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)
    assert "serving 'm2rl-policy'" in (tmp_path / "generator" / "m2rl-serve.log").read_text()


def test_kind_m2rl_reports_a_dead_server_with_its_log_tail(tmp_path: Path) -> None:
    model = tiny_m2()
    backend = m2rl_backend(tmp_path, "http")
    try:
        backend.push(model, version=1)
        assert isinstance(backend.sync, ServeSync)
        process = backend.sync.server.process
        assert process is not None
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        with pytest.raises(M2RLServerError, match=r"(?s)exited with code -9; log .*m2rl-serve.log.*serving"):
            backend.push(model, version=2)
        with pytest.raises(M2RLServerError, match="exited with code -9"):
            generate(backend)  # a rollout request fails at once, not after every retry
    finally:
        backend.close()


# ---------------------------------------------------------------------------------------------- on GPUs

@pytest.mark.gpu
@pytest.mark.parametrize("sync", ["ipc", "collective"])
def test_gpu_transports_sync_probe_and_refuse_a_nan_update(sync: str, tmp_path: Path) -> None:
    """CUDA IPC (the server on the learner's GPU) and an NCCL broadcast (the server on a second GPU). In bfloat16:
    in float32 the tiny model's serving kernels ask for more shared memory than an H200 has (seen 2026-11-30);
    bf16 kernels differ from the learner's by up to ~0.15, a stale or corrupted generator by ~2 or more."""
    if sync == "collective" and torch.cuda.device_count() < 2:
        pytest.skip("NCCL puts each rank on its own GPU: needs two")
    model = tiny_m2().to(device="cuda:0", dtype=torch.bfloat16)
    section = PolicySection(kind="m2rl", sync=sync, device="cuda:1" if sync == "collective" else "cuda:0",
                            dtype="bfloat16", parity_tolerance=0.5, startup_timeout_s=120, request_timeout_s=120)
    backend = build_backend(section, model, TOK, tmp_path, max_batch_size=2)
    try:
        first = backend.push(model, version=1)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        second = backend.push(model, version=2)
        assert backend.sync.name == ("m2rl-collective-nccl" if sync == "collective" else "m2rl-ipc")
        with torch.no_grad():
            model.model.layers[1].block_sparse_moe.experts.w2[5, 0, 0] = float("nan")
        with pytest.raises(WeightTransferError, match="answered 400: weight update refused.*NaN"):
            backend.push(model, version=3)
        assert isinstance(backend.sync, ServeSync)
        health = httpx.get(f"{backend.sync.server.url}/health").json()
    finally:
        backend.close()
    for report in (first, second):
        assert report.parity is not None and report.parity.passed and report.rejected == 0, report
    assert (first.version, second.version, health["policy_version"]) == (1, 2, 2)
