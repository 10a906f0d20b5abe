"""Resource limits of one sandbox, shared by the Docker and bubblewrap backends."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    cpus: float = 1.0  # Docker: CFS quota in cores. bwrap: not enforced (no cgroup), see cpu_seconds.
    memory_mb: int = 1024  # Docker: cgroup memory (swap off). bwrap: RLIMIT_AS per process + RSS watchdog.
    pids: int = 256  # Docker: cgroup pids. bwrap: RLIMIT_NPROC in the sandbox's own user namespace.
    disk_mb: int = 512  # size of EACH writable tmpfs (/work, /tmp, /home/sandbox); also RLIMIT_FSIZE.
    open_files: int = 1024  # RLIMIT_NOFILE
    cpu_seconds: int = 0  # RLIMIT_CPU per process, 0 = unlimited (the per-exec timeout still applies)
    max_output_bytes: int = 128 * 1024  # per stream kept in ExecResult; the rest is cut with a marker
    # Past this many bytes of output one exec is killed: endless output must not burn the host's CPU.
    max_drain_bytes: int = 64 * 1024 * 1024
    network: bool = False  # opt-in per task; Docker: the default bridge, bwrap: the host network

    def __post_init__(self) -> None:
        for name in ("memory_mb", "pids", "disk_mb", "open_files", "max_output_bytes", "max_drain_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.cpus, (int, float)) or self.cpus <= 0:
            raise ValueError(f"Limits.cpus must be a positive number, got {self.cpus!r}")
        if not isinstance(self.cpu_seconds, int) or self.cpu_seconds < 0:
            raise ValueError(f"Limits.cpu_seconds must be a non-negative integer, got {self.cpu_seconds!r}")
        if self.max_drain_bytes < self.max_output_bytes:
            raise ValueError("Limits.max_drain_bytes must be >= max_output_bytes")
