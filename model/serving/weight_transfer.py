"""Weight updates pushed into a running `m2rl serve`, beside `POST /v1/weights` (a path on the server's disk):

    POST /v1/weights/upload?version=N&bucket=i&buckets=n   body: one bucket of tensors, safetensors bytes;
                                         bucket 0 first, the update is applied when all n have arrived
    POST /v1/weights/init_collective    {"init_method": "tcp://host:port", "world_size", "rank", "backend",
                                         "timeout_s"}: join the learner's weight group
    POST /v1/weights/collective_update  {"version", "tensors": [{"name", "shape", "dtype"}, ...], "ready_key"}:
                                         receive each tensor, in that order, by broadcast from rank 0 (the learner)
    POST /v1/weights/ipc_update         {"version", "tensors": [{"name", "handle"}, ...]}: CUDA IPC handles

Tensors travel under their checkpoint names (`checkpoint_layout`: one tensor per expert), as in the files
`/v1/weights` reads: a bucket can be smaller than one stacked expert parameter, and the learner sends views
of its own parameters (`checkpoint_tensors`) without copying them. One version's tensors are assembled in a
`WeightStaging` on the served model's device, each refused as it arrives if the model has no such name, it
came twice, its shape differs or its dtype is not floating point; the whole state dict then passes
`check_state_dict` (every name present, finite values) before the scheduler swaps it in between two steps.
A partial, malformed or corrupt update is therefore a 400 naming the problem, and the served weights and
version stay as they were.

The collective group is the server's own: a TCPStore at the learner's `init_method` (the learner, rank 0,
owns it) and a ProcessGroupGloo or ProcessGroupNCCL built on it, never torch.distributed's default group, so
a learner already in a default group (FSDP) adds the server beside it, and learner and server may even
share a process (the tests). Before broadcasting, the server sets the update's `ready_key` in the store once
it has accepted the metadata: a learner whose update is refused learns it from the HTTP answer instead of
waiting in a broadcast nobody joins. Every operation of the group has the timeout given at init, so a learner
that dies or hangs mid-update costs the server that long; the update is then refused and the group closed.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal
from urllib.parse import urlsplit

import torch
import torch.distributed as dist
from fastapi import FastAPI, Query, Request
from m2rl.model.checkpoint import TensorSlot, checkpoint_layout
from m2rl.model.m2 import M2ForCausalLM
from m2rl.model.serving.errors import ApiError
from m2rl.model.serving.service import Service
from m2rl.model.serving.weights import WeightUpdateError, check_state_dict
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load as load_safetensors

UPLOAD_PATH = "/v1/weights/upload"
INIT_COLLECTIVE_PATH = "/v1/weights/init_collective"
COLLECTIVE_UPDATE_PATH = "/v1/weights/collective_update"
IPC_UPDATE_PATH = "/v1/weights/ipc_update"
ENDPOINTS = (UPLOAD_PATH, INIT_COLLECTIVE_PATH, COLLECTIVE_UPDATE_PATH, IPC_UPDATE_PATH)

WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "float64": torch.float64}  # floating types load_state_dict casts to the model's; FP8 needs a block size
STORE_PREFIX = "m2rl-weights"
LEARNER_RANK = 0
REFUSED = "weight update refused, the served weights are unchanged"


def ready_key(version: int, update: int) -> str:
    """The store key the server sets once it accepted a collective update's metadata, before any broadcast;
    `update` counts the learner's updates in this group, so no key is ever seen twice."""
    return f"ready/{version}/{update}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- one version's tensors, assembled and checked ---------------------------------------------------------

