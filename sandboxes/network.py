"""User-mode networking for bwrap sandboxes with `network=True`: slirp4netns in front of their own netns.

Sharing the host's network namespace would hand the sandbox every service on the host's 127.0.0.1 and every
abstract unix socket. Instead the sandbox keeps its own namespace and slirp4netns gives it a tap device
with a default route through a user-mode TCP/IP stack running on the host (10.0.2.100/24, gateway 10.0.2.2,
DNS 10.0.2.3). `--disable-host-loopback` stops 10.0.2.2 from reaching the host's loopback, and slirp4netns
itself runs in its own mount namespace (`--enable-sandbox`) under a seccomp filter (`--enable-seccomp`),
as it parses the sandbox's packets. It exits when its exit pipe closes, i.e. with the sandbox's owner.

Finding the namespace: bwrap's `--disable-userns` puts the sandbox's processes in a user namespace nested
inside the one that owns its network namespace. As root, slirp4netns joins the network namespace directly
(`--userns-path` names our own user namespace, which it cannot re-enter and skips); unprivileged, it joins
the owning (parent) user namespace, which needs a world-accessible /dev/net/tun.
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

from m2rl.sandboxes.cgroup import join
from m2rl.sandboxes.errors import SandboxError

SLIRP = "slirp4netns"
NS_GET_PARENT = 0xB702  # ioctl on a namespace fd: the parent user namespace
READY_TIMEOUT_S = 10.0


def slirp_available() -> str | None:
    """None when slirp4netns can serve a sandbox here, else why not."""
    if shutil.which(SLIRP) is None:
        return "slirp4netns is not installed (`apt-get install -y slirp4netns`)"
    if os.geteuid() != 0 and not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        return "/dev/net/tun is not accessible to this user (slirp4netns needs it)"
    return None


class UserNet:
    """One slirp4netns process serving the network namespace of `pid` (a process of the sandbox)."""

    def __init__(self, pid: int, log: Path, cgroup_fds: list[int] | None = None) -> None:
        """`cgroup_fds`: cgroup.procs descriptors (cgroup.SandboxCgroup.open_for_join) to start it in."""
        reason = slirp_available()
        if reason is not None:
            raise SandboxError(f"network=True on the bwrap backend needs user-mode networking: {reason}")
        ready_r, ready_w = os.pipe()
        exit_r, self._exit_w = os.pipe()
        os.set_inheritable(self._exit_w, False)
        netns = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        fds = [ready_w, exit_r, netns]
        if os.geteuid() == 0:
            userns_path = "/proc/self/ns/user"
        else:
            own = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
            try:
                parent = fcntl.ioctl(own, NS_GET_PARENT)
            finally:
                os.close(own)
            fds.append(parent)
            userns_path = f"/proc/self/fd/{parent}"
        cmd = [
            SLIRP,
            "--configure",
            "--mtu=65520",
            "--disable-host-loopback",
            "--enable-sandbox",
            "--enable-seccomp",
            f"--ready-fd={ready_w}",
            f"--exit-fd={exit_r}",
            f"--userns-path={userns_path}",
            "--netns-type=path",
            f"/proc/self/fd/{netns}",
            "tap0",
        ]
        self.log = log
        self.proc: subprocess.Popen | None = None
        try:
            with open(log, "wb") as err:
                self.proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    pass_fds=fds,
                    env={"PATH": "/usr/bin:/bin"},
                    preexec_fn=(lambda: join(cgroup_fds)) if cgroup_fds else None,  # noqa: PLW1509
                )
        finally:
            for fd in fds:
                os.close(fd)
            if self.proc is None:
                os.close(ready_r)
                os.close(self._exit_w)
        try:
            self._wait_ready(ready_r)
        except BaseException:
            self.close()
            raise
        finally:
            os.close(ready_r)

    def _wait_ready(self, ready_r: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if select.select([ready_r], [], [], 0.05)[0]:
                if os.read(ready_r, 1) == b"1":
                    return
                break  # EOF: slirp4netns exited before the network was up
        detail = self.log.read_text(errors="replace").strip().splitlines()[-3:] if self.log.exists() else []
        raise SandboxError(f"slirp4netns did not bring the sandbox's network up: {' / '.join(detail)}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def close(self) -> None:
        if self._exit_w >= 0:
            os.close(self._exit_w)  # slirp4netns exits on EOF of its exit pipe
            self._exit_w = -1
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
