"""Find and remove leaked sandboxes: labelled containers, checkpoint images and stale state directories."""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from m2rl.sandboxes import bwrap_backend, cgroup, docker_backend, mounts
from m2rl.sandboxes.errors import EngineUnavailable


@dataclass
class GcReport:
    containers: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    state_dirs: list[str] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)  # bwrap sandboxes' cgroups (one per hierarchy)
    engine_error: str | None = None
    # why things were left in place -> how many, e.g. "sandbox state dir(s) owned by live process 1234"
    skipped: Counter[str] = field(default_factory=Counter)

    def skipped_lines(self) -> list[str]:
        return [f"skipped {count} {reason}" for reason, count in sorted(self.skipped.items())]

    def summary(self) -> str:
        parts = [
            f"{len(self.containers)} container(s)",
            f"{len(self.images)} checkpoint image(s)",
            f"{len(self.state_dirs)} state dir(s)",
            f"{len(self.cgroups)} cgroup(s)",
        ]
        text = "removed " + ", ".join(parts)
        return text + (f" (Docker skipped: {self.engine_error})" if self.engine_error else "")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_alive(state_dir_name: str) -> bool:
    """State directories are named `<owner pid>-<random>` by the backends."""
    head = state_dir_name.split("-", 1)[0]
    return head.isdigit() and pid_alive(int(head))


def _owner(state_dir_name: str) -> str:
    head = state_dir_name.split("-", 1)[0]
    return f"live process {head}" if head.isdigit() else "a running sandbox"


def labelled_containers(owner_pid: int | None = None) -> list[dict]:
    """Containers carrying the sandbox label (optionally only those a given process started)."""
    label = docker_backend.LABEL
    filters = {
        "label": [f"{label}=1"] + ([f"{docker_backend.OWNER_PID_LABEL}={owner_pid}"] if owner_pid else [])
    }
    return docker_backend.docker_client().api.containers(all=True, filters=filters)


def is_orphan(labels: dict[str, str]) -> bool:
    """A container whose owning process (on this host) is gone; other hosts' containers never are."""
    if labels.get(docker_backend.OWNER_HOST_LABEL) != socket.gethostname():
        return False
    try:
        return not pid_alive(int(labels.get(docker_backend.OWNER_PID_LABEL, "0")))
    except ValueError:
        return True


def running_bwrap_ids() -> set[str]:
    ids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                env = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            for item in env.split(b"\0"):
                if item.startswith(bwrap_backend.MARKER_ENV.encode() + b"="):
                    ids.add(item.split(b"=", 1)[1].decode())
    return ids


def collect(all_containers: bool = False, dry_run: bool = False, min_age_s: float = 60.0) -> GcReport:
    """Remove leaked sandboxes: by default those whose owner process died; `all_containers`: every one."""
    report = GcReport()
    live_docker_ids: set[str] = set()
    try:
        client = docker_backend.docker_client()
        for c in labelled_containers():
            labels = c.get("Labels") or {}
            if all_containers or is_orphan(labels) or c.get("State") in ("exited", "dead"):
                report.containers.append(c["Id"][:12])
                if not dry_run:
                    client.api.remove_container(c["Id"], force=True)
            else:
                live_docker_ids.update(m.get("Source", "").split("/")[-2] for m in c.get("Mounts", []))
                host = labels.get(docker_backend.OWNER_HOST_LABEL)
                if host != socket.gethostname():
                    report.skipped[f"sandbox container(s) of another host ({host}); run gc there"] += 1
                else:
                    owner = labels.get(docker_backend.OWNER_PID_LABEL, "?")
                    report.skipped[f"sandbox container(s) owned by live process {owner}"] += 1
        used_images = {c.get("ImageID") for c in client.api.containers(all=True)}
        for img in client.api.images(name="m2rl-checkpoint"):
            # Tagged m2rl-checkpoint:<owner pid>-<random>: a live owner may be between commit and reset.
            owners = [tag.split(":", 1)[1] for tag in img.get("RepoTags") or [] if ":" in tag]
            if img["Id"] not in used_images and (all_containers or not any(map(owner_alive, owners))):
                report.images.append(img["Id"][7:19])
                if not dry_run:
                    client.api.remove_image(img["Id"], force=True)
            elif img["Id"] in used_images:
                report.skipped["checkpoint image(s) in use by a container"] += 1
            else:
                report.skipped["checkpoint image(s) of a live process (it may be resetting a sandbox)"] += 1
    except EngineUnavailable as exc:
        report.engine_error = str(exc).split(";")[0]
    running_bwrap = running_bwrap_ids()
    for root, live in (
        (docker_backend.STATE_ROOT, live_docker_ids),
        (bwrap_backend.STATE_ROOT, running_bwrap),
    ):
        if not root.is_dir() or (root == docker_backend.STATE_ROOT and report.engine_error):
            continue
        for d in root.iterdir():
            if d.name in live or (not all_containers and owner_alive(d.name)):
                report.skipped[f"sandbox state dir(s) owned by {_owner(d.name)}"] += 1
                continue
            # A sandbox being started has its directory before its container/process: leave young ones.
            if time.time() - d.stat().st_mtime <= min_age_s:
                report.skipped[f"sandbox state dir(s) younger than {min_age_s:.0f} s (a sandbox may be starting)"] += 1
                continue
            report.state_dirs.append(str(d))
            if not dry_run:
                if os.geteuid() == 0:  # a bwrap sandbox's inode-capped tmpfs mounts (mounts.py)
                    mounts.unmount_all_under(d)
                shutil.rmtree(d, ignore_errors=True)
    collect_cgroups(report, running_bwrap, all_containers, dry_run, min_age_s)
    return report


def collect_cgroups(
    report: GcReport, running: set[str], all_containers: bool, dry_run: bool, min_age_s: float
) -> None:
    """bwrap sandboxes' cgroups (cgroup.py) whose owner is gone: kill what is left in them, remove them."""
    layout = cgroup.detect_layout()
    if isinstance(layout, str):
        return

    def keep(name: str) -> bool:
        if name in running or (not all_containers and owner_alive(name)):
            return True
        ages = [
            time.time() - p.stat().st_mtime
            for p in cgroup.SandboxCgroup(layout, name).paths.values()
            if p.exists()
        ]
        return any(age <= min_age_s for age in ages)  # a sandbox being started has its cgroup first

    for group in cgroup.leaked(layout, keep):
        report.cgroups += [str(p) for p in sorted(set(group.paths.values())) if p.exists()]
        if not dry_run:
            group.remove()
