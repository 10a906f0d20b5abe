"""Data-parallel learning over torch.distributed: FSDP2 sharding, balanced row splits, global reductions.

Every rank holds the same rollout batch (rl/trainer.py broadcasts it from rank 0) and picks the same
mini-batches from it (the shuffle is seeded). Each mini-batch is then split by tokens across the ranks;
each rank backpropagates its share with the loss normalised by the mini-batch's GLOBAL loss-token count
(`global_normalizer`), and FSDP2 SUMS the gradients (not its default mean). The sum over ranks of
sum_{own tokens} x / N_global is the one-process gradient sum_{all tokens} x / N_global, so the optimizer
step is the one-process step up to float rounding (tests/rl/test_distributed.py checks it).

    parallel = init_distributed(DistributedConfig(), "cuda")   # SingleProcess() when not under torchrun
    learner = Learner(model, config, parallel=parallel)         # shards the model, then builds AdamW
    learner.update(batch)                                       # the same batch on every rank
    state = parallel.full_state_dict(learner.model)             # full tensors on rank 0, {} elsewhere

Sharding (`shard_model`): `fully_shard` on each decoder layer, then on the root (embeddings, final norm, LM
head). Parameters become DTensors sharded on dim 0 (rows of each matrix, the expert dim of MoE weights);
a layer's full weights exist only between its all-gather and its reshard. The optimizer is built on the
DTensors, so its state is sharded too: memory per rank ~ (weights + grads + 2 Adam moments) / world.

FSDP's collectives are matched across ranks by order, so every rank must run the same number of forwards
and backwards: a rank with fewer micro-batches than another runs zero-loss ones (`Learner` asks
`max_count`). The learner reads `model.lm_head.weight` outside `forward` (the chunked log-prob head), so
`hidden_states` is registered as an FSDP forward method: calling it unshards the root, which stays unsharded
until its backward.

Scaling out. The code does not assume one node or two GPUs:
- any number of ranks on any number of nodes: `torchrun --nnodes N --nproc-per-node G --rdzv-backend c10d
  --rdzv-endpoint HOST:PORT -m m2rl.cli train ...` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR, which
  `init_distributed` reads; each rank takes cuda:LOCAL_RANK;
- across nodes, sharding every layer over all N*G ranks puts every all-gather on the slower inter-node
  links. `replicas: N` makes a 2D mesh (replicate N, shard G): HSDP, weights sharded within a node and
  replicated across nodes; gradients are reduce-scattered within the node, then all-reduced across nodes;
- the control messages (the batch, the trainer's commands) go over a gloo group on the CPU, so the other
  ranks may wait for rank 0's rollouts longer than an NCCL collective is allowed to wait.
What does not scale yet: the weight sync gathers the full state dict to rank 0's CPU and pushes it from one
process (fine up to models whose full copy fits a host; beyond that, a per-tensor `full_tensor()` streamed
into the transport).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, cast

import torch
import torch.distributed as dist
from m2rl.rl.batch import RolloutBatch
from m2rl.rl.losses import Aggregation, default_normalizer
from torch import Tensor, nn

__all__ = [
    "DataParallel", "DistributedConfig", "SingleProcess", "clip_grad_norm", "global_normalizer", "init_distributed",
    "launched_rank", "shard_model", "split_batch", "split_rows", "under_torchrun",
]

DtypeName = Literal["float32", "bfloat16", "float16"]


@dataclass
class DistributedConfig:
    """Data-parallel training when launched with several processes (`distributed.*` in the train config)."""

    enabled: bool = True
    """Shard the learner over the ranks torchrun starts (FSDP2). A single process is unaffected; false under
    torchrun is an error (every rank would train, and write, a run of its own)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend of the learner's collectives: auto is nccl on CUDA, gloo on the CPU."""
    replicas: int = 1
    """HSDP: split the ranks into this many groups (e.g. one per node); weights are sharded within a group and
    replicated across groups. 1: plain FSDP over all ranks."""
    reshard_after_forward: bool = True
    """Free each layer's gathered weights after its forward (all-gather again in backward): less memory, one
    more all-gather per layer. false: keep them until the backward (ZeRO-2-like)."""
    param_dtype: DtypeName | None = None
    """Mixed precision: dtype the gathered weights are computed in (e.g. bfloat16); null: their own dtype."""
    reduce_dtype: DtypeName | None = None
    """Mixed precision: dtype of the gradient reduce-scatter (e.g. float32 under bfloat16 params); null:
    param_dtype's."""
    timeout_s: float = 1800.0
    """Seconds a learner collective (all-gather, reduce-scatter, metric reduction) may wait for the others."""
    follower_timeout_s: float = 86400.0
    """Seconds ranks other than 0 wait for rank 0's next command (it runs rollouts and evaluations alone)."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"distributed.replicas must be >= 1, got {self.replicas}")
        if not self.timeout_s > 0 or not self.follower_timeout_s > 0:
            raise ValueError("distributed.timeout_s and distributed.follower_timeout_s must be > 0")


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher with its environment) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 when not under torchrun), before any group exists."""
    return int(os.environ["RANK"]) if under_torchrun() else 0


