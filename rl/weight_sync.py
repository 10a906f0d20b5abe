"""Weight sync: how the learner's new weights reach the generator, versioned and verified.

`policy.*` (PolicySection) picks the generator: the in-process model (`local`), our own `m2rl serve` started
and owned by the run (`m2rl`), a vLLM server the run starts and owns (`vllm`, `launch: true`), or any
OpenAI-compatible server (`openai`, frozen weights). Each comes with a `WeightSync` transport, and
`PolicyBackend.push` runs every sync the same way:

    transport.push(model, version)       # the generator now serves `model`, its outputs carry `version`
    parity probe (rl/parity.py)          # generator vs learner log-probs of a fixed probe sequence
    rejected? push again (policy.parity_retries), then SyncRejected: the run stops with its data kept

and reports `sync/seconds`, `sync/parity_max_abs_diff` and `sync/rejected`. The version travels with every
sampled token (PolicyOutput.policy_version -> Trajectory.policy_versions), so staleness is measurable.

Transports:
- `InProcessSync`: `load_state_dict` into the generator's copy (LocalPolicy.update_weights).
- `ServeSync` (kind m2rl): `m2rl serve` starts on the first push from a checkpoint of those weights
  (rl/m2rl_server.py); then every push goes through the transport `policy.sync` names (rl/weight_transfer.py, the server's end in
  model/serving/weight_transfer.py) while it keeps serving: `http` (safetensors buckets, uploaded), `disk`
  (safetensors shards in the run's generator/ folder, read by the server), `collective` (torch.distributed
  broadcast: NCCL between GPUs, gloo on the CPU) or `ipc` (CUDA IPC handles, one node). The server checks each
  update whole (names, shapes, dtypes, finite values) before swapping it in between two decode steps, and refuses
  a partial or corrupt one with a 400 naming the problem (`WeightTransferError`), keeping its weights and version.
  Seconds per GB of each: benchmarks/weight_sync.py.
- `RestartSync`: write a Hugging Face checkpoint (model/checkpoint.py) and restart the vLLM server on it,
  same port and served name. Measured on the 2-core CPU machine with the tiny M2 (8 MB): ~35-50 s a sync,
  nearly all of it vLLM's start-up.
- `NoSync`: a server we cannot write to (`openai`): the generator keeps its weights and its version.

What vLLM 0.32's CPU build offers instead of a restart (VLLM_SERVER_DEV_MODE=1, tried on 2026-11-30 with a
tiny softmax-routed M2, float32):
- `/init_weight_transfer_engine`, `/start_weight_update`, `/update_weights` answer 500 "Weight transfer
  not configured" without `--weight-transfer-config`, and every engine it registers (nccl, ipc,
  sparse_nccl, sharded_rdt, nccl_m2n, modelexpress) moves tensors over CUDA or RDMA.
- `/collective_rpc` `reload_weights` with `weights_path` (checkpoint format) fails in its layer-wise reload
  ("'functools.partial' object has no attribute '__name__'"); the next request kills the engine and the
  server exits a few seconds later.
- the same with `is_checkpoint_format: false` fails at the first expert tensor ("MoERunner has no
  attribute `0`") after copying the tensors whose names match (embeddings, norms, head): the server goes on
  serving a mixture of old and new weights (a probe log-prob moved from -8.19 to -8.52). The CPU linear
  layers also keep packed copies (their parameters checksum as empty in `/weight_checker`), so no
  kernel-format file could update them. Hence restart on CPU.
vLLM's own NCCL and IPC engines need a vLLM on GPUs, which the GPU machines here do not have (vLLM cannot be
installed there); the NCCL broadcast and CUDA IPC transports are therefore written for `m2rl serve` (kind m2rl),
whose GPU tests run through the device machines.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from m2rl.agent.vllm_server import VLLMServerError
from m2rl.rl.m2rl_server import M2RLServerError
from m2rl.rl.parity import GeneratorLogprobs, ModelLogprobs, ParityProbe, ParityResult, ServerLogprobs
from torch import nn

if TYPE_CHECKING:
    from m2rl.agent.local_policy import LocalPolicy
    from m2rl.agent.openai_policy import OpenAIPolicy
    from m2rl.agent.vllm_server import VLLMServer, VLLMServerConfig
    from m2rl.model.tokenizer import M2Tokenizer
    from m2rl.rl.m2rl_server import M2RLServer

PolicyKind = Literal["local", "m2rl", "vllm", "openai"]
POLICY_KINDS: tuple[str, ...] = ("local", "m2rl", "vllm", "openai")
SyncKind = Literal["http", "disk", "collective", "ipc"]
SYNC_KINDS: tuple[str, ...] = ("http", "disk", "collective", "ipc")
LAUNCHED_MODEL_NAME = "m2rl-policy"
GENERATOR_DIR = "generator"  # under the run directory: the launched server's checkpoint and log


@dataclass
class PolicySection:
    kind: PolicyKind = "local"
    """The generator rollouts sample from: local (the in-process model, a copy of the learner's weights synced
    in memory), m2rl (our own `m2rl serve`, started by the run and updated in place through policy.sync), vllm
    (a vLLM server started by the run from its weights, policy.launch=true, restarted on each update), or openai
    (any OpenAI-compatible server at policy.base_url; its weights stay as they are)."""
    sync: SyncKind = "http"
    """How kind m2rl's server gets each update: http (safetensors buckets uploaded), disk (safetensors shards in
    runs/<name>/generator/ that the server reads), collective (torch.distributed broadcast: NCCL when the learner
    is on CUDA, else gloo) or ipc (CUDA IPC handles to the learner's GPU memory; one node)."""
    device: str = ""
    """Torch device of kind m2rl's server (empty: cuda if available, else cpu). A collective sync over NCCL needs
    another GPU than the learner's."""
    bucket_mb: int = 256
    """MiB in one HTTP upload or disk shard of kind m2rl's sync; a larger tensor travels alone."""
    base_url: str = ""
    """The server of kind openai, e.g. http://127.0.0.1:8000/v1 (unused by local and by a launched vLLM)."""
    model: str = ""
    """The served model's name (kind openai); a launched server serves under this name (empty: m2rl-policy)."""
    launch: bool = False
    """Start and own a vLLM server from the current weights (kind vllm); it stops when the run ends, and its
    checkpoint and log are kept in runs/<name>/generator/."""
    request_timeout_s: float = 300.0
    """Seconds one generation request may take before it is retried."""
    startup_timeout_s: float = 300.0
    """Seconds a launched server may take to come up (each vLLM restart too); on 2 CPU cores vLLM takes ~40-70 s,
    m2rl serve ~5 s with the tiny policy."""
    dtype: str = "float32"
    """Weight dtype of a launched server (m2rl or vLLM): float32 matches the learner's probe log-probs to ~1e-5;
    bfloat16 rounding alone moves them by up to ~0.15 on the tiny policy (raise policy.parity_tolerance to ~0.5)."""
    parity_tolerance: float = 1e-3
    """Largest |generator - learner| log-prob on the probe sequence a sync may leave, else it is rejected. A
    generator one update stale differs by ~9 on the tiny policy, one with stale MoE experts by ~2."""
    parity_retries: int = 1
    """Pushes of the same weights after a rejected probe before the run stops (0: stop at once)."""


class WeightSync(Protocol):
    """A transport: after `push`, the generator serves `model`'s weights and labels its outputs `version`."""

    name: str

    def push(self, model: nn.Module, version: int) -> None: ...

    def close(self) -> None: ...


class InProcessSync:
    name = "in_process"

    def __init__(self, policy: LocalPolicy) -> None:
        self.policy = policy

    def push(self, model: nn.Module, version: int) -> None:
        self.policy.update_weights(model.state_dict(), version=version)

    def close(self) -> None:
        pass


class RestartSync:
    """Save a Hugging Face checkpoint, then (re)start the vLLM server on it. The server is created on the first
    push (there are no weights to serve before it); `server_config` fixes its port and served name, so the
    policy's base_url and model stay valid across restarts."""

    name = "restart"

    def __init__(self, server_config: VLLMServerConfig, directory: Path, policy: OpenAIPolicy,
                 tokenizer: M2Tokenizer | None) -> None:
        if server_config.port is None or server_config.served_model_name is None:
            raise ValueError("RestartSync needs a fixed port and served_model_name: clients outlive each restart")
        self.server_config, self.directory, self.policy, self.tokenizer = server_config, directory, policy, tokenizer
        self.server: VLLMServer | None = None

    def push(self, model: nn.Module, version: int) -> None:
        from dataclasses import replace

        from m2rl.agent.vllm_server import VLLMServer
        from m2rl.model.checkpoint import save_pretrained

        checkpoint = self.directory / f"v{version:06d}"
        save_pretrained(model, checkpoint, tokenizer=self.tokenizer)  # type: ignore[arg-type]
        if self.server is None:
            self.server = VLLMServer(replace(self.server_config, model_dir=checkpoint)).start()
        else:
            self.server.restart(checkpoint)
        self.policy.set_policy_version(version)
        for old in self.directory.glob("v*"):  # only the served checkpoint is worth its disk
            if old != checkpoint and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)

    def check_alive(self) -> None:
        if self.server is None:
            raise VLLMServerError("the vLLM server has not been started (no weights pushed yet)")
        self.server.check_alive()

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