class WeightStaging:
    """The state dict `model.load_state_dict` takes, filled tensor by tensor under checkpoint names."""

    def __init__(self, model: M2ForCausalLM) -> None:
        self.model = model
        self.layout: dict[str, TensorSlot] = checkpoint_layout(model.config)
        self.device = model.device
        self.state: dict[str, torch.Tensor] = {}
        self.received: set[str] = set()
        self.nbytes = 0

    def destination(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Where tensor `name` goes (a slice of a stacked parameter for an expert), after checking its name,
        shape and dtype; `accept(name)` once it holds the values."""
        slot = self.layout.get(name)
        if slot is None:
            raise WeightUpdateError(f"tensor {name} is not a tensor of the served model")
        if name in self.received:
            raise WeightUpdateError(f"tensor {name} was sent twice in one update")
        if tuple(shape) != slot.shape:
            raise WeightUpdateError(f"tensor {name} has shape {tuple(shape)}, expected {slot.shape}")
        if dtype not in WIRE_DTYPES.values():
            raise WeightUpdateError(f"tensor {name} has dtype {dtype_name(dtype)}; send one of {', '.join(WIRE_DTYPES)}")
        if slot.expert is None:
            self.state[slot.target] = torch.empty(slot.shape, dtype=dtype, device=self.device)
            return self.state[slot.target]
        experts = self.model.config.num_local_experts
        stacked = self.state.setdefault(slot.target, torch.empty((experts, *slot.shape), dtype=dtype,
                                                                  device=self.device))
        if stacked.dtype != dtype:
            raise WeightUpdateError(f"tensor {name} has dtype {dtype_name(dtype)}, the other experts of "
                                    f"{slot.target} {dtype_name(stacked.dtype)}")
        return stacked[slot.expert]

    def accept(self, name: str, nbytes: int) -> None:
        self.received.add(name)
        self.nbytes += nbytes

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.destination(name, tuple(tensor.shape), tensor.dtype).copy_(tensor)
        self.accept(name, tensor.numel() * tensor.element_size())

    def check_finite(self, names: list[str]) -> None:
        """Refuse NaN or inf in these tensors now (one device sync), naming the first."""
        views = [self._view(name) for name in names]
        if not views:
            return
        finite = torch.stack([torch.isfinite(v).all() for v in views]).cpu()
        if not bool(finite.all()):
            bad = names[int((~finite).nonzero()[0])]
            raise WeightUpdateError(f"tensor {bad} holds NaN or infinite values")

    def _view(self, name: str) -> torch.Tensor:
        slot = self.layout[name]
        stacked = self.state[slot.target]
        return stacked if slot.expert is None else stacked[slot.expert]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The complete state dict, checked against the served model; refused if any tensor is missing."""
        missing = [name for name in self.layout if name not in self.received]
        if missing:
            raise WeightUpdateError(f"the update is missing {len(missing)} of {len(self.layout)} tensors, "
                                    f"e.g. {missing[:3]}")
        check_state_dict(self.state, self.model)
        return self.state


# ---- HTTP: bucketed safetensors uploads ------------------------------------------------------------------

@dataclass
class _Upload:
    version: int
    buckets: int
    staging: WeightStaging
    arrived: set[int] = field(default_factory=set)


class UploadBuckets:
    """Buckets of one version staged until all have arrived. Bucket 0 opens a version (again, after a refusal:
    a retry), discarding whatever was staged; the others follow in any order. A refused bucket discards its
    version, and its later buckets are refused with the first reason."""

    def __init__(self, model: M2ForCausalLM) -> None:
        self.model = model
        self.upload: _Upload | None = None
        self.refused: tuple[int, str] | None = None  # (version, why)

    def add(self, version: int, bucket: int, buckets: int, body: bytes) -> WeightStaging | None:
        """Stage one bucket (blocking: call off the event loop); the complete staging after the last one."""
        if bucket >= buckets:
            raise WeightUpdateError(f"bucket {bucket} of {buckets}: bucket must be < buckets")
        if bucket == 0:
            self.upload, self.refused = _Upload(version, buckets, WeightStaging(self.model)), None
        if self.refused is not None and self.refused[0] == version:
            raise WeightUpdateError(f"version {version} was already refused: {self.refused[1]}")
        upload = self.upload
        if upload is None or upload.version != version:
            raise WeightUpdateError(f"bucket {bucket} of version {version} came before its bucket 0")
        try:
            self._stage(upload, bucket, buckets, body)
        except WeightUpdateError as exc:
            self.upload, self.refused = None, (version, f"bucket {bucket} of {buckets}: {exc}")
            raise WeightUpdateError(self.refused[1]) from exc
        if len(upload.arrived) < buckets:
            return None
        self.upload = None
        return upload.staging

    @staticmethod
    def _stage(upload: _Upload, bucket: int, buckets: int, body: bytes) -> None:
        if buckets != upload.buckets:
            raise WeightUpdateError(f"this version has {upload.buckets} buckets, this one says {buckets}")
        if bucket in upload.arrived:
            raise WeightUpdateError("sent twice")
        try:
            tensors = load_safetensors(body)
        except Exception as exc:  # SafetensorError (a Rust type) on a truncated or foreign body
            raise WeightUpdateError(f"not a readable safetensors body of {len(body)} bytes ({exc})") from exc
        for name, tensor in tensors.items():
            upload.staging.add(name, tensor)
        upload.staging.check_finite(list(tensors))
        upload.arrived.add(bucket)


# ---- torch.distributed: broadcast from the learner ------------------------------------------------------

def weight_store(init_method: str, world_size: int, rank: int, timeout: timedelta) -> dist.Store:
    """The weight group's store: rank 0 (the learner) hosts a TCPStore at `init_method` (tcp://host:port)."""
    address = urlsplit(init_method)
    if address.scheme != "tcp" or not address.hostname or not address.port:
        raise ValueError(f"init_method must be tcp://host:port, got {init_method!r}")
    store = dist.TCPStore(address.hostname, address.port, world_size, is_master=rank == LEARNER_RANK,
                          timeout=timeout, wait_for_workers=False)
    return dist.PrefixStore(STORE_PREFIX, store)


def weight_group(store: dist.Store, backend: str, world_size: int, rank: int, timeout: timedelta) -> Any:
    """A process group of its own for weight updates (never the default group); returns once every rank has
    joined. Each of its operations fails after `timeout`."""
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world_size, options)
    raise ValueError(f"backend must be gloo or nccl, got {backend!r}")


