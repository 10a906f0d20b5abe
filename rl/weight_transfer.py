"""The learner's end of the weight transports into a running `m2rl serve` (the server's end, and the wire
protocol, is model/serving/weight_transfer.py). Each is a `WeightSync` (rl/weight_sync.py):

    DiskSync        save_pretrained in safetensors shards of `bucket_bytes` to a directory the server also
                    sees, then POST /v1/weights {"path"}: the server reads and checks them
    HTTPSync        the same tensors as safetensors buckets of `bucket_bytes`, uploaded one request each
    CollectiveSync  torch.distributed broadcast, rank 0 (here) to the server: NCCL when the weights are on
                    CUDA, gloo on the CPU; the group is made on the first push and kept
    IPCSync         CUDA IPC handles to the learner's own parameters: the server copies from them (one node)

Tensors go under their checkpoint names (`checkpoint_tensors`: views of the parameters, one per expert). A
push returns once the server has applied the update, or raises `WeightTransferError` with the server's reason
(the server then still serves its previous weights and version). `last_bytes` is what the last push moved,
for seconds-per-GB (benchmarks/weight_sync.py).
"""

from __future__ import annotations

import http.client
import json
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import torch
from m2rl.model.checkpoint import checkpoint_tensors, save_pretrained
from m2rl.model.m2 import M2ForCausalLM
from m2rl.model.serving import weight_transfer as wire
from m2rl.rl.weight_sync import SYNC_KINDS, WeightTransferError
from safetensors.torch import save as save_safetensors
from torch import nn

DEFAULT_BUCKET_BYTES = 256 * 2**20  # one HTTP body or disk shard; a larger single tensor travels alone
KEY_POLL_S = 0.005


def _m2(model: nn.Module) -> M2ForCausalLM:
    if not isinstance(model, M2ForCausalLM):
        raise TypeError(f"weight transports send an M2ForCausalLM, got {type(model).__name__}")
    return model


def wire_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(checkpoint name, contiguous tensor) for every tensor the server expects: views, no copies."""
    return [(name, tensor.contiguous()) for name, tensor in checkpoint_tensors(_m2(model))]


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def buckets(tensors: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of at most `bucket_bytes` (a larger tensor is a group of its own)."""
    groups: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, tensor in tensors:
        if groups[-1] and size + nbytes(tensor) > bucket_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, tensor))
        size += nbytes(tensor)
    return groups