class ServeSync:
    """Kind m2rl: start `m2rl serve` on the first push, from a checkpoint of those weights (there are none to
    serve before), then move every push through `transport` (rl/weight_transfer.py) while it serves."""

    def __init__(self, server: M2RLServer, transport: WeightSync, policy: OpenAIPolicy,
                 tokenizer: M2Tokenizer | None) -> None:
        self.server, self.transport, self.policy, self.tokenizer = server, transport, policy, tokenizer
        self.name = f"m2rl-{transport.name}"
        self.started = False

    def push(self, model: nn.Module, version: int) -> None:
        if not self.started:
            from m2rl.model.checkpoint import save_pretrained

            save_pretrained(model, self.server.config.model_dir, tokenizer=self.tokenizer)  # type: ignore[arg-type]
            self.started = True
            self.server.start()
        try:
            self.transport.push(model, version)
        except WeightTransferError:
            self.server.check_alive()  # a dead server is reported as such, with its log tail
            raise
        self.policy.set_policy_version(version)
        self.name = f"m2rl-{self.transport.name}"  # a collective transport names its backend once it has one

    def check_alive(self) -> None:
        if not self.started:
            raise M2RLServerError("m2rl serve has not been started (no weights pushed yet)")
        self.server.check_alive()

    def close(self) -> None:
        self.transport.close()
        self.server.stop()