def joining_key(rank: int) -> str:
    """The store key a server rank sets once it accepted init_collective, before the rendezvous."""
    return f"joining/{rank}"


def broadcast(group: Any, tensor: torch.Tensor) -> None:
    options = dist.BroadcastOptions()
    options.rootRank = LEARNER_RANK
    group.broadcast([tensor], options).wait()


class InitCollective(BaseModel):
    model_config = ConfigDict(extra="forbid")
    init_method: str = Field(min_length=1)  # tcp://host:port of the learner's TCPStore
    world_size: int = Field(2, ge=2)
    rank: int = Field(1, ge=1)  # rank 0 is the learner
    backend: Literal["gloo", "nccl"] = "gloo"
    timeout_s: float = Field(600.0, gt=0)  # each operation of the group, the rendezvous included


class TensorMeta(BaseModel):
    name: str
    shape: list[int]
    dtype: str


class CollectiveUpdate(BaseModel):
    version: int = Field(ge=0)
    tensors: list[TensorMeta] = Field(min_length=1)
    ready_key: str = Field(min_length=1)  # ready_key(version, n): set in the store before the first broadcast


class CollectiveReceiver:
    """The server's end of the weight group; `None` until init_collective, and again after a failure."""

    def __init__(self, model: M2ForCausalLM) -> None:
        self.model = model
        self.group: Any = None
        self.store: dist.Store | None = None

    def join(self, body: InitCollective) -> None:
        """Blocking (the rendezvous): call off the event loop."""
        if body.rank >= body.world_size:
            raise ApiError(400, f"rank {body.rank} is not < world_size {body.world_size}", "rank")
        if body.backend == "nccl" and self.model.device.type != "cuda":
            raise ApiError(400, f"backend nccl needs the served model on CUDA; it is on {self.model.device}: "
                                "use gloo", "backend")
        self.group = self.store = None  # a new group replaces the old one, which may be broken
        if self.model.device.type == "cuda":
            torch.cuda.set_device(self.model.device)
        timeout = timedelta(seconds=body.timeout_s)
        try:
            store = weight_store(body.init_method, body.world_size, body.rank, timeout)
            store.set(joining_key(body.rank), "1")
            self.group = weight_group(store, body.backend, body.world_size, body.rank, timeout)
        except ValueError as exc:
            raise ApiError(400, str(exc), "init_method") from exc
        except Exception as exc:  # DistStoreError, DistNetworkError, a timeout: the learner's side
            raise ApiError(400, f"could not join the weight group at {body.init_method}: "
                                f"{type(exc).__name__}: {_first_line(exc)}", "init_method") from exc
        self.store = store

    def receive(self, body: CollectiveUpdate) -> WeightStaging:
        """Blocking: check the metadata, signal ready, receive every tensor into a staging."""
        group, store = self.group, self.store
        if group is None or store is None:
            raise WeightUpdateError(f"no weight group: POST {INIT_COLLECTIVE_PATH} first")
        if self.model.device.type == "cuda":
            torch.cuda.set_device(self.model.device)  # per thread, and this is a worker thread
        staging = WeightStaging(self.model)
        destinations: list[tuple[str, torch.Tensor]] = []
        for meta in body.tensors:
            dtype = WIRE_DTYPES.get(meta.dtype)
            if dtype is None:
                raise WeightUpdateError(f"tensor {meta.name} has dtype {meta.dtype}; send one of {', '.join(WIRE_DTYPES)}")
            destination = staging.destination(meta.name, tuple(meta.shape), dtype)
            staging.accept(meta.name, destination.numel() * destination.element_size())
            destinations.append((meta.name, destination))
        missing = [name for name in staging.layout if name not in staging.received]
        if missing:  # before any broadcast: the learner would send a partial update for nothing
            raise WeightUpdateError(f"the update lists {len(body.tensors)} of {len(staging.layout)} tensors; "
                                    f"missing e.g. {missing[:3]}")
        store.set(body.ready_key, "1")
        done = 0
        try:
            for _, tensor in destinations:
                broadcast(group, tensor)
                done += 1
            if self.model.device.type == "cuda":
                torch.cuda.synchronize(self.model.device)
        except Exception as exc:  # a timeout, a learner gone: this group is finished
            self.group = self.store = None
            name = destinations[min(done, len(destinations) - 1)][0]
            raise WeightUpdateError(f"the broadcast failed at tensor {done + 1} of {len(destinations)} ({name}): "
                                    f"{type(exc).__name__}: {_first_line(exc)}; the weight group is closed, "
                                    f"POST {INIT_COLLECTIVE_PATH} again") from exc
        return staging


