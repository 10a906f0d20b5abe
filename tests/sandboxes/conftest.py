"""Fixtures for the sandbox tests: one sandbox per backend, and a leak check after every test."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from m2rl.sandboxes import Sandbox, make_sandbox
from m2rl.sandboxes.bwrap_backend import STATE_ROOT as BWRAP_STATE
from m2rl.sandboxes.bwrap_backend import bwrap_available
from m2rl.sandboxes.docker_backend import STATE_ROOT as DOCKER_STATE
from m2rl.sandboxes.errors import SandboxError


def _docker_skip_reason() -> str | None:
    from m2rl.sandboxes.docker_backend import docker_client
    from m2rl.sandboxes.errors import EngineUnavailable

    try:
        docker_client()
    except EngineUnavailable as exc:
        return str(exc)
    try:
        from m2rl.sandboxes.images import build_base

        build_base()  # cached by content hash: a lookup when the image exists
    except SandboxError as exc:
        return f"cannot build the base sandbox image: {exc}"
    return None


_docker_reason: list[str | None] = []
_bwrap_reason: list[str | None] = []


def require_docker() -> None:
    if not _docker_reason:
        _docker_reason.append(_docker_skip_reason())
    if _docker_reason[0]:
        pytest.skip(f"Docker sandbox unavailable: {_docker_reason[0]}")


def require_bwrap() -> None:
    if not _bwrap_reason:
        _bwrap_reason.append(bwrap_available())
    if _bwrap_reason[0]:
        pytest.skip(f"bubblewrap sandbox unavailable: {_bwrap_reason[0]}")


def require(backend: str) -> None:
    require_docker() if backend == "docker" else require_bwrap()


@pytest.fixture
def docker_ready() -> None:
    require_docker()


@pytest.fixture
def bwrap_ready() -> None:
    require_bwrap()


BACKENDS = [pytest.param("bwrap", marks=pytest.mark.bwrap), pytest.param("docker", marks=pytest.mark.docker)]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    require(request.param)
    return request.param


@pytest.fixture
def sandbox(backend: str) -> Iterator[Sandbox]:
    with make_sandbox(backend) as sb:
        yield sb


def descendants(root_pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live process below root_pid, by walking /proc parent links."""
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = (
                Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        parents[int(entry)] = int(fields[1])
        names[int(entry)] = cmdline.strip()
    found = []
    for pid in parents:
        p = pid
        while p in parents and p > 1:
            p = parents[p]
            if p == root_pid:
                found.append((pid, names[pid]))
                break
    return found


def leaked_containers() -> list[str]:
    from m2rl.sandboxes.gc import labelled_containers

    try:
        return [c["Id"][:12] for c in labelled_containers(owner_pid=os.getpid())]
    except SandboxError:
        return []


def own_state_dirs() -> list[str]:
    """State directories are named `<owner pid>-<random>`: only this process's count."""
    prefix = f"{os.getpid()}-"
    return [
        str(d)
        for root in (BWRAP_STATE, DOCKER_STATE)
        if root.is_dir()
        for d in root.iterdir()
        if d.name.startswith(prefix)
    ]


def _interpreter_helper(cmdline: str) -> bool:
    """pytest's own processes, and multiprocessing's resource tracker: started by the first spawned child
    of the session (tests/model/test_parallel.py's ranks, say), it lives as long as the interpreter and
    holds no sandbox."""
    return "pytest" in cmdline or "multiprocessing.resource_tracker" in cmdline


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """After each test: no sandbox container, process or state directory of this process may remain."""
    yield
    deadline = time.monotonic() + 5.0
    while True:  # the engine may need a moment to finish an auto-removal
        containers = leaked_containers()
        procs = [p for p in descendants(os.getpid()) if not _interpreter_helper(p[1])]
        state_dirs = own_state_dirs()
        if not (containers or procs or state_dirs) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not containers, f"leaked sandbox containers: {containers}"
    assert not procs, f"leaked processes: {procs}"
    assert not state_dirs, f"leaked sandbox state dirs: {state_dirs}"