class NoSync:
    """A server outside the run (kind openai): nothing reaches it, so neither its weights nor its version change."""

    name = "none"

    def push(self, model: nn.Module, version: int) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class SyncReport:
    version: int
    seconds: float  # in the transport, every attempt together (the probes excluded)
    parity: ParityResult | None  # the last attempt's probe; None: nothing was probed (NoSync)
    rejected: int  # attempts whose probe failed

    def metrics(self) -> dict[str, float]:
        out = {"policy_version": float(self.version), "sync/seconds": self.seconds, "sync/rejected": float(self.rejected)}
        if self.parity is not None:
            out["sync/parity_max_abs_diff"] = self.parity.max_abs_diff
        return out


class SyncRejected(RuntimeError):
    """The generator failed the parity probe after every retry; `report` says by how much."""

    def __init__(self, report: SyncReport) -> None:
        self.report = report
        parity = report.parity
        assert parity is not None
        super().__init__(
            f"weight sync to version {report.version} rejected {report.rejected} time(s): the generator's probe "
            f"log-probs differ from the learner's by up to {parity.max_abs_diff:.3g} (tolerance "
            f"{parity.tolerance:g}); the generator is not serving the learner's weights")


class WeightTransferError(RuntimeError):
    """A server refused or failed a weight update (rl/weight_transfer.py); it still serves its previous weights
    and version, and the message is its reason."""


# What ends a run as "the generator failed" (rl/trainer.py keeps the run's data and checkpoints its last step).
GENERATOR_FAILURES: tuple[type[BaseException], ...] = (VLLMServerError, M2RLServerError, WeightTransferError,
                                                       SyncRejected)


@dataclass
class PolicyBackend:
    """The generator side of training: the policy rollouts sample from, its transport and its parity probe."""

    policy: LocalPolicy | OpenAIPolicy
    sync: WeightSync
    generator_logprobs: GeneratorLogprobs | None  # None: nothing to probe (NoSync)
    probe: ParityProbe
    retries: int = 1
    generator_model: nn.Module | None = None  # the in-process copy (kind local)

    def push(self, model: nn.Module, version: int) -> SyncReport:
        """Sync `model` to the generator as `version` and probe it; raise SyncRejected if it never passes."""
        seconds, rejected, parity = 0.0, 0, None
        for _ in range(self.retries + 1):
            start = time.perf_counter()
            self.sync.push(model, version)
            seconds += time.perf_counter() - start
            served = self.policy.policy_version  # NoSync leaves it: the server's weights did not change
            if self.generator_logprobs is None:
                return SyncReport(served, seconds, None, 0)
            parity = self.probe.check(model, self.generator_logprobs)
            if parity.passed:
                return SyncReport(served, seconds, parity, rejected)
            rejected += 1
        raise SyncRejected(SyncReport(version, seconds, parity, rejected))

    def check_alive(self) -> None:
        """Raise (VLLMServerError or M2RLServerError, with its log tail) if a launched server is dead."""
        check = getattr(self.sync, "check_alive", None)
        if check is not None:
            check()

    def close(self) -> None:
        self.sync.close()


