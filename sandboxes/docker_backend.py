"""Docker backend: one container per sandbox on the local engine, driven through the docker SDK.

The container runs the executor (executor.py) as PID 1 under the non-root uid 1000 with every capability
dropped, no-new-privileges, a read-only root file system, size- and inode-limited tmpfs mounts for /work,
/tmp, the home directory and /dev/shm (the disk limit: overlay2 here has no storage quota), the executor's
socket directory bound read-only, cgroup limits on CPU, memory (swap off) and pids, an open-files ulimit,
and no network unless the task opts in (then the default bridge, which has no route to the host's
loopback). Every container carries the LABEL so `m2rl sandboxes gc` finds leaked ones; the executor exits
when the host's connection drops, and the container is auto-removed, so even a SIGKILLed host process
leaves nothing running. docs/sandboxes.md has the table of what is enforced and how.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from m2rl.sandboxes.channel import Channel
from m2rl.sandboxes.errors import EngineUnavailable, SandboxError
from m2rl.sandboxes.images import default_image
from m2rl.sandboxes.limits import Limits
from m2rl.sandboxes.sandbox import (
    HOME,
    SHM,
    Sandbox,
    check_extra_roots,
    executor_binds,
    executor_command,
    stage_executor,
)

logger = logging.getLogger(__name__)

LABEL = "m2rl.sandbox"
OWNER_PID_LABEL = "m2rl.owner_pid"
OWNER_HOST_LABEL = "m2rl.owner_host"
STATE_ROOT = Path(tempfile.gettempdir()) / "m2rl-docker"
# snapshot: the executor restores the tmpfs mounts from an in-memory tar (kept: fastest, see the benchmark);
# overlay: a new container from the image, discarding the old one's overlay2 writable layer;
# commit: `docker commit` at checkpoint, a new container from that image at reset.
RESET_STRATEGIES = ("snapshot", "overlay", "commit")
START_HINT = (
    "start it with `sudo dockerd >/var/log/dockerd.log 2>&1 &` (no systemd) or "
    "`sudo systemctl start docker`, or use make_sandbox('bwrap')"
)

_client_lock = threading.Lock()
_client: Any = None


def docker_client() -> Any:
    """The process-wide docker SDK client; EngineUnavailable (saying how to start it) if nothing answers."""
    global _client
    with _client_lock:
        if _client is not None:
            return _client
        try:
            import docker
        except ImportError as exc:
            raise EngineUnavailable("the `docker` Python package is missing: pip install docker") from exc
        try:
            client = docker.from_env(max_pool_size=128, timeout=120)
            client.ping()
        except Exception as exc:
            host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
            raise EngineUnavailable(
                f"the Docker engine at {host} does not answer ({exc}); {START_HINT}"
            ) from exc
        _client = client
        return client


def engine_available() -> bool:
    try:
        docker_client()
        return True
    except EngineUnavailable:
        return False


def image_exists(image: str) -> bool:
    import docker.errors

    try:
        docker_client().images.get(image)
        return True
    except docker.errors.ImageNotFound:
        return False


class DockerSandbox(Sandbox):
    backend = "docker"

    def __init__(
        self,
        image: str | None = None,
        limits: Limits | None = None,
        reset_strategy: str = "snapshot",
        start_timeout: float = 60.0,
        extra_roots: tuple[str, ...] = (),
    ) -> None:
        super().__init__(limits)
        if reset_strategy not in RESET_STRATEGIES:
            raise SandboxError(f"unknown reset_strategy {reset_strategy!r}; choose one of {RESET_STRATEGIES}")
        # Extra writable roots (SWE-bench's /testbed) are tmpfs mounts like /work: only snapshot resets
        # restore them (a committed container layer does not hold tmpfs contents).
        self.extra_roots = check_extra_roots(extra_roots)
        if self.extra_roots and reset_strategy != "snapshot":
            raise SandboxError(f"extra_roots {list(self.extra_roots)} need reset_strategy='snapshot'")
        self.client = docker_client()
        self.image = image or default_image()
        if not image_exists(self.image):
            hint = (
                "`m2rl images build --base-only`"
                if self.image == default_image()
                else "`m2rl images build SPEC`"
            )
            raise SandboxError(f"Docker image {self.image!r} does not exist; build it with {hint}")
        self.reset_strategy = reset_strategy
        self.start_timeout = start_timeout
        self.id = f"{os.getpid()}-{secrets.token_hex(5)}"  # owner pid first: leak checks and gc read it
        self.state_dir = STATE_ROOT / self.id
        self.container_id: str | None = None
        self._committed: str | None = None  # the image `commit` resets return to
        STATE_ROOT.mkdir(mode=0o755, exist_ok=True)
        self.state_dir.mkdir(mode=0o755)
        self.executor_dir = stage_executor(self.state_dir)
        try:
            self._start(self.image)
            if reset_strategy == "commit":
                self.checkpoint()
        except BaseException:
            self.close()
            raise

    # ---- lifecycle ---------------------------------------------------------------------------------
    def _start(self, image: str) -> None:
        from docker.types import Ulimit

        run_dir = self.state_dir / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(mode=0o755)
        if os.geteuid() == 0:
            os.chown(run_dir, 1000, 1000)  # the executor runs as uid 1000 and must reach the socket
        else:
            os.chmod(run_dir, 0o777)
        self._channel = Channel(run_dir)
        lim = self.limits
        mem = f"{lim.memory_mb}m"
        size = f"size={lim.disk_mb}m,nr_inodes={lim.inode_limit}"
        # snapshot resets restore the tmpfs mounts; the other strategies need the writable container layer
        # (where only the per-file size limit applies: overlay2 here has no storage quota). Docker's own
        # /dev/shm has no inode cap, so it is replaced by one that has.
        tmpfs = {
            "/tmp": f"rw,{size},mode=1777,exec,nosuid,nodev",
            SHM: f"rw,size={lim.shm_mb}m,nr_inodes={lim.inode_limit},mode=1777,noexec,nosuid,nodev",
        }
        if self.reset_strategy == "snapshot":
            tmpfs.update(
                {
                    "/work": f"rw,{size},mode=755,uid=1000,gid=1000,exec,nosuid,nodev",
                    HOME: f"rw,{size},mode=755,uid=1000,gid=1000,exec,nosuid,nodev",
                    **{root: f"rw,{size},mode=755,uid=1000,gid=1000,exec,nosuid,nodev" for root in self.extra_roots},
                }
            )
        host_config = self.client.api.create_host_config(
            binds={host_dir: {"bind": sandbox_dir, "mode": "ro"}
                   for host_dir, sandbox_dir in executor_binds(self.executor_dir, run_dir)},
            tmpfs=tmpfs,
            read_only=self.reset_strategy == "snapshot",
            network_mode="bridge" if lim.network else "none",
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            mem_limit=mem,
            memswap_limit=mem,
            nano_cpus=int(lim.cpus * 1e9),
            pids_limit=lim.pids,
            auto_remove=True,
            init=False,
            ulimits=[
                Ulimit(name="nofile", soft=lim.open_files, hard=lim.open_files),
                Ulimit(name="core", soft=0, hard=0),
            ],
        )
        rlimits = {"RLIMIT_FSIZE": lim.disk_mb << 20}
        if lim.cpu_seconds:
            rlimits["RLIMIT_CPU"] = lim.cpu_seconds
        created = self.client.api.create_container(
            image,
            command=executor_command("python3", rlimits, limits=self.limits, extra_roots=self.extra_roots),
            user="1000:1000",
            working_dir="/",
            hostname="sandbox",
            host_config=host_config,
            network_disabled=not lim.network,
            labels={
                LABEL: "1",
                OWNER_PID_LABEL: str(os.getpid()),
                OWNER_HOST_LABEL: socket.gethostname(),
                "m2rl.image": image,
            },
        )
        self.container_id = created["Id"]
        self.client.api.start(self.container_id)
        self._channel.accept(self.start_timeout, self._death_reason)

    def _death_reason(self) -> str | None:
        import docker.errors

        if self.container_id is None:
            return "container not created"
        try:
            state = self.client.api.inspect_container(self.container_id)["State"]
        except docker.errors.NotFound:
            return "container was removed"
        except Exception as exc:  # the engine itself went away
            return f"Docker engine error: {exc}"
        if state.get("Running"):
            return None
        oom = " (out of memory)" if state.get("OOMKilled") else ""
        return (
            f"container exited with status {state.get('ExitCode')}{oom}: {state.get('Error') or ''}".rstrip(
                ": "
            )
        )

    def _remove_container(self) -> None:
        import docker.errors

        if self.container_id is None:
            return
        cid, self.container_id = self.container_id, None
        try:
            self.client.api.remove_container(cid, force=True)
        except docker.errors.NotFound:
            return
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # 409: auto-removal already in progress
                raise
        for _ in range(200):  # wait out an in-flight auto-removal so nothing is left when close() returns
            try:
                self.client.api.inspect_container(cid)
            except docker.errors.NotFound:
                return
            time.sleep(0.05)

    def _destroy(self) -> None:
        try:
            self._remove_container()
        finally:
            if self._committed is not None:
                self._remove_committed()
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def _remove_committed(self) -> None:
        import docker.errors

        try:
            self.client.api.remove_image(self._committed, force=True, noprune=False)
        except docker.errors.APIError:
            pass
        self._committed = None

    # ---- reset strategies --------------------------------------------------------------------------
    def reset(self) -> None:
        if self.reset_strategy == "snapshot":
            super().reset()
            return
        if self._channel is not None:
            self._channel.close()
        self._remove_container()
        self._start(self._committed if self.reset_strategy == "commit" and self._committed else self.image)

    def checkpoint(self) -> None:
        if self.reset_strategy != "commit":
            super().checkpoint()
            return
        old = self._committed
        result = self.client.api.commit(self.container_id, repository="m2rl-checkpoint", tag=self.id)
        self._committed = result["Id"]
        if old is not None and old != self._committed:
            try:
                self.client.api.remove_image(old, force=True)
            except Exception:  # a leftover image costs disk only; the new checkpoint is already in place
                logger.warning("could not remove the previous checkpoint image %s", old, exc_info=True)
