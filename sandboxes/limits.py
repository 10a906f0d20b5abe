"""Resource limits of one sandbox, shared by the Docker and bubblewrap backends.

`docs/sandboxes.md` has the table of what each backend enforces for each field, by which kernel
mechanism, and what happens when that mechanism is unavailable.
"""

from __future__ import annotations

from dataclasses import dataclass

# One inode per 8 KiB of disk: twice ext4's default density (one per 16 KiB), since source trees are many
# small files. Each tmpfs inode costs the host about 1 KB of kernel memory (inode + dentry).
INODES_PER_MB = 128


@dataclass(frozen=True)
class Limits:
    cpus: float = 1.0
    """CPU share in cores. Docker: CFS quota. bwrap: CFS quota of its cgroup (none without a cgroup)."""

    memory_mb: int = 1024
    """Memory of the whole sandbox: processes, tmpfs contents, memfd and shared memory, swap off.
    Docker: its cgroup. bwrap: its own cgroup when the host allows (root); otherwise RLIMIT_AS per
    process plus the executor's resident-memory watchdog while a command runs."""

    pids: int = 256
    """Processes and threads. Docker: cgroup pids. bwrap: its cgroup's pids.max, and RLIMIT_NPROC under
    the sandbox's own host uid (as root)."""

    disk_mb: int = 512
    """Size of EACH writable tmpfs (/work, /tmp, /home/sandbox; /dev/shm gets min(disk_mb, 64)); also
    RLIMIT_FSIZE, the largest file any process may write."""

    inodes: int | None = None
    """Files and directories on EACH writable tmpfs (tmpfs `nr_inodes`). None: in proportion to the disk,
    disk_mb * 128 (`inode_limit` is the value in force)."""

    open_files: int = 1024
    """RLIMIT_NOFILE of every process."""

    cpu_seconds: int = 0
    """RLIMIT_CPU per process; 0 = unlimited (the per-exec timeout still applies)."""

    max_output_bytes: int = 128 * 1024
    """Per stream kept in ExecResult; the rest is cut with a visible marker."""

    max_drain_bytes: int = 64 * 1024 * 1024
    """Past this many bytes of output one exec is killed: endless output must not burn the host's CPU."""

    network: bool = False
    """Opt-in per task. Docker: the default bridge. bwrap: its own network namespace behind slirp4netns
    (user-mode networking, no route to the host's loopback); refused where slirp4netns cannot run."""

    def __post_init__(self) -> None:
        for name in ("memory_mb", "pids", "disk_mb", "open_files", "max_output_bytes", "max_drain_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")
        if self.inodes is not None and (
            not isinstance(self.inodes, int) or isinstance(self.inodes, bool) or self.inodes <= 0
        ):
            raise ValueError(f"Limits.inodes must be a positive integer or None, got {self.inodes!r}")
        if not isinstance(self.cpus, (int, float)) or isinstance(self.cpus, bool) or self.cpus <= 0:
            raise ValueError(f"Limits.cpus must be a positive number, got {self.cpus!r}")
        if not isinstance(self.cpu_seconds, int) or self.cpu_seconds < 0:
            raise ValueError(f"Limits.cpu_seconds must be a non-negative integer, got {self.cpu_seconds!r}")
        if self.max_drain_bytes < self.max_output_bytes:
            raise ValueError("Limits.max_drain_bytes must be >= max_output_bytes")

    @property
    def inode_limit(self) -> int:
        """Inodes of each writable tmpfs: `inodes`, or in proportion to `disk_mb` when that is None."""
        return self.inodes if self.inodes is not None else self.disk_mb * INODES_PER_MB

    @property
    def shm_mb(self) -> int:
        """Size of /dev/shm: Docker's default 64 MB, never more than the disk limit."""
        return min(self.disk_mb, 64)
