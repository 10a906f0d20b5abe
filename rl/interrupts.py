"""Stop a training job cleanly on SIGINT (Ctrl-C) or SIGTERM (a scheduler, `kill`).

`stop_on_signals()` (installed by `m2rl train` around the whole job) turns either signal into a
`TrainingInterrupted` raised in the main thread, so the job unwinds through its `finally` blocks, closes
its sandboxes and saves a checkpoint instead of dying with its state on disk. Work that must not be cut
in half (an optimizer step together with the step counter) runs under `deferred_interrupts()`: a signal
arriving there is raised when the block ends. Async work runs through `run_async()`: a signal there
cancels the event loop's tasks (raised inside a task, asyncio would log it with a traceback as an
unretrieved exception) and is raised once the loop has shut down. Without `stop_on_signals()` (a
library caller, a test) SIGINT is Python's KeyboardInterrupt as usual, and `TrainingInterrupted` is one
too, so callers handle both with `except KeyboardInterrupt`.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the job; `signum` says which (the exit status is 128 + signum)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        # Set by the trainer once it has stopped: the last completed step and the checkpoint holding it.
        self.step: int | None = None
        self.checkpoint: Path | None = None
        self.run_name: str | None = None


_deferred_depth = 0
_pending: int | None = None
_ignoring = False


def _handler(signum: int, frame: FrameType | None) -> None:
    global _pending
    if _ignoring:
        return  # already stopping: a second Ctrl-C must not cut the clean-up short
    if _deferred_depth:
        _pending = signum
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise TrainingInterrupted(signum) from None
    # Inside run_async: cancel the work the way asyncio.run does for Ctrl-C; run_async raises afterwards.
    _pending = signum
    for task in asyncio.all_tasks(loop):
        task.cancel()
    loop.call_soon_threadsafe(lambda: None)  # wake the selector so the cancellations run now


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Raise TrainingInterrupted on SIGINT/SIGTERM inside the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, old in previous.items():
        # A shell starts background jobs with SIGINT ignored so Ctrl-C reaches only the foreground: keep that.
        if not (sig == signal.SIGINT and old == signal.SIG_IGN):
            signal.signal(sig, _handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, except that an interrupt during it cancels its tasks and is raised here, after the loop
    has shut down (its worker threads finished), as TrainingInterrupted."""
    global _pending
    try:
        return asyncio.run(coroutine)
    finally:
        if _pending is not None and _deferred_depth == 0:
            signum, _pending = _pending, None
            raise TrainingInterrupted(signum) from None


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold a signal that arrives inside the block; raise it when the (outermost) block ends."""
    global _deferred_depth, _pending
    _deferred_depth += 1
    try:
        yield
    finally:
        _deferred_depth -= 1
        if _deferred_depth == 0 and _pending is not None:
            signum, _pending = _pending, None
            raise TrainingInterrupted(signum)


@contextmanager
def interrupts_ignored() -> Iterator[None]:
    """Drop further signals while the block runs (the clean-up after the first one)."""
    global _ignoring
    previous, _ignoring = _ignoring, True
    try:
        yield
    finally:
        _ignoring = previous
