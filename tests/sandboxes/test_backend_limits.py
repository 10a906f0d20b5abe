"""What each backend enforces, probed from inside the sandbox and checked from the host (issue 12, items
4-6): the executor's socket directory, /dev and /dev/shm, nested user namespaces, memory a cgroup must
count (memfd, processes kept between steps), host loopback with `network=True`, inode caps, and that
close() and `m2rl sandboxes gc` leave no cgroup, mount or helper process behind.

Every check here failed on the code before these fixes; `docs/sandboxes.md` has the table they back.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from m2rl.sandboxes import Limits, Sandbox, SandboxError, make_sandbox

SMALL = Limits(memory_mb=256, pids=64, disk_mb=64, open_files=256)


@pytest.fixture
def small(backend: str) -> Iterator[Sandbox]:
    with make_sandbox(backend, limits=SMALL) as sb:
        yield sb


# ---- host-side views of a sandbox -----------------------------------------------------------------
def cgroup_mounts() -> dict[str, Path]:
    """controller -> mount point of its hierarchy ('' for the cgroup v2 hierarchy)."""
    found: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, right = line.split(" - ", 1)
        fstype, _source, options = right.split()[:3]
        mount_point = Path(left.split()[4])
        if fstype == "cgroup2":
            found[""] = mount_point
        elif fstype == "cgroup":
            for opt in options.split(","):
                if opt in ("memory", "pids", "cpu"):
                    found[opt] = mount_point
    return found


def memory_cgroup_of(pid: int) -> tuple[Path, str]:
    """(directory, limit file name) of the memory cgroup the process is in, v1 or v2."""
    mounts = cgroup_mounts()
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(",") and "memory" in mounts:
            return mounts["memory"] / path.lstrip("/"), "memory.limit_in_bytes"
        if controllers == "" and "" in mounts:
            directory = mounts[""] / path.lstrip("/")
            if (directory / "memory.max").exists():
                return directory, "memory.max"
    raise AssertionError(f"no memory cgroup for pid {pid}")


def mounts_under(directory: Path) -> list[str]:
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if p == str(directory) or p.startswith(f"{directory}/")]


def own_cgroups() -> list[str]:
    """Sandbox cgroups this test process created (named after the sandbox id, `<pid>-<hex>`)."""
    prefix = f"{os.getpid()}-"
    found = []
    for mount_point in cgroup_mounts().values():
        parent = mount_point / "m2rl"
        if parent.is_dir():
            found += [str(d) for d in parent.iterdir() if d.is_dir() and d.name.startswith(prefix)]
    return found


def slirp_processes() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            name, state = stat.split("(", 1)[1].rsplit(")", 1)
            if name == "slirp4netns" and state.split()[0] != "Z":  # a zombie is already gone
                pids.append(int(entry))
    return pids


@pytest.fixture(autouse=True)
def no_cgroup_or_mount_leaks() -> Iterator[None]:
    """Beyond conftest's check (containers, processes, state dirs): cgroups and host mounts."""
    from m2rl.sandboxes.bwrap_backend import STATE_ROOT

    yield
    assert not own_cgroups(), f"leaked sandbox cgroups: {own_cgroups()}"
    leaked = [p for p in mounts_under(STATE_ROOT) if f"/{os.getpid()}-" in p]
    assert not leaked, f"leaked host mounts: {leaked}"


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("host cgroups and inode-capped mounts need root (CI runs as root)")


# ---- item 4: the executor's socket directory ----------------------------------------------------
def test_socket_dir_is_read_only_and_nothing_survives_reset(small):
    r = small.exec(
        "head -c 100M /dev/zero > /run/m2rl/fill; echo rc=$?; mkdir /run/m2rl/d; ls -A /run/m2rl", timeout=30
    )
    assert "rc=0" not in r.stdout, r
    assert r.stdout.split()[-1] == "executor.sock", r
    assert sorted(os.listdir(small.state_dir / "run")) == ["executor.sock"]  # nothing reached the host
    with pytest.raises(SandboxError):
        small.write_file("/run/m2rl/x", b"x")
    small.reset()
    assert small.exec("ls -A /run/m2rl").stdout == "executor.sock\n"  # and the executor still answers


