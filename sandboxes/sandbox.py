"""The `Sandbox` protocol every backend implements, on top of the in-sandbox executor (executor.py).

A backend only knows how to start an isolated process tree running the executor with the right mounts and
limits, and how to destroy it; everything else (exec, files, reset) is the same framed protocol.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import shutil
import tarfile
import time
import weakref
from pathlib import Path
from typing import Any

from m2rl.sandboxes.channel import SOCKET_NAME, Channel
from m2rl.sandboxes.errors import SandboxDead, SandboxError
from m2rl.sandboxes.executor_files import RefusedFile, extract_tar, tar_path
from m2rl.sandboxes.limits import Limits
from m2rl.sandboxes.result import ExecResult

logger = logging.getLogger(__name__)

WORKDIR = "/work"
HOME = "/home/sandbox"
SHM = "/dev/shm"
WRITABLE_ROOTS = (WORKDIR, "/tmp", HOME, SHM)  # what reset() restores
# An image seeds a writable root R (a fresh tmpfs hiding the image's R) with the files under SEED_ROOT + R.
SEED_ROOT = "/opt/m2rl/seed"
# Roots a sandbox may add beyond WRITABLE_ROOTS (e.g. /testbed, where SWE-bench keeps its repository):
# absolute, one level deep, and never a directory the system or the executor needs read-only.
RESERVED_ROOTS = frozenset({"/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/opt", "/proc", "/root",
                            "/run", "/sbin", "/sys", "/usr", "/var", "/home"})
# The executor's files (stdlib-only modules), staged per sandbox and bound read-only at EXECUTOR_DIR.
EXECUTOR_FILES = ("executor.py", "executor_files.py")
EXECUTOR_DIR = "/opt/m2rl/executor"
EXECUTOR_PATH = f"{EXECUTOR_DIR}/executor.py"
EXECUTOR_SOCKET_DIR = "/run/m2rl"
# Host-side grace beyond an exec's own timeout before a silent executor counts as dead.
EXEC_GRACE_S = 15.0
NO_TIMEOUT_S = 7 * 24 * 3600.0  # what timeout=None means
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": HOME,
    "USER": "sandbox",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "TERM": "dumb",
}


def check_extra_roots(extra_roots: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate a sandbox's extra writable roots: top-level absolute paths, not system directories."""
    roots = tuple(extra_roots)
    for root in roots:
        if (not isinstance(root, str) or not root.startswith("/") or root.count("/") != 1 or len(root) < 2
                or root in RESERVED_ROOTS or root in WRITABLE_ROOTS):
            raise SandboxError(
                f"extra writable root {root!r} must be a top-level directory like '/testbed', not one of "
                f"{sorted(RESERVED_ROOTS | set(WRITABLE_ROOTS))}"
            )
    if len(set(roots)) != len(roots):
        raise SandboxError(f"extra writable roots {list(roots)} name a directory twice")
    return roots


def executor_config(
    rlimits: dict[str, int] | None = None,
    memory_watchdog_bytes: int | None = None,
    limits: Limits | None = None,
    extra_roots: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The executor's start-up configuration. `limits` size what it may hold in memory (see
    `Executor.bound_own_memory`); without them it reads its mounts' sizes and its cgroup's memory limit.
    `extra_roots` are writable roots beyond the standard ones (seeded, snapshotted and reset the same way)."""
    config: dict[str, Any] = {
        "writable_roots": [*WRITABLE_ROOTS, *extra_roots],
        "seed_root": SEED_ROOT,
        "socket": f"{EXECUTOR_SOCKET_DIR}/{SOCKET_NAME}",
        "rlimits": rlimits or {},
        "env": BASE_ENV,
        "memory_watchdog_bytes": memory_watchdog_bytes,
    }
    if limits is not None:
        config["disk_bytes"] = limits.disk_mb << 20
        config["memory_bytes"] = limits.memory_mb << 20
        config["max_transfer_bytes"] = limits.max_drain_bytes
    return config


def stage_executor(state_dir: Path) -> Path:
    """Copy the executor's files into `state_dir/executor`, the directory `executor_binds` shares: a sandbox
    keeps the code it started with, and sees none of the host's other sources."""
    target = state_dir / "executor"
    target.mkdir()
    target.chmod(0o755)  # the sandbox's user (another uid) reads it, whatever the umask
    for name in EXECUTOR_FILES:
        shutil.copy(Path(__file__).with_name(name), target / name)
    return target


def executor_binds(executor_dir: Path, socket_dir: Path) -> list[tuple[str, str]]:
    """(host directory, path in the sandbox) of what every backend binds READ-ONLY: the staged executor, and
    the directory of the socket it connects to (connecting needs no write access to the file system, and a
    host directory must not store what the sandbox writes)."""
    return [(str(executor_dir), EXECUTOR_DIR), (str(socket_dir), EXECUTOR_SOCKET_DIR)]


