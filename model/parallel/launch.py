"""Start one process per rank with torch.distributed initialised: spawned here, or under torchrun.

    launch.spawn(worker, world=2, backend="gloo", args=(...))   # worker(rank, world, *args) in 2 processes
    launch.run(worker, world=2, backend="nccl", args=(...))     # torchrun's env if present, else spawn

Rendezvous through a file in a fresh temporary directory (no port to race for). With NCCL each rank uses
cuda:rank and the default process group is bound to it; NCCL's own environment (NCCL_NVLS_ENABLE=0 on the
lent multi-GPU machines) is inherited by the children untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

Worker = Callable[..., None]


def init_rank(rank: int, world: int, backend: str, init_method: str, timeout_s: float = 600.0) -> torch.device:
    """Join the default process group; returns this rank's device (cuda:rank for NCCL, else cpu)."""
    if backend == "nccl":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    return device


def _entry(rank: int, world: int, backend: str, init_method: str, timeout_s: float, worker: Worker,
           args: tuple[Any, ...]) -> None:
    init_rank(rank, world, backend, init_method, timeout_s)
    try:
        worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(worker: Worker, world: int, backend: str = "gloo", args: tuple[Any, ...] = (),
          timeout_s: float = 600.0) -> None:
    """Run worker(rank, world, *args) in `world` fresh processes; a rank's exception is re-raised here.
    `worker` must be importable by name (a module-level function) for the children to unpickle it."""
    rendezvous = tempfile.mkdtemp(prefix="m2rl_dist_")
    try:
        init_method = "file://" + os.path.join(rendezvous, "rendezvous")
        mp.spawn(_entry, args=(world, backend, init_method, timeout_s, worker, args), nprocs=world, join=True)
    finally:
        shutil.rmtree(rendezvous, ignore_errors=True)


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def run(worker: Worker, world: int, backend: str, args: tuple[Any, ...] = (), timeout_s: float = 600.0) -> None:
    """Under torchrun: this process is one rank (world comes from the environment). Otherwise spawn `world`."""
    if under_torchrun():
        rank, env_world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        _entry(rank, env_world, backend, "env://", timeout_s, worker, args)
    else:
        spawn(worker, world, backend, args, timeout_s)