# ---- CUDA IPC: handles to the learner's own memory ------------------------------------------------------

class IPCTensor(BaseModel):
    name: str
    handle: dict[str, Any]  # encode_ipc_handle's fields


class IPCUpdate(BaseModel):
    version: int = Field(ge=0)
    tensors: list[IPCTensor] = Field(min_length=1)


_IPC_FIELDS = ("tensor_cls", "size", "stride", "offset", "storage_cls", "dtype", "device", "storage_handle",
               "storage_size_bytes", "storage_offset_bytes", "requires_grad", "ref_counter_handle",
               "ref_counter_offset", "event_handle", "event_sync_required")  # rebuild_cuda_tensor's arguments
_IPC_BYTES = ("storage_handle", "ref_counter_handle", "event_handle")


def encode_ipc_handle(tensor: torch.Tensor) -> dict[str, Any]:
    """The CUDA IPC handle of `tensor`'s memory as JSON (no pickle: the server rebuilds the tensor from these
    fields alone). The caller keeps `tensor` alive until the server has answered."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

    rebuild, args = reduce_tensor(tensor)
    if rebuild is not rebuild_cuda_tensor or len(args) != len(_IPC_FIELDS):
        raise ValueError(f"tensor on {tensor.device} has no CUDA IPC handle")
    out = dict(zip(_IPC_FIELDS, args))
    out["tensor_cls"] = out["storage_cls"] = None  # the server decides its own classes
    out["size"], out["stride"], out["dtype"] = list(out["size"]), list(out["stride"]), dtype_name(tensor.dtype)
    for key in _IPC_BYTES:
        if out[key] is not None:
            out[key] = base64.b64encode(out[key]).decode()
    return out


def decode_ipc_handle(handle: Mapping[str, Any]) -> torch.Tensor:
    """The learner's tensor, mapped into this process (no copy); refused unless every field is there."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    missing = [key for key in _IPC_FIELDS if key not in handle]
    if missing:
        raise WeightUpdateError(f"an IPC handle lacks {missing}")
    fields = dict(handle)
    dtype = WIRE_DTYPES.get(str(fields["dtype"]))
    if dtype is None:
        raise WeightUpdateError(f"an IPC handle has dtype {fields['dtype']}; send one of {', '.join(WIRE_DTYPES)}")
    try:
        for key in _IPC_BYTES:
            if fields[key] is not None:
                fields[key] = base64.b64decode(fields[key], validate=True)
        fields.update(tensor_cls=torch.Tensor, storage_cls=torch.storage.TypedStorage, dtype=dtype,
                      requires_grad=False, size=torch.Size(fields["size"]), stride=tuple(fields["stride"]))
        return rebuild_cuda_tensor(*(fields[key] for key in _IPC_FIELDS))
    except Exception as exc:  # a bad handle, another node's memory, a freed allocation
        raise WeightUpdateError(f"an IPC handle could not be opened: {type(exc).__name__}: {_first_line(exc)}") from exc


