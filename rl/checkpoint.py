"""Training checkpoints: the model as a Hugging Face directory, with the learner state beside it.

Layout of <run>/checkpoints/step_000000042/ for an M2ForCausalLM:

    config.json, model.safetensors (or shards and an index), generation_config.json,
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja
        the model, written by m2rl.model.save_pretrained: official per-expert tensor names at the model's
        dtypes, so transformers' MiniMaxM2ForCausalLM and `model.init` load the step directory itself
    optimizer.pt, scheduler.pt, rng.pt, trainer_state.pt, meta.json
        the learner state, read only to resume (meta.json: step, data position, sha256 of every file)

The weights are stored once, in the safetensors; resuming reads them back bit for bit (`read_state_dict`).
Any other module (the learner's test doubles) is saved as its state_dict in model.pt.

A checkpoint is written into a hidden temp directory next to its final place, fsynced, then renamed with
os.replace, so a crash leaves either the whole checkpoint or none (leftover temp dirs are ignored and
cleaned up). Only the newest `keep_last` checkpoints are kept. Loading reads and checks every file against
meta.json before it changes the model, so a checkpoint damaged later (a full disk, a copy cut short) is
refused whole; `load_latest_checkpoint` then falls back to the previous one.

At the end of a run `publish_export` hard-links the model files of its last checkpoint into <run>/final/
(no second copy of the weights; pruning a checkpoint later does not touch them); `export_model` writes such
a directory for a model that has no checkpoint (an SFT stage). `model_directory` finds the model a path
names: a Hugging Face directory, a checkpoint, or a run (its final export, else its newest checkpoint).

Restoring everything listed (RNG included) makes a resumed CPU run bitwise equal to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from m2rl.model.checkpoint import CheckpointError, read_state_dict, save_pretrained
from m2rl.model.m2 import M2ForCausalLM

if TYPE_CHECKING:
    from m2rl.model.tokenizer import M2Tokenizer

_STEP_DIR = re.compile(r"^step_(\d+)$")
FORMAT_VERSION = 2  # 2: an M2ForCausalLM as a Hugging Face directory; 1: model.pt always (still read)
READABLE_FORMATS = (1, 2)
CHECKPOINTS_DIR = "checkpoints"  # <run>/checkpoints/step_*
EXPORT_DIR = "final"  # <run>/final: the model at the end of the run, a Hugging Face directory
MODEL_STATE = "model.pt"  # the weights of a module that is not an M2ForCausalLM (format 1: of every model)
# What a checkpoint holds besides the model: none of it is part of an export.
LEARNER_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.pt", "meta.json")


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    tokenizer: M2Tokenizer | None = None,
) -> Path:
    """Write checkpoint `step` atomically; return its directory. `data_position` must be JSON-serialisable.
    An M2ForCausalLM is written as a Hugging Face directory (with `tokenizer`'s files when given)."""
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
        _write_model(model, tmp, tokenizer)
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
            "sha256": {f.name: _sha256(f) for f in sorted(tmp.iterdir())},
        }
        with open(tmp / "meta.json", "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(directory, keep_last)
    return final


def _write_model(model: nn.Module, directory: Path, tokenizer: M2Tokenizer | None) -> None:
    if isinstance(model, M2ForCausalLM):
        save_pretrained(model, directory, tokenizer=tokenizer)  # at the model's dtypes: lossless
        for file in directory.iterdir():  # save_pretrained does not fsync: the rename must not outrun it
            _fsync_file(file)
    else:
        _save(model.state_dict(), directory / MODEL_STATE)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put the complete directory `tmp` at `final` (replacing one there) by renames, fsynced."""
    _fsync_dir(tmp)
    if final.exists():  # re-saving: move the old one aside, then swap in the new one
        old = final.parent / f".old_{final.name}_{time.monotonic_ns()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(final.parent)


def _prune(directory: Path, keep_last: int | None) -> None:
    for child in directory.iterdir():  # temp dirs of crashed saves
        if child.name.startswith((".tmp_step_", ".old_step_")) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
    if keep_last is None:
        return
    for _, path in list_checkpoints(directory)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


class _Unreadable(Exception):
    """A checkpoint whose files cannot be read back as written (the reason names the file)."""


def _read_files(path: Path, want_optimizer: bool, want_scheduler: bool,
                map_location: str | torch.device) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, {file name: loaded object}) with every file checked and loaded; raises _Unreadable.
    The model's state dict is under MODEL_STATE whichever way it was stored."""
    try:
        meta = json.loads((path / "meta.json").read_bytes())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON and bytes that are not UTF-8
        raise _Unreadable(f"meta.json is not valid JSON ({_first_line(exc)})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise _Unreadable("meta.json has no integer 'step'")
    if meta.get("format_version") not in READABLE_FORMATS:
        raise _Unreadable(f"checkpoint format {meta.get('format_version')!r} is not in {READABLE_FORMATS}")
    hf_model = not (path / MODEL_STATE).exists() and (path / "config.json").is_file()
    names = ["rng.pt", "trainer_state.pt"] + ([] if hf_model else [MODEL_STATE])
    names += ["optimizer.pt"] if want_optimizer else []
    names += ["scheduler.pt"] if want_scheduler else []
    digests = meta.get("sha256") or {}  # absent in checkpoints written before checksums were recorded
    for name in [*names, *sorted(set(digests) - set(names))]:  # every recorded file: the export's too
        file = path / name
        if not file.is_file():
            raise _Unreadable(f"{name} is missing")
        if name in digests and _sha256(file) != digests[name]:
            raise _Unreadable(f"{name} is damaged (sha256 mismatch)")
    loaded: dict[str, Any] = {}
    if hf_model:
        try:
            loaded[MODEL_STATE] = read_state_dict(path)
        except CheckpointError as exc:
            raise _Unreadable(f"its model cannot be read ({exc})") from exc
    for name in names:
        try:
            # trainer_state.pt may hold arbitrary objects (see load_checkpoint's docstring)
            loaded[name] = torch.load(path / name, map_location="cpu" if name == "rng.pt" else map_location,
                                      weights_only=name != "trainer_state.pt")
        except Exception as exc:  # torch raises RuntimeError, pickle errors, EOFError ... for bad bytes
            raise _Unreadable(f"{name} cannot be read ({type(exc).__name__}: {_first_line(exc)})") from exc
    return meta, loaded


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> CheckpointState:
    """Load a checkpoint directory (or the latest one inside a run's checkpoint directory) into the objects.

    Every file is read and checked first: a damaged checkpoint raises CheckpointError and changes nothing.
    trainer_state.pt is unpickled in full (it may hold arbitrary objects): load only checkpoints you trust.
    """
    path = Path(path)
    if not (path / "meta.json").is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint at {path} (no meta.json and no step_* subdirectory)")
        path = latest
    try:
        meta, loaded = _read_files(path, optimizer is not None, scheduler is not None, map_location)
    except _Unreadable as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    return _apply(path, meta, loaded, model, optimizer, scheduler, restore_rng)


def _apply(path: Path, meta: dict[str, Any], loaded: dict[str, Any], model: nn.Module,
           optimizer: torch.optim.Optimizer | None, scheduler: Any | None, restore_rng: bool) -> CheckpointState:
    try:
        model.load_state_dict(loaded[MODEL_STATE])
        if optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer.pt"])
        if scheduler is not None:
            scheduler.load_state_dict(loaded["scheduler.pt"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} does not fit this model/optimizer: {_first_line(exc)}") from exc
    if restore_rng:
        restore_rng_state(loaded["rng.pt"])
    return CheckpointState(path=path, step=int(meta["step"]), data_position=meta.get("data_position"),
                           trainer_state=loaded["trainer_state.pt"])


def load_latest_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
    map_location: str | torch.device = "cpu",
) -> tuple[CheckpointState, list[tuple[Path, str]]]:
    """Load the newest readable checkpoint in `directory`; also return the (path, reason) of each newer one
    that was damaged. Those are renamed `damaged-step_*` so no later save or resume takes them for the
    newest; they stay on disk for inspection. No readable checkpoint at all is a CheckpointError."""
    directory = Path(directory)
    skipped: list[tuple[Path, str]] = []
    for _, path in reversed(list_checkpoints(directory)):
        try:
            meta, loaded = _read_files(path, optimizer is not None, scheduler is not None, map_location)
        except _Unreadable as exc:
            skipped.append((path, str(exc)))
            continue
        state = _apply(path, meta, loaded, model, optimizer, scheduler, restore_rng)
        for damaged, _ in skipped:
            try:
                os.replace(damaged, damaged.with_name(f"damaged-{damaged.name}"))
            except OSError:
                pass  # left in place: the next resume skips it again
        return state, skipped
    if not skipped:
        raise CheckpointError(f"no checkpoint in {directory}")
    reasons = "; ".join(f"{path.name}: {reason}" for path, reason in skipped)
    raise CheckpointError(f"no readable checkpoint in {directory}: {reasons}")


# ---------------------------------------------------------------------------------------------- exports

def export_model(model: M2ForCausalLM, destination: str | os.PathLike,
                 tokenizer: M2Tokenizer | None = None) -> Path:
    """Write `model` (and `tokenizer`) as a Hugging Face directory at `destination`, atomically."""
    destination = Path(destination)
    tmp = _fresh_tmp(destination)
    try:
        _write_model(model, tmp, tokenizer)
        _replace_dir(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return destination


def publish_export(checkpoint: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Make `destination` (a run's final/) hold the model files of `checkpoint`, atomically: hard links,
    so the weights are on disk once and stay when the checkpoint is pruned (a copy where links fail)."""
    checkpoint, destination = Path(checkpoint), Path(destination)
    if not (checkpoint / "config.json").is_file():
        raise CheckpointError(f"{checkpoint} holds no Hugging Face model (config.json) to export")
    tmp = _fresh_tmp(destination)
    try:
        for file in sorted(checkpoint.iterdir()):
            if file.name in LEARNER_FILES or not file.is_file():
                continue
            try:
                os.link(file, tmp / file.name)
            except OSError:  # a file system without hard links
                shutil.copy2(file, tmp / file.name)
        _replace_dir(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return destination


def _fresh_tmp(destination: Path) -> Path:
    """An empty hidden directory beside `destination`; leftovers of crashed writes of it are removed."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    leftovers = (f".tmp_{destination.name}_", f".old_{destination.name}_")
    for child in destination.parent.iterdir():
        if child.name.startswith(leftovers) and child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
    tmp = destination.parent / f".tmp_{destination.name}_{os.getpid()}_{time.monotonic_ns()}"
    tmp.mkdir()
    return tmp


def model_directory(path: str | os.PathLike, check_files: bool = True) -> Path:
    """The Hugging Face model directory `path` names: `path` itself when it holds config.json (a model
    directory or a checkpoint), else a run's final export (<run>/final), else the newest checkpoint of the
    run (or of the checkpoints directory) it names. `check_files`: a checkpoint's model files are checked
    against the sha256 it recorded (they are read whole: once per run is enough). Raises CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    if (path / "config.json").is_file():
        found = path
    elif (path / EXPORT_DIR / "config.json").is_file():
        found = path / EXPORT_DIR
    elif checkpoints := list_checkpoints(path / CHECKPOINTS_DIR) or list_checkpoints(path):
        found = checkpoints[-1][1]  # a run (or its checkpoints/ directory): the newest checkpoint
    elif (path / "meta.json").is_file():
        found = path  # a checkpoint without an exported model: said below
    else:
        raise CheckpointError(f"{path} is not a Hugging Face model directory (no config.json), a checkpoint "
                              f"(<run>/{CHECKPOINTS_DIR}/step_N) or a run directory (with {EXPORT_DIR}/ or "
                              f"{CHECKPOINTS_DIR}/)")
    if not (found / "config.json").is_file():
        raise CheckpointError(f"checkpoint {found} holds no Hugging Face model (config.json), only "
                              f"{MODEL_STATE} (format 1): use a newer checkpoint or the run's {EXPORT_DIR}/")
    if check_files and (found / "meta.json").is_file():
        _check_recorded_files(found)
    return found


def _check_recorded_files(checkpoint: Path) -> None:
    try:
        digests = json.loads((checkpoint / "meta.json").read_bytes()).get("sha256") or {}
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{checkpoint}: meta.json is not valid JSON ({_first_line(exc)})") from exc
    for name, digest in sorted(digests.items()):
        if name in LEARNER_FILES:
            continue  # not part of the model
        file = checkpoint / name
        if not file.is_file():
            raise CheckpointError(f"{checkpoint}: {name} is missing")
        if _sha256(file) != digest:
            raise CheckpointError(f"{checkpoint}: {name} is damaged (sha256 mismatch)")