def executor_command(
    python: str,
    rlimits: dict[str, int] | None = None,
    memory_watchdog_bytes: int | None = None,
    limits: Limits | None = None,
    extra_roots: tuple[str, ...] = (),
) -> list[str]:
    """The command that starts the executor: isolated (`-I -S`: no environment variables, user site or
    working directory on its import path), its `executor_config` as JSON."""
    config = executor_config(rlimits, memory_watchdog_bytes, limits, extra_roots)
    return [python, "-I", "-S", EXECUTOR_PATH, json.dumps(config)]


# Sandboxes never closed by their owner are closed at interpreter exit (their executors would exit on
# their own when the connection drops; this also removes their state directories).
_LIVE: "weakref.WeakSet[Sandbox]" = weakref.WeakSet()


@atexit.register
def _close_live_sandboxes() -> None:
    for sb in list(_LIVE):
        try:
            sb.close()
        except Exception:  # at exit nobody can act on it; `m2rl sandboxes gc` removes what is left
            logger.debug("closing a sandbox at exit failed", exc_info=True)


class Sandbox:
    """One isolated machine for one episode. Use as a context manager, or call `close()`."""

    backend = "abstract"

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._channel: Channel | None = None
        self.closed = False
        self.created_at = time.monotonic()
        _LIVE.add(self)

    # ---- backend hooks -------------------------------------------------------------------------
    def _destroy(self) -> None:
        raise NotImplementedError

    def _death_reason(self) -> str | None:
        """None while the sandbox's processes are running, else why they are not."""
        raise NotImplementedError

    # ---- protocol --------------------------------------------------------------------------------
    def _request(
        self, header: dict, payload: bytes = b"", timeout: float | None = 60.0
    ) -> tuple[dict, bytes]:
        if self.closed or self._channel is None:
            raise SandboxDead(f"{self.backend} sandbox is closed")
        try:
            return self._channel.request(header, payload, timeout=timeout)
        except SandboxDead as exc:
            reason = self._death_reason()
            raise SandboxDead(f"{self.backend} sandbox is dead: {reason or exc}") from exc

    def exec(
        self,
        cmd: str | list[str],
        timeout: float | None = 30.0,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        stdin: str | bytes | None = None,
        keep_background: bool = False,
    ) -> ExecResult:
        """Run `cmd` (a str runs under `bash -lc`) and wait at most `timeout` seconds (None: no limit).

        On timeout every process the command started is killed and the sandbox stays usable. Processes a
        command leaves running in the background are killed when it returns, unless `keep_background`
        (they then live, in their session, until `reset()`/`close()`).
        """
        argv = _argv(cmd)
        if timeout is None:
            timeout = NO_TIMEOUT_S
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise SandboxError(f"exec timeout must be a positive number of seconds or None, got {timeout!r}")
        if cwd is not None and (not isinstance(cwd, str) or not cwd.startswith("/")):
            raise SandboxError(f"exec cwd must be an absolute path inside the sandbox, got {cwd!r}")
        if env is not None and not (
            isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())
        ):
            raise SandboxError("exec env must be a dict of str to str")
        if isinstance(stdin, str):
            stdin = stdin.encode()
        if stdin is not None and not isinstance(stdin, bytes):
            raise SandboxError(f"exec stdin must be str or bytes, got {type(stdin).__name__}")
        header = {
            "op": "exec",
            "argv": argv,
            "timeout": float(timeout),
            "cwd": cwd or WORKDIR,
            "env": env or {},
            "max_output": self.limits.max_output_bytes,
            "max_drain": self.limits.max_drain_bytes,
            "keep_background": keep_background,
        }
        reply, data = self._request(header, stdin or b"", timeout=timeout + EXEC_GRACE_S)
        n = reply["stdout_n"]
        return ExecResult(
            exit_code=reply["exit_code"],
            stdout=data[:n].decode("utf-8", "replace"),
            stderr=data[n:].decode("utf-8", "replace"),
            timed_out=reply["timed_out"],
            truncated=reply["truncated"],
            duration_s=reply["duration_s"],
        )

    def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        """The contents of the regular file `path`. A symlink at `path` is never followed, and a FIFO,
        socket or device never opened: both are a SandboxError, as is a file larger than `max_bytes`
        (default: `limits.max_drain_bytes`, what one exec may print)."""
        _check_path(path)
        header = {"op": "read", "path": path, "max_bytes": self._transfer_bound(max_bytes)}
        return self._request(header)[1]

    def write_file(self, path: str, data: str | bytes, mode: int | None = None) -> None:
        _check_path(path)
        if isinstance(data, str):
            data = data.encode()
        if not isinstance(data, bytes):
            raise SandboxError(f"write_file data must be str or bytes, got {type(data).__name__}")
        self._request({"op": "write", "path": path, "mode": mode}, data)

    def upload(self, local: str | Path, remote: str) -> None:
        """Copy a host file or directory to `remote` (the full destination path)."""
        local, remote = Path(local), _check_path(remote)
        if not local.exists():
            raise SandboxError(f"upload: local path does not exist: {local}")
        parent, name = remote.rsplit("/", 1)
        try:  # the executor's own packer: iterative, by name, skipping links' targets and special files
            data = tar_path(str(local.absolute()), self.limits.disk_mb << 20)
        except (OSError, RefusedFile) as exc:
            raise SandboxError(f"upload of {local}: {type(exc).__name__}: {exc}") from exc
        self._request({"op": "untar", "path": parent or "/", "top": name}, data)

    def download(self, remote: str, local: str | Path, max_bytes: int | None = None) -> None:
        """Copy a sandbox file or directory to the host path `local` (the full destination path).

        Only directories and regular files come back (links, FIFOs, sockets are skipped), with the host's
        default modes, at most `max_bytes` in all (default: `limits.max_drain_bytes`).
        """
        _check_path(remote)
        local = Path(local).absolute()
        header = {"op": "tar", "path": remote, "max_bytes": self._transfer_bound(max_bytes)}
        _, data = self._request(header)
        local.parent.mkdir(parents=True, exist_ok=True)
        parent = os.open(local.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:  # the executor's own unpacker: by name from open directories, never through a link
            extract_tar(data, parent, keep_links=False, keep_modes=False, rename_top=local.name)
        except (OSError, ValueError, tarfile.TarError) as exc:
            raise SandboxError(
                f"download of {remote} to {local} failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            os.close(parent)

    def kill_processes(self) -> None:
        """Kill every process in the sandbox, kept background sessions (the python tool's interpreter)
        included, and return once only the executor is left: grading starts from a sandbox nothing of the
        agent's can still change."""
        self._request({"op": "kill"}, timeout=60.0)

    def reset(self) -> None:
        """Kill every process and restore the writable roots (/work, /tmp, $HOME, /dev/shm and any extra
        root) to the initial (or checkpointed) state."""
        self._request({"op": "reset"}, timeout=120.0)

    def checkpoint(self) -> None:
        """Make the current /work, /tmp and $HOME the state `reset()` returns to (e.g. after task set-up)."""
        self._request({"op": "checkpoint"}, timeout=120.0)

    def _transfer_bound(self, max_bytes: int | None) -> int:
        if max_bytes is None:
            return self.limits.max_drain_bytes
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
            raise SandboxError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        return max_bytes

    def ping(self) -> bool:
        try:
            self._request({"op": "ping"}, timeout=5.0)
            return True
        except SandboxError:
            return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        _LIVE.discard(self)
        if self._channel is not None:
            self._channel.close()
        self._destroy()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "closed", True):
            try:
                self.close()
            except Exception:  # __del__ must not raise; `m2rl sandboxes gc` removes what is left
                logger.debug("closing a sandbox in __del__ failed", exc_info=True)


class AsyncSandbox:
    """The same protocol with `await`: each call runs in a worker thread, so sandboxes proceed at once."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sync = sandbox

    async def exec(
        self,
        cmd: str | list[str],
        timeout: float | None = 30.0,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        stdin: str | bytes | None = None,
        keep_background: bool = False,
    ) -> ExecResult:
        return await asyncio.to_thread(self.sync.exec, cmd, timeout, cwd, env, stdin, keep_background)

    async def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        return await asyncio.to_thread(self.sync.read_file, path, max_bytes)

    async def write_file(self, path: str, data: str | bytes, mode: int | None = None) -> None:
        await asyncio.to_thread(self.sync.write_file, path, data, mode)

    async def upload(self, local: str | Path, remote: str) -> None:
        await asyncio.to_thread(self.sync.upload, local, remote)

    async def download(self, remote: str, local: str | Path, max_bytes: int | None = None) -> None:
        await asyncio.to_thread(self.sync.download, remote, local, max_bytes)

    async def kill_processes(self) -> None:
        await asyncio.to_thread(self.sync.kill_processes)

    async def reset(self) -> None:
        await asyncio.to_thread(self.sync.reset)

    async def checkpoint(self) -> None:
        await asyncio.to_thread(self.sync.checkpoint)

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _argv(cmd: str | list[str]) -> list[str]:
    if isinstance(cmd, str):
        if not cmd.strip():
            raise SandboxError("exec: empty command")
        return ["bash", "-lc", cmd]
    if isinstance(cmd, (list, tuple)) and cmd and all(isinstance(a, str) for a in cmd):
        return list(cmd)
    raise SandboxError(f"exec: cmd must be a non-empty str or list of str, got {cmd!r}")


def _check_path(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise SandboxError(f"sandbox paths must be absolute strings, got {path!r}")
    return path.rstrip("/") or "/"