# ---- item 5: /dev, /dev/shm, user namespaces, memory the kernel must count ------------------------
def test_dev_is_read_only_and_shm_is_capped_and_reset(small):
    r = small.exec("touch /dev/x 2>&1; head -c 50M /dev/zero > /dev/fill 2>&1; echo rc=$?; ls /dev")
    assert "rc=0" not in r.stdout and "fill" not in r.stdout.split(), r
    shm_bytes = int(small.exec("df -B1 --output=size /dev/shm | tail -1").stdout)
    assert 0 < shm_bytes <= SMALL.disk_mb << 20
    r = small.exec("head -c 200M /dev/zero > /dev/shm/fill; echo rc=$?; stat -c %s /dev/shm/fill", timeout=30)
    assert "rc=0" not in r.stdout and int(r.stdout.split()[-1]) <= SMALL.disk_mb << 20, r
    small.exec("echo kept > /dev/shm/note")
    small.reset()
    assert small.exec("ls -A /dev/shm").stdout == ""


def test_nested_user_namespaces_are_refused(small):
    r = small.exec("unshare -Urm sh -c 'id -u; mount -t tmpfs none /tmp && echo MOUNTED' 2>&1; echo rc=$?")
    assert "MOUNTED" not in r.stdout and "rc=0" not in r.stdout, r
    code = (  # os.unshare needs Python 3.12; the images have 3.11
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "print('NESTED' if libc.unshare(0x10000000) == 0 else 'refused %d' % ctypes.get_errno())"
    )
    r = small.exec(["python3", "-c", code])  # 0x10000000: CLONE_NEWUSER
    assert r.stdout.startswith("refused"), r


def test_memfd_memory_counts_towards_the_limit(small):
    # Pages written with write() into a memfd are neither mapped (RLIMIT_AS) nor resident in any process
    # (the watchdog's RSS): only a memory cgroup sees them. Six memfds stay under RLIMIT_FSIZE each.
    code = (
        "import os, time\nchunk = b'x' * (1 << 20)\nfds = [os.memfd_create('hog') for _ in range(6)]\n"
        "for fd in fds:\n    for _ in range(60): os.write(fd, chunk)\n"
        "print('held', flush=True)\ntime.sleep(5)"
    )
    r = small.exec(["python3", "-c", code], timeout=30)
    assert "held" not in r.stdout and r.exit_code != 0, r
    r = small.exec("echo ok")
    assert r.stdout == "ok\n"


def sandbox_processes(bwrap_pid: int, needle: str) -> list[int]:
    """Host pids of the processes below a bwrap process whose command line contains `needle`."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(
                    Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]
                )
            except OSError:
                continue
    found = []
    for pid in parents:
        p = pid
        while p in parents and p > 1 and p != bwrap_pid:
            p = parents[p]
        try:
            if p == bwrap_pid and needle.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def _pss_bytes(pids: list[int]) -> int:
    """Proportional set size: pages a forked child shares with its parent are counted once in the sum."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) << 10
        except (OSError, IndexError, ValueError):
            pass
    return total


