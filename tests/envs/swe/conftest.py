"""Fixtures of the SWE tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def docker_ready() -> None:
    """A Docker engine to run repository images in; the SWE env needs it (no bubblewrap fallback)."""
    from m2rl.sandboxes.docker_backend import engine_available

    if not engine_available():
        pytest.skip("the Docker engine is not reachable (start dockerd)")
