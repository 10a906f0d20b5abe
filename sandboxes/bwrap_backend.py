"""Bubblewrap backend: a namespace sandbox for machines without a Docker engine.

Each sandbox is one `bwrap` process tree with its own user, PID, network, IPC, UTS and cgroup namespaces and
no nested user namespaces (`--disable-userns`): the host's /usr is bound read-only (plus a short allow-list
of /etc files), /work, /tmp, the home directory and /dev/shm are size- and inode-capped tmpfs mounts, /dev
holds only the usual device nodes and is read-only, the executor's socket directory is bound read-only, and
the root is re-mounted read-only. The executor (executor.py) is PID 1 inside (`--as-pid-1`).

Limits, where the host allows (root, a writable cgroup hierarchy, v1 or v2): each sandbox gets its own cgroup
(memory with swap off, pids, CPU quota; cgroup.py) and its tmpfs mounts are made on the host with
`nr_inodes` (mounts.py); each runs under its own random high host uid, so RLIMIT_NPROC counts its processes
alone. Without them it falls back, and says so once in the log: memory is RLIMIT_AS per process plus the
executor's watchdog on the sandbox's resident memory while a command runs, tmpfs mounts have a size but no
inode cap, and sandboxes share the caller's uid. `network=True` gives the sandbox user-mode networking
(network.py), never the host's network namespace. docs/sandboxes.md has the whole table.
"""

from __future__ import annotations

import functools
import logging
import os
import resource
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from m2rl.sandboxes import cgroup, mounts
from m2rl.sandboxes.channel import Channel
from m2rl.sandboxes.errors import SandboxError
from m2rl.sandboxes.limits import Limits
from m2rl.sandboxes.network import UserNet, slirp_available
from m2rl.sandboxes.sandbox import HOME, SHM, Sandbox, executor_binds, executor_command, stage_executor

log = logging.getLogger(__name__)

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
# Writable tmpfs mounts: sandbox path -> (name of the host mount in the state dir, mode).
WRITABLE = {"/work": ("work", 0o755), "/tmp": ("tmp", 0o1777), HOME: ("home", 0o755), SHM: ("shm", 0o1777)}
_warned: set[str] = set()  # degraded-enforcement messages already logged by this process


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


@functools.cache
def bwrap_disables_userns() -> bool:
    """bubblewrap >= 0.8 can forbid nested user namespaces (`--disable-userns`)."""
    usage = subprocess.run(["bwrap", "--help"], check=False, capture_output=True, text=True, timeout=30)
    return "--disable-userns" in usage.stdout + usage.stderr


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


