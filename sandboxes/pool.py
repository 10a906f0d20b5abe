"""A warm pool of ready sandboxes, so an episode starts with a clean sandbox in milliseconds.

The pool owns at most `size` sandboxes. `acquire()` hands out a ready one after a health check (a ping
round trip); `release()` returns it, and the reset (kill all processes, restore the file system) runs in a
background worker, so neither a cold start nor a reset is on the caller's path while a ready sandbox exists.
A sandbox that fails its health check or its reset is closed and replaced.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from m2rl.sandboxes.errors import SandboxError
from m2rl.sandboxes.factory import make_sandbox, resolve_backend
from m2rl.sandboxes.limits import Limits
from m2rl.sandboxes.sandbox import Sandbox

logger = logging.getLogger(__name__)


class SandboxPool:
    def __init__(
        self,
        backend: str = "auto",
        image: str | None = None,
        size: int = 4,
        limits: Limits | None = None,
        workers: int = 4,
        **options: Any,
    ) -> None:
        if not isinstance(size, int) or size < 1:
            raise SandboxError(f"SandboxPool size must be a positive integer, got {size!r}")
        self.backend = resolve_backend(backend, image)
        if self.backend == "docker":  # fail here, with the engine's or the image's own message
            from m2rl.sandboxes.docker_backend import docker_client, image_exists
            from m2rl.sandboxes.images import default_image

            docker_client()
            if not image_exists(image or default_image()):
                raise SandboxError(
                    f"Docker image {image or default_image()!r} does not exist; "
                    "build it with `m2rl images build`"
                )
        self.image = image
        self.size = size
        self.limits = limits
        self.options = options
        self._ready: deque[Sandbox] = deque()
        self._owned = 0  # ready + in use + resetting + starting
        self._cond = threading.Condition()
        self._closed = False
        self._errors: list[str] = []
        self._failures_in_a_row = 0  # start failures since the last success: past `size`, acquire gives up
        self._workers = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="m2rl-pool")
        self.replaced = 0  # sandboxes found broken and replaced (a health metric)
        for _ in range(size):
            self._spawn()

    # ---- caller side -----------------------------------------------------------------------------
    def acquire(self, timeout: float | None = 120.0) -> Sandbox:
        """A clean, healthy sandbox. Blocks while all `size` sandboxes are in use."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                while not self._ready:
                    if self._closed:
                        raise SandboxError("SandboxPool is closed")
                    if self._failures_in_a_row >= self.size:
                        self._failures_in_a_row = 0  # the next acquire tries again
                        raise SandboxError(f"sandboxes fail to start: {self._errors[-1]}")
                    if self._owned < self.size:
                        self._spawn_locked()
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        errors = f"; recent start errors: {self._errors[-3:]}" if self._errors else ""
                        raise SandboxError(f"no sandbox became ready within {timeout}s{errors}")
                    self._cond.wait(left)
                sb = self._ready.popleft()
            if sb.ping():
                return sb
            self._discard(sb)

    def release(self, sb: Sandbox) -> None:
        """Give a sandbox back; it is reset in the background and reused."""
        with self._cond:
            closed = self._closed
            if closed:
                self._owned -= 1
        if closed:
            sb.close()
            return
        self._workers.submit(self._recycle, sb)

    async def acquire_async(self, timeout: float | None = 120.0) -> Sandbox:
        return await asyncio.to_thread(self.acquire, timeout)

    async def release_async(self, sb: Sandbox) -> None:
        self.release(sb)

    def health_check(self) -> int:
        """Ping every ready sandbox, replace the broken ones; returns how many were replaced."""
        with self._cond:
            ready = list(self._ready)
            self._ready.clear()
        bad = 0
        for sb in ready:
            if sb.ping():
                with self._cond:
                    self._ready.append(sb)
                    self._cond.notify()
            else:
                bad += 1
                self._discard(sb)
        return bad

    @property
    def ready_count(self) -> int:
        with self._cond:
            return len(self._ready)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until `size` sandboxes are ready (benchmarks and tests start from a full pool)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._ready) < self.size:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SandboxError(
                        f"pool has {len(self._ready)}/{self.size} ready after {timeout}s: {self._errors[-3:]}"
                    )
                self._cond.wait(left)

    def close(self) -> None:
        """Close the ready sandboxes now; sandboxes still in use are closed when released."""
        with self._cond:
            self._closed = True
            ready = list(self._ready)
            self._ready.clear()
            self._owned -= len(ready)
            self._cond.notify_all()
        self._workers.shutdown(wait=True)
        for sb in ready:
            sb.close()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- background work -------------------------------------------------------------------------
    def _spawn(self) -> None:
        with self._cond:
            self._spawn_locked()

    def _spawn_locked(self) -> None:
        self._owned += 1
        self._workers.submit(self._create)

    def _create(self) -> None:
        try:
            sb = make_sandbox(self.backend, image=self.image, limits=self.limits, **self.options)
        except Exception as exc:
            with self._cond:
                self._owned -= 1
                self._failures_in_a_row += 1
                self._errors = [*self._errors[-9:], f"{type(exc).__name__}: {exc}"]
                self._cond.notify_all()
            return
        with self._cond:
            self._failures_in_a_row = 0
        self._offer(sb)

    def _recycle(self, sb: Sandbox) -> None:
        try:
            sb.reset()
        except Exception:  # a sandbox that cannot be reset is never handed out again: it is replaced
            logger.warning("a pooled sandbox could not be reset; replacing it", exc_info=True)
            self._discard(sb)
            return
        self._offer(sb)

    def _offer(self, sb: Sandbox) -> None:
        with self._cond:
            if not self._closed:
                self._ready.append(sb)
                self._cond.notify()
                return
            self._owned -= 1
        sb.close()

    def _discard(self, sb: Sandbox) -> None:
        """Close a broken sandbox and start a replacement."""
        try:
            sb.close()
        except Exception:  # it is broken already: starting its replacement is what matters
            logger.debug("closing a broken pooled sandbox failed", exc_info=True)
        with self._cond:
            self._owned -= 1
            self.replaced += 1
            if not self._closed and self._owned < self.size:
                self._spawn_locked()
            self._cond.notify_all()