@pytest.mark.bwrap
def test_processes_kept_between_steps_are_bounded(bwrap_ready):
    # Four children, each under the per-process RLIMIT_AS, together far above the sandbox's memory; they
    # allocate after the exec returned, while no watchdog polls. Only a cgroup bounds their sum.
    hog = (
        "import os, time\n"
        "for i in range(4):\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(0.5); x = bytearray(180 << 20); x[::4096] = b'1' * len(x[::4096])\n"
        "        open('/tmp/done.%d' % i, 'w').close(); time.sleep(60); os._exit(0)\n"
        "time.sleep(60)\n"
    )

    def done(sb: Sandbox) -> int:
        count = 0
        for i in range(4):
            try:
                sb.read_file(f"/tmp/done.{i}")  # a file request: no exec, so no watchdog runs
                count += 1
            except SandboxError:
                pass
        return count

    with make_sandbox("bwrap", limits=SMALL) as sb:
        sb.write_file("/tmp/hog.py", hog)
        sb.exec("python3 /tmp/hog.py &", keep_background=True)
        peak, most, deadline = 0, 0, time.monotonic() + 30
        while time.monotonic() < deadline:
            pids = sandbox_processes(sb._proc.pid, "hog.py")
            peak, most = max(peak, _pss_bytes(pids)), max(most, len(pids))
            if (most == 5 and len(pids) <= 1) or done(sb) == 4:  # children all killed, or all holding
                break
            time.sleep(0.05)
        assert most == 5, "the parent and its four children never ran together"
        peak = max(peak, _pss_bytes(sandbox_processes(sb._proc.pid, "hog.py")))
        assert peak <= SMALL.memory_mb << 20, f"processes kept between steps held {peak >> 20} MB"


# ---- item 5: network=True gets its own namespace ----------------------------------------------------
PROBE = """
import socket, struct
gateway = None
for line in open('/proc/net/route').read().splitlines()[1:]:
    f = line.split()
    if f[1] == '00000000':
        gateway = socket.inet_ntoa(struct.pack('<I', int(f[2], 16)))
print('gateway', gateway)
# Only loopback and the host-side address of the sandbox's own virtual network: never an outside address.
for host in ['127.0.0.1'] + ([gateway] if gateway == EXPECTED_GATEWAY else []):
    try:
        socket.create_connection((host, PORT), timeout=3).close(); print('REACHED', host)
    except OSError as e:
        print('blocked', host, e)
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(b'\\0' + ABSTRACT); print('REACHED abstract')
except OSError as e:
    print('blocked abstract', e)
"""


