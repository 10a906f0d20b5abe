"""The warm pool: reuse after a background reset, health checks replacing broken sandboxes, clean close."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

import pytest
from m2rl.sandboxes import SandboxError, SandboxPool


def kill_from_outside(sb) -> None:
    if sb.backend == "docker":
        subprocess.run(["docker", "kill", sb.container_id], check=True, capture_output=True)
    else:
        os.kill(sb.executor_host_pid(), signal.SIGKILL)
        sb._proc.wait()


def test_pool_reuses_clean_sandboxes(backend):
    with SandboxPool(backend, size=2) as pool:
        pool.wait_ready(timeout=60)
        first = pool.acquire()
        first.write_file("/work/dirty", "episode 1")
        first.exec("sleep 100 &", keep_background=True)
        pool.release(first)
        seen = set()
        for _ in range(4):  # cycling through both sandboxes: every one handed out is clean
            sb = pool.acquire()
            seen.add(id(sb))
            assert sb.exec("ls /work; pgrep sleep || true").stdout == ""
            sb.write_file("/work/dirty", "again")
            pool.release(sb)
        assert id(first) in seen and len(seen) == 2  # no sandbox was created beyond the pool's size
        assert pool.replaced == 0


def test_pool_replaces_broken_sandboxes(backend):
    with SandboxPool(backend, size=2) as pool:
        pool.wait_ready(timeout=60)
        a = pool.acquire()
        b = pool.acquire()
        pool.release(a)
        pool.release(b)
        pool.wait_ready(timeout=60)
        kill_from_outside(a)
        time.sleep(0.2)
        assert pool.health_check() == 1
        pool.wait_ready(timeout=60)
        got = [pool.acquire(), pool.acquire()]
        assert all(sb.exec("echo ok").stdout == "ok\n" for sb in got)
        assert a not in got and pool.replaced == 1
        kill_from_outside(got[0])  # dies while in use: its reset fails on release and it is replaced
        for sb in got:
            pool.release(sb)
        pool.wait_ready(timeout=60)
        assert pool.replaced == 2


def test_pool_blocks_at_capacity_and_async(backend):
    async def main(pool: SandboxPool) -> str:
        sb = await pool.acquire_async()
        out = sb.exec("echo async").stdout
        await pool.release_async(sb)
        return out

    with SandboxPool(backend, size=1) as pool:
        held = pool.acquire(timeout=60)
        with pytest.raises(SandboxError, match="no sandbox became ready"):
            pool.acquire(timeout=0.3)
        pool.release(held)
        assert asyncio.run(main(pool)) == "async\n"


def test_pool_rejects_bad_input():
    with pytest.raises(SandboxError, match="size"):
        SandboxPool("bwrap", size=0)


def test_pool_reports_start_failures(bwrap_ready):
    with SandboxPool("bwrap", size=2, python="/nonexistent/python3") as pool:
        with pytest.raises(SandboxError, match="fail to start: SandboxError: .*nonexistent/python3"):
            pool.acquire(timeout=30)
