"""bubblewrap-only behaviour: limits seen from inside, the overlay reset strategy, per-sandbox host uids."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
from m2rl.sandboxes import Limits, SandboxError, make_sandbox

pytestmark = [pytest.mark.bwrap, pytest.mark.usefixtures("bwrap_ready")]


def test_limits_inside_the_sandbox():
    limits = Limits(pids=99, disk_mb=48, open_files=321, memory_mb=512)
    with make_sandbox("bwrap", limits=limits) as sb:
        r = sb.exec("ulimit -n; ulimit -v; df -m /work | tail -1 | awk '{print $2}'; hostname")
        assert r.stdout.split() == ["321", str(512 * 1024), "48", "sandbox"]
        if os.geteuid() == 0:  # own host uid per sandbox, so RLIMIT_NPROC is per sandbox
            assert sb.exec("ulimit -u").stdout.strip() == "99"
            # and its tmpfs mounts are made on the host, with an inode cap bwrap's --tmpfs lacks
            inodes = sb.exec("df --output=itotal /work /tmp /home/sandbox /dev/shm | tail -n +2").stdout
            assert inodes.split() == [str(limits.inode_limit)] * 4


def test_sandboxes_get_distinct_host_uids():
    if os.geteuid() != 0:
        pytest.skip("per-sandbox host uids need root")
    with make_sandbox("bwrap") as a, make_sandbox("bwrap") as b:
        uid_a = os.stat(f"/proc/{a.executor_host_pid()}").st_uid
        uid_b = os.stat(f"/proc/{b.executor_host_pid()}").st_uid
        assert uid_a != uid_b and min(uid_a, uid_b) >= 200_000


def test_overlay_reset_strategy():
    with make_sandbox("bwrap", reset_strategy="overlay") as sb:
        before = sb.exec("find /work /tmp /home/sandbox | sort").stdout
        sb.exec("touch /work/a /tmp/b ~/.c; sleep 100 &", keep_background=True)
        sb.reset()
        assert sb.exec("find /work /tmp /home/sandbox | sort; pgrep sleep").stdout == before
        with pytest.raises(SandboxError, match="snapshot"):
            sb.checkpoint()
    with pytest.raises(SandboxError, match="reset_strategy"):
        make_sandbox("bwrap", reset_strategy="commit")


def test_image_is_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="ignores image"):
        sb = make_sandbox("bwrap", image="m2rl-base:whatever")
    sb.close()


def test_gc_removes_only_state_dirs_of_dead_owners():
    from m2rl.sandboxes.bwrap_backend import STATE_ROOT
    from m2rl.sandboxes.gc import collect

    dead = subprocess.Popen(["true"])
    dead.wait()
    STATE_ROOT.mkdir(exist_ok=True)
    stale = STATE_ROOT / f"{dead.pid}-0123456789"
    live_owner = STATE_ROOT / "1-0123456789"  # pid 1 is always alive
    old = time.time() - 3600
    for d in (stale, live_owner):
        d.mkdir()
        os.utime(d, (old, old))
    try:
        report = collect()
        assert str(stale) in report.state_dirs and not stale.exists()
        assert live_owner.exists() and str(live_owner) not in report.state_dirs
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(live_owner, ignore_errors=True)
