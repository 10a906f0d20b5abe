"""Experiment trackers that receive a run's scalar metrics beside `metrics.jsonl`.

`logging.trackers` in the train config picks them (default: tensorboard). Each works offline and keeps
its files under the run directory where the library allows it:

| tracker | writes | look at it with |
|---|---|---|
| tensorboard | `runs/<name>/tensorboard/` event files | `tensorboard --logdir runs` |
| wandb | `runs/<name>/wandb/` in offline mode (never contacts a server) | `wandb sync runs/<name>/wandb/offline-run-*` |
| mlflow | a file store `runs/<name>/mlflow/` | `mlflow ui --backend-store-uri runs/<name>/mlflow` |
| trackio | trackio's local database (`TRACKIO_DIR`, default ~/.cache/huggingface/trackio) | `trackio show` |

Only tensorboard is a dependency of m2rl. The others are imported when a run asks for them, and a missing
package is one line: `logging.trackers: wandb needs the 'wandb' package (pip install wandb)`.
`check_trackers` runs that import before a run directory exists, so a missing package leaves nothing
behind.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from m2rl.config import ConfigError

TrackerName = Literal["tensorboard", "wandb", "mlflow", "trackio"]

# tracker -> (module imported lazily, pip package that provides it)
PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("torch.utils.tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}


class Tracker(Protocol):
    """Receives `{name: finite float}` once per logged step; `close()` flushes and ends the tracker's run."""

    def log(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def _import(name: str) -> Any:
    """The tracker's module, or a ConfigError naming the missing package (one line, no traceback)."""
    if name not in PACKAGES:
        raise ConfigError(f"logging.trackers: unknown tracker {name!r}; known: {', '.join(PACKAGES)}")
    module, package = PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"logging.trackers: {name} needs the {package!r} package (pip install {package}): {exc}"
        ) from None


def check_trackers(names: Sequence[str]) -> None:
    """Import every named tracker's package now: a missing one is a ConfigError before any file is written."""
    for name in names:
        _import(name)


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record (trackers take scalars only; bools and text are left out)."""
    return {key: float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


class TensorBoardTracker:
    def __init__(self, directory: Path) -> None:
        self._writer = _import("tensorboard").SummaryWriter(log_dir=str(directory / "tensorboard"))

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbTracker:
    def __init__(self, directory: Path, project: str, name: str, config: Mapping[str, Any] | None) -> None:
        wandb = _import("wandb")
        # offline: files only, under the run directory; `wandb sync` uploads them later if wanted
        self._run = wandb.init(project=project, name=name, dir=str(directory), mode="offline",
                               config=dict(config or {}))

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self._run.log(dict(scalars), step=step)

    def close(self) -> None:
        self._run.finish()


class MLflowTracker:
    def __init__(self, directory: Path, project: str, name: str, config: Mapping[str, Any] | None) -> None:
        _import("mlflow")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        # A client of its own (not mlflow's global active run) on a file store inside the run directory.
        self._client = MlflowClient(tracking_uri=(directory / "mlflow").resolve().as_uri())
        experiment = self._client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(project)
        self._run_id = self._client.create_run(experiment_id, run_name=name).info.run_id
        params = [Param(k, str(v)[:500]) for k, v in _flat(config or {}).items()]  # 500: mlflow's value limit
        for start in range(0, len(params), 100):  # mlflow caps a batch at 100 params
            self._client.log_batch(self._run_id, params=params[start:start + 100])

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        now = _now_ms()
        metrics = [self._metric(key, value, now, step) for key, value in scalars.items()]
        for start in range(0, len(metrics), 1000):  # mlflow caps a batch at 1000 metrics
            self._client.log_batch(self._run_id, metrics=metrics[start:start + 1000])

    def close(self) -> None:
        self._client.set_terminated(self._run_id)


class TrackioTracker:
    def __init__(self, directory: Path, project: str, name: str, config: Mapping[str, Any] | None) -> None:
        self._trackio = _import("trackio")
        # local only: no space_id, so nothing leaves the machine
        self._trackio.init(project=project, name=name, config=dict(config or {}))

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self._trackio.log(dict(scalars), step=step)

    def close(self) -> None:
        self._trackio.finish()


def make_trackers(names: Sequence[str], directory: Path, project: str = "m2rl",
                  config: Mapping[str, Any] | None = None) -> list[Tracker]:
    """The named trackers for the run in `directory`; `config` (plain mapping) is recorded where supported."""
    trackers: list[Tracker] = []
    try:
        for name in dict.fromkeys(names):  # each once, in the order given
            if name == "tensorboard":
                trackers.append(TensorBoardTracker(directory))
            elif name == "wandb":
                trackers.append(WandbTracker(directory, project, directory.name, config))
            elif name == "mlflow":
                trackers.append(MLflowTracker(directory, project, directory.name, config))
            elif name == "trackio":
                trackers.append(TrackioTracker(directory, project, directory.name, config))
            else:
                _import(name)  # raises: unknown tracker
    except BaseException:
        for tracker in trackers:
            tracker.close()
        raise
    return trackers


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _now_ms() -> int:
    return int(time.time() * 1000)
