"""Start and stop our own server, `m2rl serve`, as a subprocess: the generator of `policy.kind: m2rl`.

The life cycle is agent/server_process.py's, as for vLLM: its own process group and log file, ready once
`/health` answers 200, `check_alive` raising `M2RLServerError` with the log tail when the process exited or
the scheduler stopped, `stop()` SIGTERM then SIGKILL, an `atexit` hook so a crashing run leaks no server.
Unlike vLLM it is never restarted: weights reach it through rl/weight_transfer.py while it serves.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from m2rl.agent.server_process import ServerProcess


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


class M2RLServer(ServerProcess):
    name = "m2rl serve"
    error = M2RLServerError
    unhealthy = "scheduler stopped"
    ready_poll_s = 0.2

    def __init__(self, config: M2RLServerConfig) -> None:
        super().__init__(config.host, config.port, config.log_path, log_prefix="m2rl-serve-",
                         startup_timeout_s=config.startup_timeout_s)
        self.config = config

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

    def environment(self) -> dict[str, str]:
        return {"PYTHONUNBUFFERED": "1", **self.config.env}

    def start(self) -> Self:
        """Start on `config.model_dir`, which the caller writes just before (rl/weight_sync.py: ServeSync)."""
        if self.process is None and not (Path(self.config.model_dir) / "config.json").is_file():
            raise M2RLServerError(f"{self.config.model_dir} is not a checkpoint directory (no config.json)")
        return super().start()

    def policy(self, **kwargs: Any) -> Any:
        """An OpenAIPolicy on this server; a failed request first asks `check_alive`, so a dead server is
        reported at once with its log tail rather than after every retry."""
        from m2rl.agent.openai_policy import OpenAIPolicy

        kwargs.setdefault("server_check", self.check_alive)
        return OpenAIPolicy(self.base_url, self.model_name, api_key=self.config.api_key, **kwargs)
