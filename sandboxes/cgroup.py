"""A cgroup per bubblewrap sandbox: memory (swap off), pids and CPU, on cgroup v1 or v2.

The kernel then counts everything the sandbox holds (processes kept between steps, tmpfs pages, memfd and
shared memory, kernel memory for its inodes) and OOM-kills inside the sandbox only. Sandbox cgroups live in
one place per hierarchy, `<mount>/m2rl/<sandbox id>`, so `m2rl sandboxes gc` finds those a killed owner
left behind; the id starts with the owner's pid.

v2 puts the parent at the hierarchy's root because of its "no internal processes" rule: a cgroup holding
processes (ours) cannot hand controllers to children. Needs write access to cgroupfs (root, in practice);
`detect_layout()` says why not otherwise, and the backend falls back to rlimits.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from m2rl.sandboxes.limits import Limits

PARENT = "m2rl"
REQUIRED = ("memory", "pids")
OPTIONAL = ("cpu",)
CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class CgroupLayout:
    version: int  # 1 or 2
    roots: dict[str, Path]  # controller -> mount point of its hierarchy (v2: the same one for all)


def parse_layout(mountinfo: str, v2_controllers: Callable[[Path], str]) -> CgroupLayout | str:
    """The hierarchies to use from /proc/self/mountinfo text, or the reason there are none.

    v2 wins when its root offers memory and pids (`v2_controllers` reads a mount's cgroup.controllers);
    otherwise v1, which needs a memory and a pids hierarchy (hybrid hosts mount an empty v2 beside v1)."""
    v1: dict[str, Path] = {}
    v2: list[Path] = []
    for line in mountinfo.splitlines():
        if " - " not in line:
            continue
        left, right = line.split(" - ", 1)
        fields = right.split()
        if len(fields) < 3:
            continue
        mount_point = Path(left.split()[4])
        if fields[0] == "cgroup2":
            v2.append(mount_point)
        elif fields[0] == "cgroup":
            for option in fields[2].split(","):
                if option in REQUIRED + OPTIONAL:
                    v1.setdefault(option, mount_point)
    for mount_point in v2:
        available = v2_controllers(mount_point).split()
        if all(c in available for c in REQUIRED):
            wanted = [c for c in REQUIRED + OPTIONAL if c in available]
            return CgroupLayout(version=2, roots={c: mount_point for c in wanted})
    if all(c in v1 for c in REQUIRED):
        return CgroupLayout(version=1, roots=v1)
    if v2 or v1:
        return "no cgroup hierarchy offers both the memory and the pids controller"
    return "no cgroup file system is mounted"


def _read_controllers(mount_point: Path) -> str:
    try:
        return (mount_point / "cgroup.controllers").read_text()
    except OSError:
        return ""


def detect_layout() -> CgroupLayout | str:
    """This host's cgroup hierarchies, or why a sandbox cannot have a cgroup here."""
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    except OSError as exc:
        return f"cannot read /proc/self/mountinfo: {exc}"
    layout = parse_layout(mountinfo, _read_controllers)
    if isinstance(layout, str):
        return layout
    roots = {}
    for controller, root in layout.roots.items():
        if os.access(root, os.W_OK):
            roots[controller] = root
        elif controller in REQUIRED:
            return f"{root} is not writable (needs root)"
    return CgroupLayout(version=layout.version, roots=roots)  # without an optional one we cannot use


def limit_writes(version: int, limits: Limits) -> list[tuple[str, str, str]]:
    """(controller, file, value) in the order they must be written."""
    memory = str(limits.memory_mb << 20)
    quota = str(max(1000, int(limits.cpus * CPU_PERIOD_US)))  # the kernel's minimum quota is 1 ms
    if version == 1:
        return [
            ("memory", "memory.limit_in_bytes", memory),
            ("memory", "memory.memsw.limit_in_bytes", memory),  # memory + swap: no swap at all
            ("pids", "pids.max", str(limits.pids)),
            ("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)),
            ("cpu", "cpu.cfs_quota_us", quota),
        ]
    return [
        ("memory", "memory.max", memory),
        ("memory", "memory.swap.max", "0"),
        ("pids", "pids.max", str(limits.pids)),
        ("cpu", "cpu.max", f"{quota} {CPU_PERIOD_US}"),
    ]


# Files that exist only on some kernels (no swap accounting): skipped when absent.
OPTIONAL_FILES = ("memory.memsw.limit_in_bytes", "memory.swap.max")


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)  # never O_CREAT: a missing file is an error, not a new file
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


class SandboxCgroup:
    """The cgroup(s) of one sandbox: one directory per v1 hierarchy, or one v2 directory."""

    def __init__(self, layout: CgroupLayout, name: str) -> None:
        self.layout = layout
        self.name = name
        self.paths = {c: root / PARENT / name for c, root in layout.roots.items()}

    @classmethod
    def create(cls, layout: CgroupLayout, name: str, limits: Limits) -> SandboxCgroup:
        group = cls(layout, name)
        try:
            group._create(limits)
        except BaseException:
            group.remove()
            raise
        return group

    def _create(self, limits: Limits) -> None:
        if self.layout.version == 2:
            root = next(iter(self.layout.roots.values()))
            (root / PARENT).mkdir(exist_ok=True)
            for controller in list(self.paths):
                try:  # at the root (usually on already), then for our parent's children
                    for directory in (root, root / PARENT):
                        _write(directory / "cgroup.subtree_control", f"+{controller}")
                except OSError:
                    if controller in REQUIRED:
                        raise
                    del self.paths[controller]
        for directory in set(self.paths.values()):
            directory.parent.mkdir(exist_ok=True)
            directory.mkdir()
        for controller, file, value in limit_writes(self.layout.version, limits):
            if controller not in self.paths:
                continue  # cpu is optional
            try:
                _write(self.paths[controller] / file, value)
            except FileNotFoundError:
                if file not in OPTIONAL_FILES:
                    raise

    def procs_files(self) -> list[Path]:
        return [d / "cgroup.procs" for d in sorted(set(self.paths.values()))]

    def open_for_join(self) -> list[int]:
        """Descriptors a child writes "0" to before it execs (see `join`). Opened here, by a privileged
        parent: the kernel checks the opener's credentials, so the child may already have dropped root."""
        return [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in self.procs_files()]

    def pids(self) -> set[int]:
        found: set[int] = set()
        for procs in self.procs_files():
            try:
                found.update(int(x) for x in procs.read_text().split())
            except (OSError, ValueError):
                pass
        return found

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (v2: atomically, with cgroup.kill where it exists)."""
        if self.layout.version == 2:
            kill_file = next(iter(self.paths.values())) / "cgroup.kill"
            try:
                _write(kill_file, "1")
                return
            except OSError:
                pass  # kernels before 5.14: kill one by one
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self, timeout: float = 5.0) -> bool:
        """Kill what is left and remove the directories; False if one is still busy at the deadline."""
        deadline = time.monotonic() + timeout
        pending = sorted(set(self.paths.values()))
        while True:
            busy = []
            for directory in pending:
                try:
                    directory.rmdir()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        raise
                    busy.append(directory)
            if not busy or time.monotonic() > deadline:
                return not busy
            self.kill()  # dying processes leave the cgroup only once the kernel has reaped them
            pending = busy
            time.sleep(0.01)

    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this cgroup (0 where the kernel does not say)."""
        memory = self.paths.get("memory")
        if memory is None:
            return 0
        name = "memory.oom_control" if self.layout.version == 1 else "memory.events"
        try:
            for line in (memory / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0


def join(fds: list[int]) -> None:
    """In a forked child before exec: move this process into the cgroup. Only raw syscalls: no locks."""
    for fd in fds:
        os.write(fd, b"0")


def leaked(layout: CgroupLayout, is_live: Callable[[str], bool]) -> list[SandboxCgroup]:
    """Sandbox cgroups whose name `is_live` rejects (their owner process is gone)."""
    names: set[str] = set()
    for root in set(layout.roots.values()):
        parent = root / PARENT
        if parent.is_dir():
            names.update(d.name for d in parent.iterdir() if d.is_dir())
    return [SandboxCgroup(layout, name) for name in sorted(names) if not is_live(name)]
