"""Size- and inode-capped tmpfs mounts made on the host for the bwrap backend.

bwrap's own `--tmpfs` takes a size but no inode count, and a tmpfs without `nr_inodes` lets 200,000 empty
files through a 64 MB limit (each costs the host kernel memory). As root we mount each writable directory
of a sandbox ourselves, inside its state directory, and bind it in. They are ordinary host mounts: the
backend unmounts them at close, and `m2rl sandboxes gc` unmounts those a killed owner left.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

MS_NOSUID = 0x2
MS_NODEV = 0x4
MNT_DETACH = 0x2
_libc = ctypes.CDLL(None, use_errno=True)


def mounts_available() -> str | None:
    """None when this process can make host mounts, else why not."""
    return None if os.geteuid() == 0 else "mounting an inode-capped tmpfs needs root"


def mount_tmpfs(target: Path, size_bytes: int, inodes: int, uid: int, mode: int) -> None:
    target.mkdir(parents=True, exist_ok=True)
    options = f"size={size_bytes},nr_inodes={inodes},mode={mode:o},uid={uid},gid={uid}"
    if _libc.mount(b"tmpfs", str(target).encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs on {target} ({options}): {os.strerror(err)}")


def unmount(target: Path) -> None:
    """Detach the mount at `target` (lazily, so a process still inside cannot block it); no-op if none."""
    if _libc.umount2(str(target).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not a mount point (any more), or gone
            raise OSError(err, f"umount {target}: {os.strerror(err)}")


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as octal escapes (\040 ...).
    return field.encode().decode("unicode_escape") if "\\" in field else field


def mounts_under(directory: Path) -> list[Path]:
    """Mount points at or below `directory`, deepest first (the order to unmount them in)."""
    prefix = str(directory).rstrip("/")
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape(line.split()[4])
        if point == prefix or point.startswith(prefix + "/"):
            found.append(Path(point))
    return sorted(set(found), key=lambda p: len(p.parts), reverse=True)


def unmount_all_under(directory: Path) -> list[Path]:
    """Unmount everything at or below `directory`; returns what was unmounted."""
    done: list[Path] = []
    for _ in range(16):  # a point mounted twice needs one unmount per layer
        points = mounts_under(directory)
        if not points:
            break
        for point in points:
            unmount(point)
        done += points
    return done