class BwrapSandbox(Sandbox):
    backend = "bwrap"

    def __init__(
        self,
        limits: Limits | None = None,
        reset_strategy: str = "snapshot",
        start_timeout: float = 30.0,
        python: str = "/usr/bin/python3",
    ) -> None:
        if reset_strategy not in RESET_STRATEGIES:
            raise SandboxError(f"unknown reset_strategy {reset_strategy!r}; choose one of {RESET_STRATEGIES}")
        if not Path(python).exists():
            raise SandboxError(f"bwrap sandbox needs the host's {python} (bound read-only into the sandbox)")
        if limits is not None and limits.network and (reason := slirp_available()) is not None:
            raise SandboxError(
                "network=True needs user-mode networking on the bwrap backend (it never shares the host's "
                f"network namespace): {reason}; or use the docker backend"
            )
        super().__init__(limits)
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
        self.executor_dir = stage_executor(self.state_dir)
        self._write_identity()
        self._proc: subprocess.Popen | None = None
        self._net: UserNet | None = None
        self.cgroup: cgroup.SandboxCgroup | None = None
        self.host_mounts = mounts.mounts_available() is None
        try:
            self.cgroup = self._make_cgroup()
            self.enforcement = self._enforcement()
            self._start()
        except BaseException:
            self.close()
            raise

    def _make_cgroup(self) -> cgroup.SandboxCgroup | None:
        layout = cgroup.detect_layout()
        if isinstance(layout, str):
            reason = layout
        else:
            try:
                return cgroup.SandboxCgroup.create(layout, self.id, self.limits)
            except OSError as exc:
                reason = f"cannot create a cgroup in {sorted(set(map(str, layout.roots.values())))}: {exc}"
        _warn_once(
            f"bwrap sandboxes run without a cgroup ({reason}): memory is limited by RLIMIT_AS per process "
            "and a watchdog on resident memory during commands only; CPU share is not limited"
        )
        return None

    def _enforcement(self) -> dict[str, str]:
        """How each limit is enforced for this sandbox (docs/sandboxes.md explains each mechanism)."""
        group = self.cgroup
        version = f"cgroup v{group.layout.version}" if group else ""
        if not self.host_mounts:
            _warn_once(
                f"bwrap sandboxes have no inode cap on their tmpfs mounts ({mounts.mounts_available()})"
            )
        if not bwrap_disables_userns():
            _warn_once("this bubblewrap cannot forbid nested user namespaces (--disable-userns needs 0.8)")
        if group:
            memory, pids = f"{version} memory limit, swap off", f"{version} pids.max"
        else:
            memory = "RLIMIT_AS per process + resident-memory watchdog during commands"
            pids = "RLIMIT_NPROC, own host uid" if self.own_uid else "RLIMIT_NPROC of the caller's uid"
        return {
            "memory": memory,
            "pids": pids,
            "cpu": f"{version} CFS quota" if group and "cpu" in group.paths else "not limited",
            "inodes": "tmpfs nr_inodes" if self.host_mounts else "not limited",
            "network": "own namespace + slirp4netns" if self.limits.network else "own empty namespace",
            "user namespaces": "--disable-userns" if bwrap_disables_userns() else "allowed",
        }

    def _start(self) -> None:
        sock_dir = self.state_dir / "run"
        shutil.rmtree(sock_dir, ignore_errors=True)
        sock_dir.mkdir()
        self._channel = Channel(sock_dir)
        if self.own_uid:
            os.chown(self._channel.path, self.host_uid, self.host_uid)
        if self.host_mounts:
            self._mount_writable()
        rlimits = self._host_rlimits()
        join_fds = self.cgroup.open_for_join() if self.cgroup else []
        join = cgroup.join

        def in_child() -> None:  # runs in the forked child: only raw syscalls, no imports or locks
            join(join_fds)  # first, so nothing bwrap forks can be outside the cgroup
            for limit, value in rlimits:
                resource.setrlimit(limit, (value, value))

        drop = {"user": self.host_uid, "group": self.host_uid, "extra_groups": []} if self.own_uid else {}
        try:
            self._proc = subprocess.Popen(
                self._command(self.python),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env={"PATH": "/usr/bin:/bin", MARKER_ENV: self.id},
                # The join descriptors are still open in the child (close-on-exec shuts them at exec).
                preexec_fn=in_child,  # noqa: PLW1509 - raw syscalls only, safe with threads
                **drop,
            )
        finally:
            for fd in join_fds:
                os.close(fd)
        self._channel.accept(self.start_timeout, self._death_reason)
        if self.limits.network:
            executor = self.executor_host_pid()
            if executor is None:
                raise SandboxError(f"bwrap sandbox died while starting: {self._death_reason()}")
            # slirp4netns joins the sandbox's cgroup: its memory counts against the sandbox, not the host.
            join_fds = self.cgroup.open_for_join() if self.cgroup else []
            try:
                self._net = UserNet(executor, self.state_dir / "slirp4netns.log", join_fds)
            finally:
                for fd in join_fds:
                    os.close(fd)

    def _mount_writable(self) -> None:
        """tmpfs mounts with both a size and an inode cap, owned by the sandbox's uid (1000 inside)."""
        lim = self.limits
        # The mount points themselves live on a tiny tmpfs: creating and deleting directories on the
        # host's disk cost more than the mounts (~10 ms a sandbox here).
        fs = self.state_dir / "fs"
        mounts.mount_tmpfs(fs, 64 << 10, 16, 0, 0o755)
        for path, (name, mode) in WRITABLE.items():
            size_mb = lim.shm_mb if path == SHM else lim.disk_mb
            mounts.mount_tmpfs(fs / name, size_mb << 20, lim.inode_limit, self.host_uid, mode)

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
        if self._net is not None:
            self._net.close()
            self._net = None
        if self.cgroup is not None:
            self.cgroup.kill()  # a process that escaped bwrap's tree (none should) still dies here
        if self.host_mounts:
            mounts.unmount_all_under(self.state_dir / "fs")

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
        lim = self.limits
        # No --die-with-parent: its parent-death signal follows the *thread* that spawned bwrap, so a
        # sandbox started from a short-lived worker thread would be killed when that thread ends. The
        # executor exits when the host's connection drops instead, which ends the whole namespace.
        cmd = [
            "bwrap",
            "--unshare-all",  # network included: network=True gets slirp4netns, never the host's
            "--unshare-user",
            *(["--disable-userns"] if bwrap_disables_userns() else []),
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
        # --dev: a tmpfs with null, zero, full, random, urandom, tty, a private devpts and /dev/shm.
        cmd += ["--proc", "/proc", "--dev", "/dev"]
        for path, (name, mode) in WRITABLE.items():
            if self.host_mounts:
                cmd += ["--bind", str(self.state_dir / "fs" / name), path]
            else:  # bwrap's tmpfs: a size cap, no inode cap
                size = (lim.shm_mb if path == SHM else lim.disk_mb) << 20
                cmd += ["--perms", f"{mode:04o}", "--size", str(size), "--tmpfs", path]
        for host_dir, sandbox_dir in executor_binds(self.executor_dir, self.state_dir / "run"):
            cmd += ["--ro-bind", host_dir, sandbox_dir]
        cmd += [
            "--remount-ro",
            "/dev",  # only this mount: /dev/shm and /dev/pts below it stay as they are
            "--remount-ro",
            "/",
            "--chdir",
            "/work",
            "--clearenv",
            *executor_command(python, self._command_rlimits(), self._memory_watchdog(), self.limits),
        ]
        return cmd

    def _memory_watchdog(self) -> int | None:
        # With a cgroup the kernel counts every page exactly; the watchdog only stands in for it.
        return None if self.cgroup is not None else self.limits.memory_mb << 20

    def _death_reason(self) -> str | None:
        if self._proc is None:
            return "not started"
        code = self._proc.poll()
        if code is None:
            return None
        err = self._proc.stderr.read().decode(errors="replace").strip() if self._proc.stderr else ""
        oom = " (out of memory)" if self.cgroup is not None and self.cgroup.oom_kills() else ""
        return f"bwrap exited with status {code}{oom}" + (f": {err}" if err else "")

    def _destroy(self) -> None:
        try:
            self._stop()
        finally:
            if self.cgroup is not None and not self.cgroup.remove():
                log.warning("cgroup of bwrap sandbox %s still busy; `m2rl sandboxes gc` removes it", self.id)
            if self.host_mounts:
                mounts.unmount_all_under(self.state_dir)  # before rmtree: never delete through a mount
            shutil.rmtree(self.state_dir, ignore_errors=True)
