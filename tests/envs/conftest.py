"""Shared fixtures of the env tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from m2rl.envs.tools.processes import live_descendants


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Every process (Chromium, Playwright driver, MCP server) and thread a test started is gone after it."""
    before, threads = live_descendants(), set(threading.enumerate())
    yield
    deadline = time.monotonic() + 10
    while True:
        leaked = {pid: cmd for pid, cmd in live_descendants().items() if pid not in before}
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert leaked == {}, f"processes outlived close(): {leaked}"
    assert {t for t in threading.enumerate() if t.is_alive()} <= threads
