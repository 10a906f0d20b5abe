"""Start and stop our own server, `m2rl serve`, as a subprocess: the generator of `policy.kind: m2rl`.

The same life cycle as agent/vllm_server.py's `VLLMServer`: its own process group and log file, ready once
`/health` answers 200, `check_alive` raising `M2RLServerError` with the log tail when the process exited or
the scheduler stopped, `stop()` SIGTERM then SIGKILL, an `atexit` hook so a crashing run leaks no server.
Unlike vLLM it is never restarted: weights reach it through rl/weight_transfer.py while it serves.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
from m2rl.agent.vllm_server import free_port


class M2RLServerError(RuntimeError):
    """The launched `m2rl serve` exited or did not become ready; the message carries the tail of its log."""


@dataclass
class M2RLServerConfig:
    model_dir: str | Path  # a checkpoint directory with its tokenizer (what save_pretrained writes)
    host: str = "127.0.0.1"  # this machine only: the weight endpoints take no key unless api_key is set
    port: int | None = None  # None: pick a free port
    device: str = ""  # torch device; empty: m2rl serve's default (cuda if available, else cpu)
    dtype: str = "float32"
    served_model_name: str | None = None  # None: the checkpoint directory's name
    max_batch: int = 16
    api_key: str | None = None
    startup_timeout_s: float = 120.0
    log_path: str | Path | None = None  # None: a temporary file
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


class M2RLServer:
    def __init__(self, config: M2RLServerConfig) -> None:
        self.config = config
        self.port = config.port or free_port(config.host)
        self.process: subprocess.Popen[bytes] | None = None
        if config.log_path:
            self.log_path = Path(config.log_path)
        else:
            fd, name = tempfile.mkstemp(prefix="m2rl-serve-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._log_file: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def model_name(self) -> str:
        return self.config.served_model_name or Path(self.config.model_dir).name

    def command(self) -> list[str]:
        c = self.config
        cmd = [sys.executable, "-m", "m2rl.cli", "serve", "--model", str(c.model_dir), "--host", c.host,
               "--port", str(self.port), "--dtype", c.dtype, "--max-batch", str(c.max_batch)]
        if c.device:
            cmd += ["--device", c.device]
        if c.served_model_name:
            cmd += ["--served-model-name", c.served_model_name]
        if c.api_key:
            cmd += ["--api-key", c.api_key]
        return cmd + list(c.extra_args)

    def start(self) -> Self:
        if self.process is not None:
            raise M2RLServerError("server already started")
        if not (Path(self.config.model_dir) / "config.json").is_file():
            raise M2RLServerError(f"{self.config.model_dir} is not a checkpoint directory (no config.json)")
        # As for vLLM: the working directory first on sys.path could shadow the installed m2rl with a checkout.
        env = {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1", **self.config.env}
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the server's lifetime
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
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise M2RLServerError(f"m2rl serve exited with code {self.process.returncode} during start-up; "
                                      f"log {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise M2RLServerError(f"m2rl serve not ready after {self.config.startup_timeout_s:.0f} s; "
                              f"log {self.log_path}:\n{self.log_tail()}")

    def check_alive(self) -> None:
        """Raise M2RLServerError with the log tail if the server is known to be dead: its process exited, or
        /health answers 503 (its scheduler stopped). A server too busy to answer is not dead."""
        proc = self.process
        if proc is None:
            raise M2RLServerError(f"m2rl serve is not running (stopped); log {self.log_path}:\n{self.log_tail()}")
        if proc.poll() is None:
            try:
                status = httpx.get(f"{self.url}/health", timeout=2.0).status_code
            except httpx.ConnectError:
                try:  # nothing listens any more: the process is on its way out
                    proc.wait(timeout=5.0)
                except subprocess.TimeoutExpired:
                    return
            except httpx.TransportError:
                return
            else:
                if status == 503:
                    raise M2RLServerError(f"m2rl serve's scheduler stopped (/health answers 503); "
                                          f"log {self.log_path}:\n{self.log_tail()}")
                return
        raise M2RLServerError(f"m2rl serve exited with code {proc.returncode}; log {self.log_path}:\n"
                              f"{self.log_tail()}")

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
                    os.killpg(proc.pid, sig)  # the group start() created
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
            atexit.unregister(self.stop)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def policy(self, **kwargs: Any) -> Any:
        """An OpenAIPolicy on this server; a failed request first asks `check_alive`, so a dead server is
        reported at once with its log tail rather than after every retry."""
        from m2rl.agent.openai_policy import OpenAIPolicy

        kwargs.setdefault("server_check", self.check_alive)
        return OpenAIPolicy(self.base_url, self.model_name, api_key=self.config.api_key, **kwargs)
