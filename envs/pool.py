"""`EnvPool`: N environments stepped concurrently with asyncio, for the rollout system.

Env work is blocking (sandbox round trips, graders), so each call runs in a worker thread; a per-env lock
keeps one env's calls in order while different envs overlap. `step_all` / `reset_all` gather over envs.
The sandbox round trips release the GIL (socket I/O), so N envs overlap their tool latency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import gymnasium as gym

StepResult = tuple[str, float, bool, bool, dict[str, Any]]


class EnvPool:
    """Build with `EnvPool.make("m2rl/Shell-v0", num_envs=8, backend="bwrap")` or from env constructors."""

    def __init__(self, env_fns: Sequence[Callable[[], gym.Env]], max_workers: int | None = None) -> None:
        if not env_fns:
            raise ValueError("EnvPool needs at least one environment constructor")
        self.envs: list[gym.Env] = []
        try:
            for fn in env_fns:
                self.envs.append(fn())
        except BaseException:
            self.close()
            raise
        self._executor = ThreadPoolExecutor(
            max_workers=max_workers or len(self.envs), thread_name_prefix="m2rl-env"
        )
        self._locks: list[asyncio.Lock] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closed = False

    @classmethod
    def make(cls, env_id: str, num_envs: int, max_workers: int | None = None, **kwargs: Any) -> EnvPool:
        import m2rl.envs  # noqa: F401  (registers the ids)

        return cls([lambda: gym.make(env_id, **kwargs) for _ in range(num_envs)], max_workers=max_workers)

    def __len__(self) -> int:
        return len(self.envs)

    def _check(self, index: int) -> None:
        if self.closed:
            raise RuntimeError("EnvPool is closed")
        if not 0 <= index < len(self.envs):
            raise IndexError(f"env index {index} out of range for a pool of {len(self.envs)}")

    async def _run(self, index: int, fn: Callable[[], Any]) -> Any:
        self._check(index)
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # asyncio locks belong to one event loop: new loop, new locks
            self._loop, self._locks = loop, [asyncio.Lock() for _ in self.envs]
        async with self._locks[index]:
            return await loop.run_in_executor(self._executor, fn)

    async def reset(
        self, index: int, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[str, dict[str, Any]]:
        env = self.envs[index]
        return await self._run(index, lambda: env.reset(seed=seed, options=options))

    async def step(self, index: int, action: str) -> StepResult:
        env = self.envs[index]
        return await self._run(index, lambda: env.step(action))

    async def reset_all(
        self,
        seeds: Sequence[int | None] | None = None,
        options: Sequence[dict[str, Any] | None] | None = None,
    ) -> list[tuple[str, dict[str, Any]]]:
        seeds = list(seeds) if seeds is not None else [None] * len(self)
        options = list(options) if options is not None else [None] * len(self)
        if len(seeds) != len(self) or len(options) != len(self):
            raise ValueError(f"reset_all needs one seed and one options entry per env ({len(self)})")
        return list(
            await asyncio.gather(*(self.reset(i, s, o) for i, (s, o) in enumerate(zip(seeds, options))))
        )

    async def step_all(self, actions: Sequence[str | None]) -> list[StepResult | None]:
        """Step every env whose action is not None (finished envs pass None); results in env order."""
        if len(actions) != len(self):
            raise ValueError(f"step_all needs one action per env ({len(self)}), got {len(actions)}")

        async def one(i: int, action: str | None) -> StepResult | None:
            return None if action is None else await self.step(i, action)

        return list(await asyncio.gather(*(one(i, a) for i, a in enumerate(actions))))

    def close(self) -> None:
        for env in self.envs:
            try:
                env.close()
            except Exception:
                pass
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        self.closed = True

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