def receive_ipc(model: M2ForCausalLM, body: IPCUpdate) -> WeightStaging:
    """Blocking: map each handle, copy it into the staging, drop the mapping."""
    staging = WeightStaging(model)
    for entry in body.tensors:
        shared = decode_ipc_handle(entry.handle)
        staging.add(entry.name, shared)
        del shared
    torch.cuda.synchronize(model.device)  # every copy is done before the learner may free its memory
    return staging


# ---- the routes ------------------------------------------------------------------------------------------

def add_weight_routes(app: FastAPI, service: Service) -> None:
    uploads = UploadBuckets(service.model)
    upload_lock = asyncio.Lock()  # buckets are staged one at a time
    receiver = CollectiveReceiver(service.model)

    def refused(exc: WeightUpdateError, param: str) -> ApiError:
        service.metrics.weight_updates.labels(result="refused").inc()
        return ApiError(400, f"{REFUSED}: {exc}", param)

    async def apply(stage: Callable[[], WeightStaging], version: int, param: str) -> dict[str, Any]:
        """Stage (blocking, off the event loop, holding the weights lock), check, swap in; answer what moved."""
        started, staged = time.monotonic(), []

        def read() -> dict[str, torch.Tensor]:
            staged.append(stage())
            return staged[0].state_dict()

        try:
            applied = await service.apply_weights(read, version)
        except WeightUpdateError as exc:
            raise refused(exc, param) from exc
        except Exception:
            service.metrics.weight_updates.labels(result="refused").inc()
            raise
        service.metrics.weight_updates.labels(result="applied").inc()
        return {"policy_version": applied, "bytes": staged[0].nbytes, "seconds": round(time.monotonic() - started, 4)}

    @app.post(UPLOAD_PATH)
    async def upload(request: Request, version: int = Query(ge=0), bucket: int = Query(ge=0),
                     buckets: int = Query(ge=1)) -> dict[str, Any]:
        body = await request.body()
        async with upload_lock:
            try:
                staging = await asyncio.to_thread(uploads.add, version, bucket, buckets, body)
            except WeightUpdateError as exc:
                raise refused(exc, "body") from exc
        if staging is None:
            return {"policy_version": service.policy_version, "version": version, "bucket": bucket,
                    "buckets": buckets, "staged": True}
        return await apply(lambda: staging, version, "body")

    @app.post(INIT_COLLECTIVE_PATH)
    async def init_collective(body: InitCollective) -> dict[str, Any]:
        async with service.weights_lock:  # not while an update is using the old group
            await asyncio.to_thread(receiver.join, body)
        return {"policy_version": service.policy_version, "backend": body.backend, "rank": body.rank}

    @app.post(COLLECTIVE_UPDATE_PATH)
    async def collective_update(body: CollectiveUpdate) -> dict[str, Any]:
        return await apply(lambda: receiver.receive(body), body.version, "tensors")

    @app.post(IPC_UPDATE_PATH)
    async def ipc_update(body: IPCUpdate) -> dict[str, Any]:
        if service.model.device.type != "cuda":
            raise ApiError(400, f"CUDA IPC needs the served model on CUDA; it is on {service.model.device}: "
                                "use the HTTP upload or the collective update", "tensors")
        return await apply(lambda: receive_ipc(service.model, body), body.version, "tensors")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]
