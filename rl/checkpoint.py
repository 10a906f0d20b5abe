"""Training checkpoints: model, optimizer, scheduler, RNG states, data position, step, trainer state.

Layout: <directory>/step_000000042/{model.pt, optimizer.pt, scheduler.pt, rng.pt, trainer_state.pt, meta.json}.
A checkpoint is written into a hidden temp directory next to its final place, fsynced, then renamed with
os.replace, so a crash leaves either the whole checkpoint or none (leftover temp dirs are ignored and
cleaned up). Only the newest `keep_last` checkpoints are kept.

Restoring everything listed (RNG included) makes a resumed CPU run bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

_STEP_DIR = re.compile(r"^step_(\d+)$")
FORMAT_VERSION = 1


@dataclass
class CheckpointState:
    path: Path
    step: int
    data_position: Any = None
    trainer_state: dict[str, Any] = field(default_factory=dict)


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and, if present, CUDA) generator states, in weights_only-loadable types."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, keys, pos = state["python"]
    random.setstate((version, tuple(keys), pos))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / "meta.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    trainer_state: dict[str, Any] | None = None,
    data_position: Any = None,
    keep_last: int | None = 3,
) -> Path:
    """Write checkpoint `step` atomically; return its directory. `data_position` must be JSON-serialisable."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    try:
        json.dumps(data_position)
    except TypeError as e:
        raise ValueError(f"data_position must be JSON-serialisable: {e}") from None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step:09d}"
    tmp = directory / f".tmp_step_{step:09d}_{os.getpid()}_{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        _save(model.state_dict(), tmp / "model.pt")
        if optimizer is not None:
            _save(optimizer.state_dict(), tmp / "optimizer.pt")
        if scheduler is not None:
            _save(scheduler.state_dict(), tmp / "scheduler.pt")
        _save(capture_rng_state(), tmp / "rng.pt")
        _save(trainer_state or {}, tmp / "trainer_state.pt")
        meta = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "data_position": data_position,
            "saved_at": time.time(),
        }
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step: move the old one aside, then swap in the new one
            old = directory / f".old_{final.name}_{time.monotonic_ns()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(directory, keep_last)
    return final


def _prune(directory: Path, keep_last: int | None) -> None:
    for child in directory.iterdir():  # temp dirs of crashed saves
        if child.name.startswith((".tmp_step_", ".old_step_")) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
    if keep_last is None:
        return
    for _, path in list_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> CheckpointState:
    """Load a checkpoint directory (or the latest one inside a run's checkpoint directory) into the objects.

    trainer_state.pt is unpickled in full (it may hold arbitrary objects): load only checkpoints you trust.
    """
    path = Path(path)
    if not (path / "meta.json").is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint at {path} (no meta.json and no step_* subdirectory)")
        path = latest
    with open(path / "meta.json") as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {meta.get('format_version')} is not {FORMAT_VERSION}")
    model.load_state_dict(torch.load(path / "model.pt", map_location=map_location, weights_only=True))
    for obj, name in ((optimizer, "optimizer.pt"), (scheduler, "scheduler.pt")):
        if obj is None:
            continue
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} has no {name} to restore {type(obj).__name__} from")
        obj.load_state_dict(torch.load(path / name, map_location=map_location, weights_only=True))
    if restore_rng:
        restore_rng_state(torch.load(path / "rng.pt", map_location="cpu", weights_only=True))
    trainer_state = torch.load(path / "trainer_state.pt", map_location=map_location, weights_only=False)
    return CheckpointState(
        path=path, step=int(meta["step"]), data_position=meta["data_position"], trainer_state=trainer_state
    )