def host_side_gateway(sb: Sandbox) -> str:
    """The address a sandbox's default route leads to: slirp4netns's host alias, or Docker's bridge."""
    if sb.backend == "bwrap":
        return "10.0.2.2"
    from m2rl.sandboxes.docker_backend import docker_client

    return docker_client().api.inspect_container(sb.container_id)["NetworkSettings"]["Gateway"]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def host_loopback_services() -> Iterator[tuple[int, bytes]]:
    """An HTTP server on the host's 127.0.0.1 and a listening abstract unix socket."""
    server = http.server.HTTPServer(("127.0.0.1", 0), _Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    name = f"m2rl-test-{os.getpid()}".encode()
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(b"\0" + name)
    abstract.listen(4)
    try:
        yield server.server_address[1], name
    finally:
        server.shutdown()
        server.server_close()
        abstract.close()


def test_network_true_cannot_reach_host_loopback(backend, host_loopback_services):
    port, abstract = host_loopback_services
    with socket.create_connection(("127.0.0.1", port), timeout=3):
        pass  # the services answer on the host
    with make_sandbox(backend, limits=Limits(network=True)) as sb:
        interfaces = [
            line.split(":")[0].strip() for line in sb.exec("cat /proc/net/dev").stdout.splitlines()[2:]
        ]
        assert any(name != "lo" for name in interfaces), interfaces  # the network is on
        gateway = host_side_gateway(sb)
        probe = PROBE.replace("PORT", str(port)).replace("ABSTRACT", repr(abstract))
        r = sb.exec(["python3", "-c", probe.replace("EXPECTED_GATEWAY", repr(gateway))], timeout=30)
        assert r.exit_code == 0, r
        assert f"gateway {gateway}\n" in r.stdout, r  # its own virtual network, not the host's
        assert "REACHED" not in r.stdout and r.stdout.count("blocked") == 3, r


# ---- item 6: inodes ---------------------------------------------------------------------------------
FILL_INODES = """
import os, sys
root, n = sys.argv[1], 0
os.makedirs(root + '/many', exist_ok=True)
try:
    while n < 200_000:
        open('%s/many/%d' % (root, n), 'w').close(); n += 1
    print(n, 'ok')
except OSError as e:
    print(n, e.errno)
"""


def test_limits_have_an_inode_cap_proportional_to_disk():
    assert Limits(disk_mb=64).inode_limit < 200_000
    assert Limits(disk_mb=512).inode_limit == 8 * Limits(disk_mb=64).inode_limit
    assert Limits(disk_mb=64, inodes=1000).inode_limit == 1000
    # None stays None, so a copy with another disk size keeps the proportion
    assert dataclasses.replace(Limits(disk_mb=64), disk_mb=512).inode_limit == Limits(disk_mb=512).inode_limit
    for bad in (0, -1, 1.5, True, "9"):
        with pytest.raises(ValueError, match="inodes"):
            Limits(inodes=bad)


def test_empty_files_cannot_exhaust_inodes(backend):
    with make_sandbox(backend, limits=Limits(disk_mb=64)) as sb:
        r = sb.exec(["python3", "-c", FILL_INODES, "/work"], timeout=120)
        count, outcome = r.stdout.split()
        assert outcome == "28" and int(count) <= Limits(disk_mb=64).inode_limit, r  # ENOSPC
    capped = Limits(disk_mb=16, inodes=1000)
    with make_sandbox(backend, limits=capped) as sb:
        for root in ("/tmp", "/home/sandbox", "/dev/shm"):
            r = sb.exec(["python3", "-c", FILL_INODES, root], timeout=60)
            count, outcome = r.stdout.split()
            assert outcome == "28" and int(count) <= capped.inode_limit, (root, r)
        sb.reset()
        assert sb.exec("ls /tmp /home/sandbox /dev/shm | grep -c many || true").stdout == "0\n"


# ---- bwrap: a cgroup per sandbox, and nothing left after close or gc --------------------------------
@pytest.mark.bwrap
def test_bwrap_sandbox_has_its_own_cgroup_and_mounts_until_close(bwrap_ready):
    needs_root()
    with make_sandbox("bwrap", limits=Limits(memory_mb=300, pids=77, network=True)) as sb:
        executor = sb.executor_host_pid()
        directory, limit_file = memory_cgroup_of(executor)
        assert int((directory / limit_file).read_text()) == 300 << 20
        assert memory_cgroup_of(os.getpid())[0] != directory
        mounts = mounts_under(sb.state_dir)
        assert len(mounts) >= 4, mounts  # /work, /tmp, home, /dev/shm: size and inode capped
        helper = sb._net.pid
        assert helper in slirp_processes(), "network=True runs slirp4netns"
        assert helper in {int(x) for x in (directory / "cgroup.procs").read_text().split()}
        state_dir = sb.state_dir
    assert not directory.exists()
    assert not mounts_under(state_dir)
    assert helper not in slirp_processes()


KILLED_OWNER = """
import json, time
from m2rl.sandboxes import Limits, make_sandbox
sb = make_sandbox("bwrap", limits=Limits(network=True))
print(json.dumps([sb.id, sb._proc.pid, sb._net.pid]), flush=True)
time.sleep(600)
"""


@pytest.mark.bwrap
def test_gc_removes_cgroups_and_mounts_of_a_killed_owner(bwrap_ready):
    needs_root()
    from m2rl.sandboxes.bwrap_backend import STATE_ROOT
    from m2rl.sandboxes.gc import collect

    child = subprocess.Popen([sys.executable, "-c", KILLED_OWNER], stdout=subprocess.PIPE, text=True)
    try:
        sandbox_id, bwrap_pid, slirp_pid = json.loads(child.stdout.readline())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and Path(f"/proc/{bwrap_pid}").exists():
        time.sleep(0.1)  # the executor sees its connection drop and the namespace ends
    while time.monotonic() < deadline and slirp_pid in slirp_processes():
        time.sleep(0.1)  # slirp4netns exits when its exit pipe (held by the owner) closes
    assert slirp_pid not in slirp_processes()
    leftovers = [p for m in cgroup_mounts().values() for p in [m / "m2rl" / sandbox_id] if p.exists()]
    assert leftovers and mounts_under(STATE_ROOT / sandbox_id)  # what gc is for
    report = collect(min_age_s=0)
    assert str(STATE_ROOT / sandbox_id) in report.state_dirs
    assert not [p for p in leftovers if p.exists()]
    assert not mounts_under(STATE_ROOT / sandbox_id) and not (STATE_ROOT / sandbox_id).exists()


@pytest.mark.bwrap
def test_without_a_cgroup_the_watchdog_applies_and_it_is_reported(bwrap_ready, monkeypatch, caplog):
    from m2rl.sandboxes import bwrap_backend, cgroup

    monkeypatch.setattr(cgroup, "detect_layout", lambda: "no writable cgroup hierarchy (test)")
    monkeypatch.setattr(bwrap_backend, "_warned", set())
    with (
        caplog.at_level(logging.WARNING, logger="m2rl.sandboxes.bwrap_backend"),
        make_sandbox("bwrap", limits=SMALL) as sb,
    ):
        assert sb.cgroup is None
        assert "no writable cgroup hierarchy (test)" in caplog.text
        assert "RLIMIT_AS" in sb.enforcement["memory"]
        code = "import time; x = bytearray(100 << 20); x[::4096] = b'1' * len(x[::4096]); time.sleep(2)"
        r = sb.exec(f'for i in 1 2 3 4; do python3 -c "{code}" & done; wait', timeout=25)
        assert "more than 256 MB of memory" in r.stderr, r


# ---- cgroup v1 and v2 (this kind of host mounts v1; others mount only v2) ------------------------------
def test_cgroup_limit_writes_on_each_version():
    from m2rl.sandboxes.cgroup import limit_writes

    limits = Limits(memory_mb=300, pids=77, cpus=0.5)
    assert limit_writes(1, limits) == [
        ("memory", "memory.limit_in_bytes", str(300 << 20)),
        ("memory", "memory.memsw.limit_in_bytes", str(300 << 20)),  # after the limit: memsw >= limit
        ("pids", "pids.max", "77"),
        ("cpu", "cpu.cfs_period_us", "100000"),
        ("cpu", "cpu.cfs_quota_us", "50000"),
    ]
    assert limit_writes(2, limits) == [
        ("memory", "memory.max", str(300 << 20)),
        ("memory", "memory.swap.max", "0"),
        ("pids", "pids.max", "77"),
        ("cpu", "cpu.max", "50000 100000"),
    ]


V1_HYBRID = """\
30 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
32 30 0:28 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 30 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2_ONLY = "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"


def test_cgroup_layout_detection():
    from m2rl.sandboxes.cgroup import parse_layout

    def controllers(available: str):
        return lambda mount_point: available

    layout = parse_layout(V1_HYBRID, controllers("hugetlb"))  # v2 mounted but without memory: v1
    assert layout.version == 1
    assert layout.roots == {
        "memory": Path("/sys/fs/cgroup/memory"),
        "pids": Path("/sys/fs/cgroup/pids"),
        "cpu": Path("/sys/fs/cgroup/cpu,cpuacct"),
    }
    layout = parse_layout(V2_ONLY, controllers("cpuset cpu io memory pids"))
    assert layout.version == 2 and set(layout.roots.values()) == {Path("/sys/fs/cgroup")}
    assert set(layout.roots) == {"memory", "pids", "cpu"}
    assert "memory" in parse_layout(V2_ONLY, controllers("cpu pids"))  # a reason, not a layout
    assert "no cgroup" in parse_layout("", controllers(""))
