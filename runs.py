"""Run directories: `runs/<name>/` with the resolved config, metrics, trackers' files, samples and a log.

    runs/<name>/config.yaml                    the resolved configuration, as first written
    runs/<name>/metrics.jsonl                  one record per logged step
    runs/<name>/run.log                        every record of the `m2rl` logger tree while the run is open
    runs/<name>/tensorboard/ (wandb/, mlflow/) the experiment trackers of `logging.trackers` (m2rl.trackers)
    runs/<name>/trajectories/step_000010.jsonl a few episodes of each training step (`Run.write_trajectories`)
    runs/<name>/trajectories/report.html      the trajectory viewer over those samples (rl/trajectory_samples.py)

Logging: every module logs to `logging.getLogger(__name__)`, a child of the `m2rl` logger, and handlers
are attached to `m2rl` only: the run's file handler while a run is open, the console handler by the CLI
(`m2rl.cli.console_logging`). So a record from any package, and the traceback of a failed run, reaches
run.log.

Every file that is rewritten (config, summaries, checkpoints' manifests) goes through
`atomic_write`: data lands in a temp file in the same folder, is fsynced, then renamed over the
target, so a crash leaves either the old or the new file, never half of one. `metrics.jsonl` is
append-only: each record is one `write()` of a whole line to an O_APPEND descriptor followed by
fsync; `read_metrics` skips a torn final line should the machine die mid-write. Every file honours the
umask (0644 under the usual 022), temp-file writes included.

A run name belongs to one run: `Run.create` refuses a directory that already holds files (a second run
would append to its metrics and overwrite its config), and `Run.open` continues an existing one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from m2rl.config import dump_yaml, to_dict
from m2rl.trackers import TrackerName, check_trackers, make_trackers, scalars

logger = logging.getLogger(__name__)

ROOT_LOGGER = "m2rl"  # the logger every m2rl module's logger descends from; handlers go here only
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass
class LoggingConfig:
    """What a run records besides metrics.jsonl and run.log (`logging.*` in the train config)."""

    trackers: list[TrackerName] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers that receive every scalar metric, all offline: tensorboard, wandb (offline
    mode), mlflow (file store under the run directory), trackio (local). Only tensorboard is installed
    with m2rl; the others need their package."""
    project: str = "m2rl"
    """Project (wandb, trackio) or experiment (mlflow) the run is filed under."""
    trajectory_samples: int = 4
    """Episodes of each training step saved to runs/<name>/trajectories/step_NNNNNN.jsonl; 0: none."""
    trajectory_max_chars: int = 16_000
    """Rendered text kept per saved episode (a longer one loses its middle), so a step's file stays small."""

    def __post_init__(self) -> None:
        if self.trajectory_samples < 0:
            raise ValueError(f"logging.trajectory_samples must be >= 0, got {self.trajectory_samples}")
        if self.trajectory_max_chars < 100:
            raise ValueError(f"logging.trajectory_max_chars must be >= 100, got {self.trajectory_max_chars}")


class RunError(ValueError):
    """A run directory cannot be used as asked (name taken, nothing to resume); the message says what to do."""