def build_backend(section: PolicySection, model: nn.Module, tokenizer: M2Tokenizer, run_directory: Path,
                  max_batch_size: int) -> PolicyBackend:
    """The generator `section` asks for; a launched server starts on the first `push`."""
    probe = ParityProbe.for_model(model, section.parity_tolerance, tokenizer)
    if section.kind == "local":
        import copy

        from m2rl.agent.local_policy import LocalPolicy

        # The generator's own copy of the weights, as it would be on another device: the probe and the
        # log-prob gap then compare two copies, not one tensor with itself.
        generator = copy.deepcopy(model).eval()
        for parameter in generator.parameters():
            parameter.requires_grad_(False)
        local = LocalPolicy(generator, tokenizer, max_batch_size=max_batch_size)
        return PolicyBackend(local, InProcessSync(local), ModelLogprobs(generator), probe, section.parity_retries,
                             generator_model=generator)
    from m2rl.agent.openai_policy import OpenAIPolicy

    if section.kind == "openai":
        served = OpenAIPolicy(section.base_url, section.model, timeout_s=section.request_timeout_s,
                              max_concurrency=max_batch_size)
        return PolicyBackend(served, NoSync(), None, probe, section.parity_retries)
    if section.kind == "m2rl":
        return _m2rl_backend(section, probe, tokenizer, run_directory, max_batch_size)
    from m2rl.agent.vllm_server import VLLMServerConfig, free_port

    directory = run_directory / GENERATOR_DIR
    directory.mkdir(parents=True, exist_ok=True)
    server_config = VLLMServerConfig(
        model_dir=directory, port=free_port(), dtype=section.dtype, served_model_name=section.model or LAUNCHED_MODEL_NAME,
        max_model_len=int(getattr(model.config, "max_position_embeddings", 2048)),
        startup_timeout_s=section.startup_timeout_s, log_path=directory / "vllm.log")
    served = OpenAIPolicy(f"http://{server_config.host}:{server_config.port}/v1", str(server_config.served_model_name),
                          timeout_s=section.request_timeout_s, max_concurrency=max_batch_size)
    restart = RestartSync(server_config, directory, served, tokenizer)
    served.server_check = restart.check_alive  # a dead server is reported with its log tail, not retried
    return PolicyBackend(served, restart, ServerLogprobs(served), probe, section.parity_retries)


def _m2rl_backend(section: PolicySection, probe: ParityProbe, tokenizer: M2Tokenizer, run_directory: Path,
                  max_batch_size: int) -> PolicyBackend:
    """`m2rl serve` on 127.0.0.1, its checkpoint, log and disk-sync shards in the run's generator/ folder."""
    from m2rl.rl.m2rl_server import M2RLServer, M2RLServerConfig
    from m2rl.rl.weight_transfer import WeightClient, build_transport

    directory = run_directory / GENERATOR_DIR
    directory.mkdir(parents=True, exist_ok=True)
    server = M2RLServer(M2RLServerConfig(
        model_dir=directory / "initial", device=section.device, dtype=section.dtype,
        served_model_name=section.model or LAUNCHED_MODEL_NAME, max_batch=max_batch_size,
        startup_timeout_s=section.startup_timeout_s, log_path=directory / "m2rl-serve.log"))
    served = server.policy(timeout_s=section.request_timeout_s, max_concurrency=max_batch_size)
    transport = build_transport(section.sync, WeightClient(server.url, timeout_s=section.request_timeout_s),
                                directory, section.bucket_mb * 2**20, section.request_timeout_s)
    sync = ServeSync(server, transport, served, tokenizer)
    return PolicyBackend(served, sync, ServerLogprobs(served), probe, section.parity_retries)
