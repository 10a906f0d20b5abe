"""Bubblewrap backend: an unprivileged namespace sandbox for machines without a Docker engine.

Each sandbox is one `bwrap` process tree with its own user, PID, network, IPC, UTS and cgroup namespaces:
the host's /usr is bound read-only (plus a short allow-list of /etc files), /work, /tmp and the home
directory are size-limited tmpfs mounts, and the root is re-mounted read-only. The executor (agent.py) is
PID 1 inside (`--as-pid-1`). Limits are rlimits set on every command: with no cgroup, RLIMIT_NPROC is what
stops a fork bomb, so as root each sandbox runs under its own random high host uid (its own process count);
otherwise all sandboxes share the caller's uid and count. Memory is RLIMIT_AS per process plus the executor's
watchdog on the sandbox's total resident memory while a command runs (polled every 20 ms).
"""

from __future__ import annotations

import os
import resource
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from m2rl.sandboxes.channel import Channel
from m2rl.sandboxes.errors import SandboxError
from m2rl.sandboxes.limits import Limits
from m2rl.sandboxes.sandbox import AGENT_PATH, AGENT_SOCKET_DIR, HOME, Sandbox, agent_config

AGENT_SOURCE = Path(__file__).with_name("agent.py")
STATE_ROOT = Path(tempfile.gettempdir()) / "m2rl-bwrap"
# /etc entries a shell and Python need; everything else on the host stays invisible.
ETC_ALLOW = (
    "hosts",
    "resolv.conf",
    "nsswitch.conf",
    "host.conf",
    "gai.conf",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "ssl",
    "ca-certificates",
    "alternatives",
    "localtime",
    "profile",
    "profile.d",
    "bash.bashrc",
    "inputrc",
    "protocols",
    "services",
    "os-release",
    "debian_version",
    "mime.types",
    "python3",
    "python3.11",
    "bindresvport.blacklist",
    "login.defs",
    "environment",
)
# bwrap only makes mount points, so these are the directories whose absence would break common tools.
HOST_UID_RANGE = (200_000, 2_000_000)
MARKER_ENV = "M2RL_BWRAP_SANDBOX"
RESET_STRATEGIES = ("snapshot", "overlay")


# The smallest sandbox bwrap can make here: every namespace, the host's /usr read-only. The
# availability probe runs `true` in it; the benchmark uses it (+ /proc, /dev) as its raw baseline.
MINIMAL_BWRAP = [
    "bwrap", "--unshare-all", "--ro-bind", "/usr", "/usr",
    "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
]