def current_umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it, which races
    with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: fall back to the racy read
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` atomically (temp file in the same directory + fsync + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 whatever the umask: give the file the mode open() would have given it.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # The rename is durable only once the directory entry is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def append_text(path: str | Path, text: str) -> None:
    """Append `text` with one write() to an O_APPEND descriptor, then fsync: concurrent writers never
    interleave lines, and a crash leaves at most one torn last line."""
    data = memoryview(text.encode("utf-8"))
    if not data:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask decides
    try:
        while data:  # os.write may write less than asked for on some filesystems
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one record as a JSON line (see `append_text`)."""
    append_text(path, json.dumps(record, ensure_ascii=False, default=_json_default) + "\n")


def read_jsonl(path: str | Path, skip_torn_last_line: bool = True) -> list[dict[str, Any]]:
    """Read a JSONL file. A torn last line (a crash mid-append) is skipped; any other bad line is a
    ValueError naming the file and line."""
    records: list[dict[str, Any]] = []
    path = Path(path)
    if not path.exists():
        return records
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if skip_torn_last_line and index == last:
                break
            raise ValueError(f"{path}:{index + 1}: not valid JSON: {exc}") from exc
    return records


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot name a run directory (it must stay one plain folder under the root), or None."""
    if not _NAME_RE.match(name):
        return f"bad run name {name!r}: use letters, digits, '.', '_' and '-'"
    return None


def default_run_name(prefix: str, root: str | Path | None = None) -> str:
    """`<prefix>-<timestamp>`, with `-2`, `-3` ... appended while `root` already has a run of that name."""
    name = f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    if root is None:
        return name
    candidate, n = name, 1
    while (Path(root) / candidate).exists():
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def run_in_use(directory: Path) -> bool:
    """A directory that already holds files belongs to an earlier run (an empty one is free)."""
    return directory.is_dir() and any(directory.iterdir())


class Run:
    """One run's folder. Create with `Run.create(...)`; close with `close()` or use as a context."""

    def __init__(self, directory: Path, trackers: Sequence[str] = ("tensorboard",), project: str = "m2rl",
                 config: Any = None) -> None:
        self.directory = directory
        self.metrics_path = directory / "metrics.jsonl"
        self.log_path = directory / "run.log"
        self.logger = logger  # a logger of the m2rl tree like any other: kept as an attribute for callers
        self._tree = logging.getLogger(ROOT_LOGGER)
        self._level_before = self._tree.level
        if self._tree.getEffectiveLevel() > logging.INFO:  # the library default (WARNING) would drop INFO
            self._tree.setLevel(logging.INFO)
        self._handler = logging.FileHandler(self.log_path, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter(LOG_FORMAT))
        self._tree.addHandler(self._handler)
        try:
            plain = to_dict(config) if config is not None else None
            self._trackers = make_trackers(trackers, directory, project, plain if isinstance(plain, dict) else None)
        except BaseException:
            self._detach_log()
            raise

    @classmethod
    def create(
        cls, name: str, root: str | Path = "runs", config: Any = None, trackers: Sequence[str] = ("tensorboard",),
        project: str = "m2rl",
    ) -> Run:
        """A new run `root/name`; a name already in use is a RunError (runs never share a folder)."""
        problem = run_name_problem(name)
        if problem:
            raise RunError(problem)
        directory = Path(root) / name
        if run_in_use(directory):
            raise RunError(
                f"run directory {directory} already exists; pass resume=true to continue it or choose another name="
            )
        check_trackers(trackers)  # a missing tracker package is an error before the directory exists
        directory.mkdir(parents=True, exist_ok=True)
        run = cls(directory, trackers=trackers, project=project, config=config)
        if config is not None:
            run.write_config(config)
        run.logger.info("run directory %s", directory)
        return run

    @classmethod
    def open(cls, name: str, root: str | Path = "runs", trackers: Sequence[str] = ("tensorboard",),
             project: str = "m2rl") -> Run:
        """An existing run, to continue: its config.yaml and metrics are kept; new records are appended."""
        problem = run_name_problem(name)
        if problem:
            raise RunError(problem)
        directory = Path(root) / name
        if not directory.is_dir():
            raise RunError(f"no run directory {directory} to resume; drop resume=true to start a new run")
        check_trackers(trackers)
        run = cls(directory, trackers=trackers, project=project)
        run.logger.info("run directory %s reopened", directory)
        return run

    def write_config(self, config: Any) -> Path:
        return atomic_write(self.directory / "config.yaml", dump_yaml(config))

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append `{"step", "time", **metrics}` to metrics.jsonl and the finite scalars to every tracker."""
        record = {"step": step, "time": time.time(), **metrics}
        append_jsonl(self.metrics_path, record)
        numbers = scalars(metrics)
        for tracker in self._trackers:
            tracker.log(step, numbers)

    def metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_path)

    def write_file(self, relative: str, data: str | bytes) -> Path:
        return atomic_write(self.directory / relative, data)

    def write_trajectories(self, step: int, records: Sequence[Mapping[str, Any]]) -> Path | None:
        """`trajectories/step_NNNNNN.jsonl`, one record per line, replaced whole (a step that is run again
        after a resume overwrites its file); nothing is written for no records."""
        if not records:
            return None
        lines = "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in records)
        return atomic_write(self.directory / "trajectories" / f"step_{step:06d}.jsonl", lines)

    def close(self) -> None:
        trackers, self._trackers = self._trackers, []
        try:
            for tracker in trackers:
                tracker.close()
        finally:
            self._detach_log()

    def _detach_log(self) -> None:
        self._tree.removeHandler(self._handler)
        self._handler.close()
        self._tree.setLevel(self._level_before)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            if isinstance(exc, KeyboardInterrupt):  # Ctrl-C / SIGTERM: a stop, not a failure
                self.logger.warning("run interrupted: %s", exc or type(exc).__name__)
            else:
                self.logger.error("run failed", exc_info=(exc_type, exc, tb))  # type: ignore[arg-type]
        self.close()


@contextmanager
def progress(description: str, total: int | None, disable: bool = False) -> Iterator[Any]:
    """A rich progress bar; yields a callable `advance(n=1, **fields)`."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    with Progress(*columns, disable=disable, transient=False) as bar:
        task = bar.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str = "") -> None:
            bar.update(task, advance=n, status=status)

        yield advance
