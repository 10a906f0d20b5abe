"""Asynchronous rollouts for the trainer: the orchestrator on an event loop of its own thread.

The learner's update runs in the trainer's (main) thread while episodes go on in this one: torch releases the
GIL in its kernels, tool calls wait in worker threads, and a LocalPolicy generates with its own copy of the
weights (its `update_weights` waits for the generate call in progress). The trainer calls

    rollouts.next_batch(n)             # blocks until n groups within the staleness bound are ready
    rollouts.on_weights_updated(v)     # after every step, with the version the generator now serves
    rollouts.run(coroutine)            # other async work on the same loop (an evaluation: one LocalPolicy
                                       # batcher serves both, and none is closed under the other's feet)
    rollouts.finished_groups()         # what a checkpoint keeps
    rollouts.close()                   # cancels every episode, stops the loop and joins the thread

An interrupt (rl/interrupts.py) raised in the main thread while it waits leaves the loop running; `close`
then stops it. Every orchestrator method runs on the loop's thread: the orchestrator itself is not locked.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from m2rl.rl.groups import ScoredGroup
from m2rl.rl.orchestrator import OrchestratorBatch, RolloutOrchestrator

T = TypeVar("T")
logger = logging.getLogger(__name__)


class EventLoopThread:
    """An asyncio loop running in a daemon thread; `run` submits a coroutine from any other thread."""

    def __init__(self, max_threads: int, name: str = "m2rl-rollouts") -> None:
        self.loop = asyncio.new_event_loop()
        # asyncio's default executor has min(32, cores + 4) threads: 6 on a 2-core machine, which would cap the
        # env steps (tool calls) in flight far below the number of envs.
        self.executor = ThreadPoolExecutor(max_workers=max(1, max_threads), thread_name_prefix=f"{name}-env")
        self.loop.set_default_executor(self.executor)
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()` on the loop's thread."""
        async def call() -> T:
            return fn()

        return self.run(call())

    def close(self, timeout_s: float = 60.0) -> None:
        if not self.thread.is_alive():
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(timeout_s)
        except Exception:  # a task that will not stop must not keep the run from closing its envs
            logger.warning("rollout tasks did not stop within %.0f s", timeout_s, exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout_s)
        # Worker threads still inside an env step finish on their own (the envs are closed next).
        self.executor.shutdown(wait=False, cancel_futures=True)
        if not self.thread.is_alive():
            self.loop.close()


class BackgroundRollouts:
    """A `RolloutOrchestrator` generating on an `EventLoopThread` while the caller's thread trains."""

    def __init__(self, orchestrator: RolloutOrchestrator, thread: EventLoopThread) -> None:
        self.orchestrator, self.thread = orchestrator, thread

    @classmethod
    def start(cls, orchestrator: RolloutOrchestrator, max_threads: int,
              finished: list[ScoredGroup] | None = None) -> BackgroundRollouts:
        """Start generating; `finished` groups (from a checkpoint) are the first the learner gets."""
        thread = EventLoopThread(max_threads)
        try:
            if finished:
                thread.call(lambda: orchestrator.preload(finished))
            thread.run(orchestrator.start())
        except BaseException:
            thread.close()
            raise
        return cls(orchestrator, thread)

    def next_batch(self, n_groups: int) -> OrchestratorBatch:
        return self.thread.run(self.orchestrator.next_batch(n_groups))

    def on_weights_updated(self, version: int) -> None:
        self.thread.call(lambda: self.orchestrator.on_weights_updated(version))

    def finished_groups(self) -> list[ScoredGroup]:
        if not self.thread.thread.is_alive():  # closed (e.g. an interrupt): the orchestrator is still readable
            return self.orchestrator.finished_groups()
        return self.thread.call(self.orchestrator.finished_groups)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.thread.run(coroutine)

    def close(self) -> None:
        if self.thread.thread.is_alive():
            try:
                self.thread.run(self.orchestrator.aclose())
            except Exception:  # closing must go on: the envs and sandboxes are closed next
                logger.warning("closing the rollout orchestrator failed", exc_info=True)
        self.thread.close()