def bwrap_available() -> str | None:
    """None when bubblewrap can run here, else the reason it cannot."""
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (`apt-get install -y bubblewrap`)"
    probe = subprocess.run(
        [*MINIMAL_BWRAP, "/usr/bin/true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return f"bwrap cannot create namespaces here: {probe.stderr.strip()}"
    return None


class BwrapSandbox(Sandbox):
    backend = "bwrap"

    def __init__(
        self,
        limits: Limits | None = None,
        reset_strategy: str = "snapshot",
        start_timeout: float = 30.0,
        python: str = "/usr/bin/python3",
    ) -> None:
        super().__init__(limits)
        if reset_strategy not in RESET_STRATEGIES:
            raise SandboxError(f"unknown reset_strategy {reset_strategy!r}; choose one of {RESET_STRATEGIES}")
        if not Path(python).exists():
            raise SandboxError(f"bwrap sandbox needs the host's {python} (bound read-only into the sandbox)")
        self.reset_strategy = reset_strategy
        self.start_timeout = start_timeout
        self.python = python
        STATE_ROOT.mkdir(mode=0o755, exist_ok=True)
        self.id = f"{os.getpid()}-{secrets.token_hex(5)}"  # owner pid first: leak checks and gc read it
        self.state_dir = STATE_ROOT / self.id
        self.state_dir.mkdir(mode=0o755)
        self.own_uid = os.geteuid() == 0
        self.host_uid = (
            secrets.randbelow(HOST_UID_RANGE[1] - HOST_UID_RANGE[0]) + HOST_UID_RANGE[0]
            if self.own_uid
            else os.geteuid()
        )
        shutil.copy(AGENT_SOURCE, self.state_dir / "agent.py")
        self._write_identity()
        self._proc: subprocess.Popen | None = None
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> None:
        sock_dir = self.state_dir / "run"
        shutil.rmtree(sock_dir, ignore_errors=True)
        sock_dir.mkdir()
        if self.own_uid:
            os.chown(sock_dir, self.host_uid, self.host_uid)
        self._channel = Channel(sock_dir)
        if self.own_uid:
            os.chown(self._channel.path, self.host_uid, self.host_uid)
        rlimits = self._host_rlimits()

        def set_rlimits() -> (
            None
        ):  # runs in the forked child: only the setrlimit syscalls, no imports or locks
            for limit, value in rlimits:
                resource.setrlimit(limit, (value, value))

        drop = {"user": self.host_uid, "group": self.host_uid, "extra_groups": []} if self.own_uid else {}
        self._proc = subprocess.Popen(
            self._command(self.python),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={"PATH": "/usr/bin:/bin", MARKER_ENV: self.id},
            preexec_fn=set_rlimits,
            **drop,
        )
        self._channel.accept(self.start_timeout, self._death_reason)

    def _stop(self) -> None:
        if self._channel is not None:
            self._channel.close()
        if self._proc is not None:
            # Closing the socket makes the executor (PID 1) exit, which ends every process inside. Kill
            # anyway in case it is wedged; the namespace dies with its init.
            try:
                self._proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                inner = self.executor_host_pid()
                if inner is not None:
                    os.kill(inner, signal.SIGKILL)
                self._proc.kill()
                self._proc.wait()
            if self._proc.stderr:
                self._proc.stderr.close()
            self._proc = None

    def executor_host_pid(self) -> int | None:
        """The host pid of the executor (the sandbox's PID 1): killing it ends the whole sandbox."""
        if self._proc is None:
            return None
        try:
            children = Path(f"/proc/{self._proc.pid}/task/{self._proc.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def reset(self) -> None:
        if self.reset_strategy == "snapshot":
            super().reset()
            return
        # overlay: throw the whole sandbox (its tmpfs layers) away and start a fresh one.
        self._stop()
        self._start()

    def checkpoint(self) -> None:
        if self.reset_strategy != "snapshot":
            raise SandboxError(
                "checkpoint() needs reset_strategy='snapshot' (overlay resets start from scratch)"
            )
        super().checkpoint()

    def _write_identity(self) -> None:
        etc = self.state_dir / "etc"
        etc.mkdir()
        (etc / "passwd").write_text(
            "root:x:0:0:root:/root:/bin/bash\n"
            f"sandbox:x:1000:1000::{HOME}:/bin/bash\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        )
        (etc / "group").write_text("root:x:0:\nsandbox:x:1000:\nnogroup:x:65534:\n")
        (etc / "hostname").write_text("sandbox\n")

    def _host_rlimits(self) -> list[tuple[int, int]]:
        """Limits on the bwrap process itself, so every process of the sandbox inherits them."""
        lim = self.limits
        rl = [
            (resource.RLIMIT_NOFILE, lim.open_files),
            (resource.RLIMIT_FSIZE, lim.disk_mb << 20),
            (resource.RLIMIT_CORE, 0),
        ]
        if self.own_uid:  # counted per host uid: only meaningful when this sandbox has a uid of its own
            rl.append((resource.RLIMIT_NPROC, lim.pids))
        return rl

    def _command_rlimits(self) -> dict[str, int]:
        """Per-command limits the executor sets after each spawn (it must not be bound by them itself)."""
        rl = {"RLIMIT_AS": self.limits.memory_mb << 20}
        if self.limits.cpu_seconds:
            rl["RLIMIT_CPU"] = self.limits.cpu_seconds
        return rl

    def _command(self, python: str) -> list[str]:
        import json

        size = str(self.limits.disk_mb << 20)
        # No --die-with-parent: its parent-death signal follows the *thread* that spawned bwrap, so a
        # sandbox started from a short-lived worker thread would be killed when that thread ends. The
        # executor exits when the host's connection drops instead, which ends the whole namespace.
        cmd = [
            "bwrap",
            "--unshare-all",
            "--uid",
            "1000",
            "--gid",
            "1000",
            "--hostname",
            "sandbox",
            "--as-pid-1",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--ro-bind",
            "/usr",
            "/usr",
        ]
        if self.limits.network:
            cmd.append("--share-net")
        for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            host = Path("/") / top
            if host.is_symlink():
                cmd += ["--symlink", os.readlink(host), f"/{top}"]
            elif host.is_dir():
                cmd += ["--ro-bind", str(host), f"/{top}"]
        for name in ETC_ALLOW:
            if (Path("/etc") / name).exists():
                cmd += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
        for name in ("passwd", "group", "hostname"):
            cmd += ["--ro-bind", str(self.state_dir / "etc" / name), f"/etc/{name}"]
        cmd += ["--proc", "/proc", "--dev", "/dev"]
        for d, perms in (("/work", "0755"), ("/tmp", "1777"), (HOME, "0755")):
            cmd += ["--perms", perms, "--size", size, "--tmpfs", d]
        cmd += [
            "--ro-bind",
            str(self.state_dir / "agent.py"),
            AGENT_PATH,
            "--bind",
            str(self.state_dir / "run"),
            AGENT_SOCKET_DIR,
            "--remount-ro",
            "/",
            "--chdir",
            "/work",
            "--clearenv",
            python,
            "-I",
            "-S",
            AGENT_PATH,
            json.dumps(agent_config(self._command_rlimits(), self.limits.memory_mb << 20)),
        ]
        return cmd

    def _death_reason(self) -> str | None:
        if self._proc is None:
            return "not started"
        code = self._proc.poll()
        if code is None:
            return None
        err = self._proc.stderr.read().decode(errors="replace").strip() if self._proc.stderr else ""
        return f"bwrap exited with status {code}" + (f": {err}" if err else "")

    def _destroy(self) -> None:
        self._stop()
        shutil.rmtree(self.state_dir, ignore_errors=True)