# ------------------------------------------------------------------------------------------ row splits


def split_rows(rows: list[int], lengths: list[int], world: int) -> list[list[int]]:
    """Deal `rows` to `world` shares with near-equal tokens: longest row first onto the share with the fewest
    tokens so far (ties: fewer rows, then the lower rank). Deterministic; every row lands in exactly one share,
    each share keeps the rows' given order. A share may be empty (fewer rows than ranks)."""
    shares: list[list[int]] = [[] for _ in range(world)]
    tokens = [0] * world
    for row in sorted(rows, key=lambda r: (-lengths[r], r)):
        rank = min(range(world), key=lambda k: (tokens[k], len(shares[k]), k))
        shares[rank].append(row)
        tokens[rank] += lengths[row]
    position = {row: i for i, row in enumerate(rows)}
    return [sorted(share, key=position.__getitem__) for share in shares]


def split_batch(batch: RolloutBatch, rank: int, world: int) -> RolloutBatch:
    """Rank `rank`'s rows of `batch` (`split_rows` over all rows by length), trimmed to its longest row.
    With fewer rows than ranks a rank may get none: a [0, T] batch."""
    share = split_rows(list(range(batch.input_ids.shape[0])), batch.lengths(), world)[rank]
    index = torch.tensor(share, dtype=torch.long, device=batch.input_ids.device)
    width = max([batch.lengths()[r] for r in share], default=batch.input_ids.shape[1]) or 1
    fields = {name: None if value is None else value[index, :width] for name, value in vars(batch).items()}
    return RolloutBatch(**fields)


# ---------------------------------------------------------------------------------------- reductions


def global_normalizer(mask: Tensor, aggregation: Aggregation = "token", group: Any = None) -> float:
    """`default_normalizer` of the union of every rank's rows: loss tokens (or sequences with one) summed over
    the group, so each rank's loss share adds up to the one-process loss. Outside torch.distributed: local."""
    local = default_normalizer(mask, aggregation)
    if not (dist.is_available() and dist.is_initialized()):
        return local
    total = torch.tensor([local], dtype=torch.float64, device=_collective_device(group))
    dist.all_reduce(total, group=group)
    return float(total.item())


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """torch's clip_grad_norm_, also for FSDP2's DTensor gradients: the total norm of sharded gradients is a
    DTensor (a pending reduction over the shards), made one replicated number before it scales anything, as
    torchtitan does. Returns the norm before clipping."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def _collective_device(group: Any) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


# ----------------------------------------------------------------------------------------- the groups


class SingleProcess:
    """The learner's view of its data-parallel group when it trains alone: every reduction is the identity
    and the model stays whole. `DataParallel` overrides each method with its collective."""

    rank = 0
    world = 1

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)  # the learner's device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that runs rollouts, evaluations, logging, checkpoints and the weight sync."""
        return self.rank == 0

    def shard(self, model: nn.Module) -> nn.Module:
        return model

    def local_rows(self, rows: list[int], lengths: list[int]) -> list[int]:
        """This rank's share of a mini-batch's `rows`."""
        return rows

    def normalizer(self, mask: Tensor, aggregation: Aggregation) -> float:
        """The loss normaliser of the mini-batch whose rows (on this rank) are `mask`'s."""
        return default_normalizer(mask, aggregation)

    def sum(self, value: float) -> float:
        return value

    def max_count(self, count: int) -> int:
        """The largest `count` of any rank (micro-batches: every rank must run as many)."""
        return count

    def sum_(self, tensor: Tensor) -> Tensor:
        """Sum `tensor` over the ranks, in place."""
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order."""
        return [obj]

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def reshard(self, model: nn.Module) -> None:
        """Free gathered weights a forward without backward left behind."""

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The whole model's tensors (parameters and buffers), on rank 0."""
        return dict(model.state_dict())

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's `obj` (picklable: a command, a batch of CPU tensors) on every rank."""
        return obj

    def close(self) -> None:
        pass


