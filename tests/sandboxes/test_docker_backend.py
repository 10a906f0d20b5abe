"""Docker-only behaviour: hardening flags on the real container, engine errors, reset strategies, gc,
and clean-up when the owning process is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from m2rl.sandboxes import (
    EngineUnavailable,
    Limits,
    SandboxError,
    docker_backend,
    make_sandbox,
    resolve_backend,
)
from m2rl.sandboxes.images import default_image

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]


def test_container_is_hardened_and_labelled():
    limits = Limits(cpus=0.5, memory_mb=300, pids=77, disk_mb=40, open_files=333)
    with make_sandbox("docker", limits=limits) as sb:
        info = docker_backend.docker_client().api.inspect_container(sb.container_id)
        hc = info["HostConfig"]
        assert info["Config"]["User"] == "1000:1000"
        assert info["Config"]["Labels"][docker_backend.LABEL] == "1"
        assert info["Config"]["Labels"][docker_backend.OWNER_PID_LABEL] == str(os.getpid())
        assert hc["CapDrop"] == ["ALL"] and not hc["CapAdd"] and not hc["Privileged"]
        assert "no-new-privileges" in hc["SecurityOpt"]
        assert hc["ReadonlyRootfs"] and hc["NetworkMode"] == "none"
        assert hc["Memory"] == 300 << 20 and hc["MemorySwap"] == 300 << 20
        assert hc["PidsLimit"] == 77 and hc["NanoCpus"] == 500_000_000
        assert all(f"nr_inodes={limits.inode_limit}" in options for options in hc["Tmpfs"].values())
        assert set(hc["Tmpfs"]) == {"/work", "/tmp", "/home/sandbox", "/dev/shm"}
        assert all(bind.endswith(":ro") for bind in hc["Binds"])  # the executor's and the socket's directories
        r = sb.exec(
            "ulimit -n; df -m /work | tail -1 | awk '{print $2}'; cat /proc/net/dev | tail -n +3 | wc -l"
        )
        assert r.stdout.split() == ["333", "40", "1"]


def test_network_is_opt_in():
    with make_sandbox("docker", limits=Limits(network=True)) as sb:
        names = [line.split(":")[0].strip() for line in sb.exec("cat /proc/net/dev").stdout.splitlines()[2:]]
        assert "eth0" in names


def test_missing_image_and_auto_backend():
    with pytest.raises(SandboxError, match="does not exist.*m2rl images build"):
        make_sandbox("docker", image="m2rl-no-such-image:0")
    assert resolve_backend("auto") == "docker"
    assert resolve_backend("auto", image="m2rl-no-such-image:0") == "bwrap"


def test_engine_down_gives_one_clear_error(monkeypatch, bwrap_ready):
    monkeypatch.setattr(docker_backend, "_client", None)
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(EngineUnavailable, match="does not answer.*dockerd"):
        make_sandbox("docker")
    assert resolve_backend("auto") == "bwrap"
    monkeypatch.setattr(docker_backend, "_client", None)  # the next test reconnects to the real engine


@pytest.mark.parametrize("strategy", ["overlay", "commit"])
def test_other_reset_strategies_restore_the_file_system(strategy):
    with make_sandbox("docker", reset_strategy=strategy) as sb:
        before = sb.exec("find /work /home/sandbox /tmp | sort").stdout
        sb.write_file("/work/task.txt", "task")
        if strategy == "commit":
            sb.checkpoint()
            before = sb.exec("find /work /home/sandbox /tmp | sort").stdout
        sb.exec("echo junk > /work/junk; touch /home/sandbox/.x /tmp/y; sleep 100 &", keep_background=True)
        sb.reset()
        assert sb.exec("find /work /home/sandbox /tmp | sort").stdout == before
        assert sb.exec("pgrep sleep || echo none").stdout == "none\n"


def test_gc_removes_leaked_containers_only():
    from m2rl.sandboxes.gc import collect

    dead = subprocess.Popen(["true"])
    dead.wait()
    client = docker_backend.docker_client()
    leaked = client.api.create_container(
        default_image(),
        command=["sleep", "600"],
        network_disabled=True,
        labels={
            docker_backend.LABEL: "1",
            docker_backend.OWNER_PID_LABEL: str(dead.pid),
            docker_backend.OWNER_HOST_LABEL: __import__("socket").gethostname(),
        },
    )["Id"]
    client.api.start(leaked)
    with make_sandbox("docker") as live:
        dry = collect(dry_run=True)
        assert leaked[:12] in dry.containers and live.container_id[:12] not in dry.containers
        report = collect()
        assert leaked[:12] in report.containers
        assert live.exec("echo alive").stdout == "alive\n"
    assert not client.api.containers(all=True, filters={"id": leaked})


def test_cli_gc_and_images_build(capsys):
    from m2rl.sandboxes.cli import main

    assert main(["sandboxes", "gc", "--dry-run"]) == 0
    assert "would have removed" in capsys.readouterr().out
    assert main(["images", "build", "--base-only"]) == 0  # cached: a lookup
    assert capsys.readouterr().out.strip() == default_image()
    assert main(["images", "build", "/no/such/spec.yaml"]) == 1
    assert "not found" in capsys.readouterr().err


CHILD = """
import json, sys, time
from m2rl.sandboxes import make_sandbox
boxes = [make_sandbox("docker"), make_sandbox("bwrap")]
print(json.dumps([boxes[0].container_id, boxes[1]._proc.pid]), flush=True)
time.sleep(600)
"""


def test_killed_owner_leaves_nothing_running(bwrap_ready):
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        container_id, bwrap_pid = json.loads(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    client = docker_backend.docker_client()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the executors see their connection drop and exit; auto-remove
        gone = not client.api.containers(all=True, filters={"id": container_id})
        if gone and not os.path.exists(f"/proc/{bwrap_pid}"):
            break
        time.sleep(0.2)
    assert not client.api.containers(all=True, filters={"id": container_id})
    assert (
        not os.path.exists(f"/proc/{bwrap_pid}") or open(f"/proc/{bwrap_pid}/stat").read().split()[2] == "Z"
    )
    from m2rl.sandboxes.gc import collect

    collect(min_age_s=0)  # the dead owner's state directories


def test_extra_root_is_seeded_from_the_image_writable_and_reset(tmp_path):
    """An extra writable root (SWE-bench's /testbed) is a capped tmpfs seeded from the image's
    /opt/m2rl/seed/<root>, restored by reset() and kept by checkpoint() like /work."""
    from m2rl.sandboxes.images import ImageSpec, build_image

    seed = tmp_path / "repo"
    (seed / "pkg").mkdir(parents=True)
    (seed / "pkg" / "mod.py").write_text("VALUE = 1\n")
    tag = build_image(ImageSpec(name="m2rl-test-extra-root", files={"/opt/m2rl/seed/testbed": str(seed)}))
    limits = Limits(disk_mb=30)
    with make_sandbox("docker", image=tag, limits=limits, extra_roots=("/testbed",)) as sb:
        hc = docker_backend.docker_client().api.inspect_container(sb.container_id)["HostConfig"]
        assert f"nr_inodes={limits.inode_limit}" in hc["Tmpfs"]["/testbed"]
        assert sb.read_file("/testbed/pkg/mod.py") == b"VALUE = 1\n"
        r = sb.exec("echo 'VALUE = 2' > pkg/mod.py && touch new.txt && df -m . | tail -1 | awk '{print $2}'",
                    cwd="/testbed")
        assert r.ok and r.stdout.split() == ["30"], r
        sb.reset()
        assert sb.read_file("/testbed/pkg/mod.py") == b"VALUE = 1\n"
        assert sb.exec("ls /testbed").stdout.split() == ["pkg"]
        sb.write_file("/testbed/pkg/mod.py", "VALUE = 3\n")
        sb.checkpoint()
        sb.exec("rm -rf /testbed/pkg")
        sb.reset()
        assert sb.read_file("/testbed/pkg/mod.py") == b"VALUE = 3\n"


@pytest.mark.parametrize("root", ["/usr", "/work", "testbed", "/a/b", "/opt"])
def test_extra_root_must_be_a_free_top_level_directory(root):
    with pytest.raises(SandboxError, match="extra writable root"):
        make_sandbox("docker", extra_roots=(root,))