class WeightClient:
    """POSTs to the server's weight endpoints; a refusal raises WeightTransferError with the server's message."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        self.base_url, self.timeout_s = base_url.rstrip("/").removesuffix("/v1"), timeout_s
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout_s)

    def post(self, path: str, **request: Any) -> dict[str, Any]:
        try:
            response = self.http.post(path, **request)
        except httpx.TransportError as exc:
            raise WeightTransferError(f"{self.base_url}{path}: {type(exc).__name__}: {exc}") from exc
        return self._answer(path, response.status_code, response.content)

    def upload(self, path: str, body: bytes, params: dict[str, int]) -> dict[str, Any]:
        """POST raw bytes. Through http.client, not httpx: httpx sent a 225 MB body at ~0.1 GB/s on the 2-core
        CPU machine (its writes re-slice the remaining body), http.client at ~0.5 GB/s, what uvicorn reads."""
        address = urlsplit(self.base_url)
        connection = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port, timeout=self.timeout_s)
        try:
            connection.request("POST", f"{path}?{urlencode(params)}", body=body, headers={
                **self.headers, "Content-Type": "application/octet-stream"})
            response = connection.getresponse()
            return self._answer(path, response.status, response.read())
        except (OSError, http.client.HTTPException) as exc:
            raise WeightTransferError(f"{self.base_url}{path}: {type(exc).__name__}: {exc}") from exc
        finally:
            connection.close()

    def _answer(self, path: str, status: int, content: bytes) -> dict[str, Any]:
        if status >= 400:
            try:
                message = json.loads(content)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = content[:500].decode(errors="replace")
            raise WeightTransferError(f"{self.base_url}{path} answered {status}: {message}")
        answer: dict[str, Any] = json.loads(content)
        return answer

    def close(self) -> None:
        self.http.close()


class DiskSync:
    """A safetensors checkpoint in `directory` (which the server must see at the same path), then its path."""

    name = "disk"

    def __init__(self, client: WeightClient, directory: Path, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.client, self.directory, self.bucket_bytes = client, Path(directory).resolve(), bucket_bytes
        self.last_bytes = 0

    def push(self, model: nn.Module, version: int) -> None:
        checkpoint = self.directory / f"v{version:06d}"
        save_pretrained(_m2(model), checkpoint, max_shard_bytes=self.bucket_bytes)
        self.last_bytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
        self.client.post("/v1/weights", json={"path": str(checkpoint), "version": version})
        for old in self.directory.glob("v*"):  # the server has read it: only the newest is worth its disk
            if old != checkpoint and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        self.client.close()


class HTTPSync:
    """Buckets of safetensors bytes, one POST each; the server applies the version once all have arrived."""

    name = "http"

    def __init__(self, client: WeightClient, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.client, self.bucket_bytes = client, bucket_bytes
        self.last_bytes = 0

    def push(self, model: nn.Module, version: int) -> None:
        groups = buckets(wire_tensors(model), self.bucket_bytes)
        self.last_bytes = 0
        for i, group in enumerate(groups):
            body = save_safetensors({name: tensor.cpu() for name, tensor in group})
            self.client.upload(wire.UPLOAD_PATH, body, {"version": version, "bucket": i, "buckets": len(groups)})
            self.last_bytes += len(body)

    def close(self) -> None:
        self.client.close()


def _wait_for_key(store: Any, key: str, answer: Future[dict[str, Any]], timeout_s: float) -> None:
    """Until the server sets `key` in the store; if it answers first, that answer is its refusal."""
    deadline = time.monotonic() + timeout_s
    while not store.check([key]):
        if answer.done():
            result = answer.result()  # a refusal raises WeightTransferError with the server's reason
            raise WeightTransferError(f"the server answered {result} without setting {key!r}")
        if time.monotonic() > deadline:
            raise WeightTransferError(f"the server did not set {key!r} in {timeout_s:.0f} s")
        time.sleep(KEY_POLL_S)
    store.delete_key(key)


class CollectiveSync:
    """Broadcast from this process (rank 0 of a group of two) to the server (rank 1). The group is the
    weights' own (model/serving/weight_transfer.py: never the default group) and is made on the first push;
    a failed broadcast closes it on both sides, and the next push makes a new one."""

    name = "collective"

    def __init__(self, client: WeightClient, backend: str | None = None, host: str = "127.0.0.1",
                 timeout_s: float = 600.0) -> None:
        self.client, self.backend, self.host, self.timeout_s = client, backend, host, timeout_s
        self.group: Any = None
        self.store: Any = None
        self.updates = 0  # in this group: each update's ready key is new
        self.last_bytes = 0

    def _in_background(self, path: str, body: dict[str, Any]) -> tuple[ThreadPoolExecutor, Future[dict[str, Any]]]:
        pool = ThreadPoolExecutor(1, thread_name_prefix="m2rl-weights")
        return pool, pool.submit(self.client.post, path, json=body)

    def _join(self, device: torch.device) -> None:
        from m2rl.agent.vllm_server import free_port

        backend = self.backend or ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        init_method = f"tcp://{self.host}:{free_port(self.host)}"
        timeout = timedelta(seconds=self.timeout_s)
        store = wire.weight_store(init_method, 2, wire.LEARNER_RANK, timeout)
        body = {"init_method": init_method, "world_size": 2, "rank": 1, "backend": backend,
                "timeout_s": self.timeout_s}
        pool, answer = self._in_background(wire.INIT_COLLECTIVE_PATH, body)
        with pool:
            _wait_for_key(store, wire.joining_key(1), answer, self.timeout_s)
            group = wire.weight_group(store, backend, 2, wire.LEARNER_RANK, timeout)
            answer.result()
        self.group, self.store, self.updates, self.name = group, store, 0, f"collective-{backend}"

    def push(self, model: nn.Module, version: int) -> None:
        tensors = wire_tensors(model)
        device = tensors[0][1].device
        if self.group is None:
            self._join(device)
        meta = [{"name": name, "shape": list(t.shape), "dtype": wire.dtype_name(t.dtype)} for name, t in tensors]
        key = wire.ready_key(version, self.updates)
        self.updates += 1
        pool, answer = self._in_background(wire.COLLECTIVE_UPDATE_PATH,
                                           {"version": version, "tensors": meta, "ready_key": key})
        with pool:
            try:
                _wait_for_key(self.store, key, answer, self.timeout_s)
            except WeightTransferError:
                self.group = self.store = None  # the server may have closed its end: the next push rejoins
                raise
            try:
                for _, tensor in tensors:
                    wire.broadcast(self.group, tensor)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            except Exception as exc:  # a timeout or a server gone: this group is finished
                self.group = self.store = None
                raise WeightTransferError(f"the weight broadcast failed: {type(exc).__name__}: {exc}") from exc
            answer.result()
        self.last_bytes = sum(nbytes(t) for _, t in tensors)

    def close(self) -> None:
        self.group = self.store = None
        self.client.close()


class IPCSync:
    """CUDA IPC handles to the learner's parameters: the server (same node, same device numbering) maps and
    copies them; they stay alive here until it has answered."""

    name = "ipc"

    def __init__(self, client: WeightClient) -> None:
        self.client = client
        self.last_bytes = 0

    def push(self, model: nn.Module, version: int) -> None:
        tensors = wire_tensors(model)
        device = tensors[0][1].device
        if device.type != "cuda":
            raise WeightTransferError(f"CUDA IPC needs the learner's weights on CUDA; they are on {device}")
        torch.cuda.synchronize(device)  # the server reads them from another process: they must be final
        handles = [{"name": name, "handle": wire.encode_ipc_handle(tensor)} for name, tensor in tensors]
        self.client.post(wire.IPC_UPDATE_PATH, json={"version": version, "tensors": handles})
        self.last_bytes = sum(nbytes(t) for _, t in tensors)  # the answer came after the server's copies

    def close(self) -> None:
        self.client.close()


def build_transport(kind: str, client: WeightClient, directory: Path, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                    timeout_s: float = 600.0) -> DiskSync | HTTPSync | CollectiveSync | IPCSync:
    """The transport `policy.sync` names; `directory` holds DiskSync's checkpoints."""
    if kind == "disk":
        return DiskSync(client, directory, bucket_bytes)
    if kind == "http":
        return HTTPSync(client, bucket_bytes)
    if kind == "collective":
        return CollectiveSync(client, timeout_s=timeout_s)
    if kind == "ipc":
        return IPCSync(client)
    raise ValueError(f"unknown weight transport {kind!r}; choose one of {', '.join(SYNC_KINDS)}")