class DataParallel(SingleProcess):
    """A rank of a torch.distributed group that trains data-parallel with FSDP2 (see the module docstring)."""

    def __init__(self, config: DistributedConfig, device: torch.device, owns_group: bool = False) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            raise RuntimeError("DataParallel needs torch.distributed initialised (init_distributed does it)")
        super().__init__(device)
        self.config, self.owns_group = config, owns_group
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world % config.replicas:
            raise ValueError(f"distributed.replicas={config.replicas} does not divide the {self.world} ranks")
        shard = self.world // config.replicas
        if config.replicas == 1:
            self.mesh = init_device_mesh(device.type, (shard,), mesh_dim_names=("shard",))
        else:
            self.mesh = init_device_mesh(device.type, (config.replicas, shard), mesh_dim_names=("replicate", "shard"))
        self.group = dist.group.WORLD
        # Control messages ride a gloo group: the CPU may wait longer than an NCCL collective is allowed to.
        self.control = dist.new_group(backend="gloo", timeout=timedelta(seconds=config.follower_timeout_s))

    def shard(self, model: nn.Module) -> nn.Module:
        return shard_model(model, self.config, self.mesh)

    def local_rows(self, rows: list[int], lengths: list[int]) -> list[int]:
        return split_rows(rows, lengths, self.world)[self.rank]

    def normalizer(self, mask: Tensor, aggregation: Aggregation) -> float:
        return global_normalizer(mask, aggregation, self.group)

    def sum(self, value: float) -> float:
        total = torch.tensor([value], dtype=torch.float64, device=_collective_device(self.group))
        dist.all_reduce(total, group=self.group)
        return float(total.item())

    def max_count(self, count: int) -> int:
        most = torch.tensor([count], dtype=torch.long, device=_collective_device(self.group))
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self.group)
        return int(most.item())

    def sum_(self, tensor: Tensor) -> Tensor:
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.control)
        return out

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> Tensor:
        return clip_grad_norm(params, max_norm)

    def reshard(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule

        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """Full CPU tensors on rank 0 ({} on the others), gathered layer by layer (all ranks must call it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        self.reshard(model)  # the state dict reads the sharded parameters; a gathered root would shadow them
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return cast(dict[str, Tensor], get_model_state_dict(model, options=options))

    def broadcast(self, obj: Any = None) -> Any:
        box = [obj if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def close(self) -> None:
        """Leave torch.distributed if `init_distributed` joined it (a spawned test's group is its own)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed(config: DistributedConfig, device: str | torch.device) -> SingleProcess | DataParallel:
    """Join the group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and bind this rank
    to cuda:LOCAL_RANK when `device` is CUDA; a single process gets SingleProcess(device). An already
    initialised group (a test's spawned ranks) is joined as it is."""
    device_type = torch.device(device).type
    if not dist.is_initialized() and not under_torchrun():
        return SingleProcess(device)
    if not config.enabled:
        raise RuntimeError("distributed.enabled is false but this process is one of several ranks; launch it "
                           "as a single process, or set distributed.enabled=true")
    if device_type == "cuda":
        # torchrun's LOCAL_RANK; a group made without it (launch.spawn) has already picked each rank's device
        local = os.environ.get("LOCAL_RANK")
        index = int(local) % torch.cuda.device_count() if local is not None else torch.cuda.current_device()
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    owns_group = not dist.is_initialized()
    if owns_group:
        backend = config.backend if config.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=timedelta(seconds=config.timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return DataParallel(config, device, owns_group)


def shard_model(model: nn.Module, config: DistributedConfig, mesh: Any) -> nn.Module:
    """FSDP2 in place: each decoder layer (`model.model.layers`, if the model has them), then the root. The
    model must already be on this rank's device; build its optimizer afterwards (it holds the DTensors)."""
    from torch.distributed.fsdp import (
        FSDPModule,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    dtype = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    mixed = MixedPrecisionPolicy(param_dtype=dtype[config.param_dtype], reduce_dtype=dtype[config.reduce_dtype])
    layers = getattr(getattr(model, "model", None), "layers", None) or []
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=config.reshard_after_forward, mp_policy=mixed)
    # The root keeps FSDP's own choice (no reshard after forward): its LM head is read after `hidden_states`.
    fully_shard(model, mesh=mesh, mp_policy=mixed)
    if hasattr(model, "hidden_states"):
        register_fsdp_forward_method(model, "hidden_states")
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # SUM, not FSDP's mean: each rank's loss is already divided by the global token count.
            module.set_gradient_divide_factor(1.0)
            # Both setters are newer than torch 2.11 (the GPU machines'): there the divide factor alone
            # already reduces with a plain sum, and every M2 parameter (experts stacked) gets a gradient.
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                module.set_force_sum_reduction_for_comms(True)
            if hasattr(module, "set_reduce_scatter_unused_params"):
                # A parameter without a gradient on one rank (an unused branch) still joins the reduce-scatter.
                module.set_reduce_scatter_unused_params(True, recurse=False)
    return model
