"""EnvPool: N envs stepped concurrently with asyncio; results match running each env alone."""

from __future__ import annotations

import asyncio
import json

import pytest
from m2rl.envs.experts import EXPERTS, action_text
from m2rl.envs.pool import EnvPool

pytestmark = pytest.mark.bwrap


async def run_experts(pool: EnvPool, task_ids: list[str]) -> list[dict]:
    """Every env runs its own expert script; all envs step together each round."""
    await pool.reset_all(options=[{"task_id": t} for t in task_ids])
    scripts = [EXPERTS["python"](env.unwrapped.task) for env in pool.envs]
    calls = [next(s) for s in scripts]
    finals: list[dict | None] = [None] * len(pool)
    while any(f is None for f in finals):
        actions = [None if finals[i] is not None else action_text(calls[i]) for i in range(len(pool))]
        results = await pool.step_all(actions)
        for i, result in enumerate(results):
            if result is None:
                continue
            _, _, terminated, truncated, info = result
            if terminated or truncated:
                finals[i] = info
            else:
                calls[i] = scripts[i].send([r["output"] for r in info["tool_results"]])
    return finals  # type: ignore[return-value]


def test_pool_runs_envs_concurrently_and_correctly() -> None:
    with EnvPool.make("m2rl/Python-v0", num_envs=3, split="test") as pool:
        task_ids = [t.id for t in pool.envs[0].unwrapped.task_set.tasks("test", 3)]
        finals = asyncio.run(run_experts(pool, task_ids))
        assert [f["verification"]["resolved"] for f in finals] == [True, True, True]
        # A second event loop works too (locks are per loop).
        finals = asyncio.run(run_experts(pool, task_ids[::-1]))
        assert all(f["verification"]["resolved"] for f in finals)


def test_pool_overlaps_blocking_tool_calls() -> None:
    """Each env's cell records when it ran (the sandboxes share the host clock): with concurrent stepping the
    three 1-second cells' intervals overlap; stepped one after another they could not."""
    with EnvPool.make("m2rl/Python-v0", num_envs=3) as pool:

        async def go() -> list[list[float]]:
            await pool.reset_all(seeds=[0, 1, 2])
            code = "import time\nstart = time.time()\ntime.sleep(1)\n[start, time.time()]"
            results = await pool.step_all([action_text([("python", {"code": code})])] * 3)
            return [json.loads(r[4]["tool_results"][0]["output"]) for r in results]

        intervals = asyncio.run(go())
        latest_start = max(start for start, _ in intervals)
        earliest_end = min(end for _, end in intervals)
        assert latest_start < earliest_end  # a moment when all three cells were running at once


def test_pool_input_errors() -> None:
    with EnvPool.make("m2rl/Python-v0", num_envs=2) as pool:
        with pytest.raises(ValueError, match="one action per env \\(2\\)"):
            asyncio.run(pool.step_all(["x"]))
        with pytest.raises(IndexError, match="out of range"):
            asyncio.run(pool.step(5, "x"))
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(pool.step(0, "x"))
    with pytest.raises(ValueError, match="at least one"):
        EnvPool([])


def test_tool_env_takes_sandboxes_from_a_sandbox_pool() -> None:
    import gymnasium as gym
    from m2rl.envs.experts import run_script
    from m2rl.sandboxes import SandboxPool

    with SandboxPool(backend="bwrap", size=1) as sandboxes:
        env = gym.make("m2rl/Shell-v0", pool=sandboxes, split="test")
        task = env.unwrapped.task_set.tasks("test", 1)[0]
        _, info, _ = run_script(env, EXPERTS["shell"], options={"task_id": task.id})
        assert info["verification"]["resolved"]
        env.close()  # gives the sandbox back: the pool can hand it out again, cleaned
        again = sandboxes.acquire(timeout=30)
        assert again.exec("ls /work").stdout == ""
        sandboxes.release(again)
