"""Hostile commands on both backends: each is contained, reported, and leaves the sandbox (and its
neighbours, and the host) working. The autouse `no_leaks` fixture checks nothing is left after each test."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from m2rl.sandboxes import Limits, Sandbox, SandboxDead, SandboxError, make_sandbox

TIGHT = Limits(
    memory_mb=256, pids=64, disk_mb=64, open_files=256, max_output_bytes=4096, max_drain_bytes=4 << 20
)


@pytest.fixture
def tight(backend: str) -> Iterator[Sandbox]:
    with make_sandbox(backend, limits=TIGHT) as sb:
        yield sb


def process_count(sb: Sandbox) -> int:
    # ps itself, its bash and the executor: anything more is a survivor.
    return len(sb.exec(["ps", "-e", "-o", "pid="]).stdout.split())


def assert_healthy(sb: Sandbox) -> None:
    r = sb.exec("echo ok", timeout=10)
    assert (r.exit_code, r.stdout) == (0, "ok\n")
    assert process_count(sb) <= 2, sb.exec(["ps", "-ef"]).stdout


def test_fork_bomb_is_contained(tight, backend):
    with make_sandbox(backend) as neighbour:
        start = time.monotonic()
        r = tight.exec(":(){ :|:& };: ; sleep 3; echo survived", timeout=6)
        assert time.monotonic() - start < 20
        assert "fork" in r.stderr or "Resource temporarily unavailable" in r.stderr or r.timed_out, r
        assert_healthy(tight)
        assert neighbour.exec("echo neighbour").stdout == "neighbour\n"


def test_memory_bomb_is_contained(tight):
    r = tight.exec(["python3", "-c", "x = bytearray(2 * 1024**3); print('allocated')"], timeout=20)
    assert r.exit_code != 0 and "allocated" not in r.stdout
    r = tight.exec(["python3", "-c", "l = []\nwhile True: l.append(bytearray(16 << 20))"], timeout=30)
    assert r.exit_code != 0 and not r.timed_out, r  # MemoryError (rlimit) or the OOM killer (cgroup)
    assert_healthy(tight)


def test_disk_fill_is_contained(tight):
    r = tight.exec("dd if=/dev/zero of=/work/fill bs=1M count=512", timeout=30)
    assert r.exit_code != 0
    # tmpfs full (ENOSPC) or the file-size rlimit (SIGXFSZ): either way reported in the result
    assert "No space left" in r.stderr or "file size limit" in r.stderr, r.stderr
    size = int(tight.exec("stat -c %s /work/fill").stdout)
    assert size <= TIGHT.disk_mb << 20
    tight.exec("rm -f /work/fill")
    tight.write_file("/work/after", "still writable")
    assert tight.read_file("/work/after") == b"still writable"
    assert_healthy(tight)


def test_huge_file_write_is_a_clear_error(tight):
    with pytest.raises(SandboxError, match="No space left|File too large"):
        tight.write_file("/work/huge.bin", b"\0" * ((TIGHT.disk_mb + 16) << 20))
    r = tight.exec("head -c 300M /dev/zero > /tmp/huge")
    assert r.exit_code != 0
    assert_healthy(tight)


def test_endless_output_is_cut_with_a_marker(tight):
    r = tight.exec("yes", timeout=20)
    assert r.truncated and not r.timed_out and r.exit_code == -9
    assert "output truncated by m2rl" in r.stdout
    assert len(r.stdout) < TIGHT.max_output_bytes + 200
    assert "more than" in r.stderr
    r = tight.exec("while true; do echo line; done", timeout=1.5)
    assert r.truncated and (r.timed_out or r.exit_code == -9)
    assert_healthy(tight)


def test_sleep_past_timeout_kills_the_tree(tight):
    start = time.monotonic()
    r = tight.exec("sleep 60 & sleep 60; echo never", timeout=1)
    assert r.timed_out and r.exit_code == -9 and "never" not in r.stdout
    assert 0.9 < r.duration_s < 5 and time.monotonic() - start < 10
    assert "timed out after 1s" in r.stderr
    assert_healthy(tight)


def test_background_processes_do_not_outlive_exec(tight):
    start = time.monotonic()
    r = tight.exec(
        "sleep 100 & setsid nohup sleep 100 >/dev/null 2>&1 & (sleep 100 &) ; echo back", timeout=30
    )
    assert r.stdout == "back\n" and not r.timed_out
    assert time.monotonic() - start < 5  # did not wait for the pipes the sleeps still held
    assert_healthy(tight)


def test_network_is_off(tight):
    code = (
        "import socket\n"
        "for target in [('1.1.1.1', 53), ('deb.debian.org', 80)]:\n"
        "    try:\n"
        "        socket.create_connection(target, timeout=3); print('CONNECTED', target)\n"
        "    except OSError as e: print('blocked', e)\n"
    )
    r = tight.exec(["python3", "-c", code], timeout=20)
    assert "CONNECTED" not in r.stdout and r.stdout.count("blocked") == 2
    interfaces = tight.exec("cat /proc/net/dev").stdout
    assert [line.split(":")[0].strip() for line in interfaces.splitlines()[2:]] == ["lo"]


def test_host_files_are_invisible(tight, tmp_path):
    secret = tmp_path / "host-secret.txt"
    secret.write_text("TOP SECRET")
    r = tight.exec(f"cat {secret} /etc/shadow /root/.bashrc /work/main/pyproject.toml 2>&1; ls /home")
    assert "TOP SECRET" not in r.stdout and "[build-system]" not in r.stdout
    assert "root:" not in r.stdout
    assert r.stdout.split()[-1] == "sandbox"  # only the sandbox's own home
    with pytest.raises(SandboxError):
        tight.read_file(str(secret))


def test_no_privileges(tight):
    status = tight.read_file("/proc/self/status").decode()  # the executor's own status
    assert "CapEff:\t0000000000000000" in status
    r = tight.exec("grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; touch /etc/x /usr/x 2>&1; id -u")
    assert "CapEff:\t0000000000000000" in r.stdout
    assert "Read-only file system" in r.stdout or "Permission denied" in r.stdout
    assert r.stdout.strip().endswith("1000")


def test_killing_pid_1_is_ignored(tight):
    r = tight.exec("kill -9 1; kill -TERM 1; kill -INT 1; kill -9 -1; sleep 0.2; echo still-here")
    assert "still-here" in r.stdout or r.exit_code == -9
    assert_healthy(tight)


def test_sandbox_killed_from_outside_raises_dead(tight, backend):
    if backend == "docker":
        subprocess.run(["docker", "kill", tight.container_id], check=True, capture_output=True)
    else:
        os.kill(tight.executor_host_pid(), signal.SIGKILL)
    with pytest.raises(SandboxDead):
        for _ in range(50):  # the connection drops as the kill lands
            tight.exec("true")
            time.sleep(0.1)
    tight.close()


def test_many_process_memory_bomb_is_contained(tight):
    # Each process stays under a per-process limit; together they exceed the sandbox's memory. Docker's
    # cgroup OOM-kills some of them; bwrap's executor watchdog kills the command.
    code = "import time; x = bytearray(100 << 20); x[::4096] = b'1' * len(x[::4096]); time.sleep(2)"
    r = tight.exec(f'for i in 1 2 3 4 5 6; do python3 -c "{code}" & done; wait; echo done', timeout=25)
    assert not r.timed_out
    assert "Killed" in r.stderr or "more than 256 MB of memory" in r.stderr, r
    assert_healthy(tight)


# ---- files the agent planted where the host reads (issue 12, item 1) ---------------------------------
# Each plant is a shell command that puts something hostile at path {p}. The host must never follow the
# link, open the FIFO/socket, or read the sparse file's gigabytes: one clear error, promptly.
PLANTS = {
    "symlink-dev-zero": "ln -sf /dev/zero {p}",
    "symlink-fifo": "mkfifo {p}.fifo && ln -sf {p}.fifo {p}",
    "fifo": "mkfifo {p}",
    "socket": "python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])' {p}",
    "sparse": "truncate -s 60M {p}",  # under the 64 MB file-size limit, far over the 4 MB read bound
}


def executor_peak_rss_mb(sb: Sandbox) -> float:
    """The executor's own peak resident memory (it may read its /proc/1/status; the agent may not)."""
    status = sb.read_file("/proc/1/status").decode()
    kb = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(kb) / 1024


def host_peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_read_file_never_follows_or_reads_unbounded(tight, plant):
    path = "/work/planted"
    r = tight.exec(PLANTS[plant].format(p=path))
    assert r.exit_code == 0, r
    host_before = host_peak_rss_mb()
    start = time.monotonic()
    with pytest.raises(SandboxError) as caught:
        tight.read_file(path)
    assert time.monotonic() - start < 10
    message = str(caught.value)
    assert path in message, message
    if plant == "sparse":
        assert str(60 << 20) in message and "bytes" in message, message  # names the size and the bound
    else:
        assert "not a regular file" in message or "symbolic link" in message, message
    assert executor_peak_rss_mb(tight) < 100
    assert host_peak_rss_mb() - host_before < 50
    assert_healthy(tight)


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_bash_tool_survives_a_planted_changed_list(tight, plant):
    from m2rl.envs.tools.bash import BashTool

    bash = BashTool(tight, timeout_s=10).bash
    # The fixed path older versions used for the list, and anything like it a command could guess.
    for path in ("/tmp/.m2rl_changed", "/tmp/.m2rl_changed_0", "/work/.m2rl_changed"):
        assert tight.exec(PLANTS[plant].format(p=path)).exit_code == 0
    start = time.monotonic()
    out = bash("echo hi > /work/edited.txt; echo done")
    assert time.monotonic() - start < 8
    assert out.output == "done\n" and out.ok and not out.timed_out, out
    assert out.edits == [{"path": "/work/edited.txt", "syntax_ok": None}]
    assert executor_peak_rss_mb(tight) < 100
    assert_healthy(tight)


def test_bash_tool_survives_a_command_racing_its_changed_list(tight):
    """A kept background process that turns every m2rl list file into a FIFO or a /dev/zero link while
    the command runs: the step still returns promptly; a spoiled list means no edits, never a hang."""
    from m2rl.envs.tools.bash import BashTool

    racer = (
        "while :; do for f in /tmp/.m2rl_changed*; do case $f in *'*') ;; "
        '*) rm -f "$f"; if [ $((RANDOM % 2)) = 0 ]; then mkfifo "$f"; else ln -sf /dev/zero "$f"; fi;; '
        "esac; done; sleep 0.002; done"
    )
    tight.exec(f"nohup bash -c '{racer}' >/dev/null 2>&1 &", keep_background=True)
    bash = BashTool(tight, timeout_s=10).bash
    for i in range(5):
        start = time.monotonic()
        out = bash(f"echo {i} > /work/f{i}.txt; sleep 0.05; echo step{i}")
        assert time.monotonic() - start < 8, out
        assert f"step{i}" in out.output and not out.timed_out, out
        assert out.edits in ([], [{"path": f"/work/f{i}.txt", "syntax_ok": None}]), out.edits
    assert executor_peak_rss_mb(tight) < 100
    tight.reset()
    assert_healthy(tight)


# ---- trees that break naive walks (issue 12, items 3 and 6) --------------------------------------------
# Made with mkdir + chdir, as `for i in $(seq 3000); do mkdir d; cd d; done` would: the whole path of the
# deepest directories is far longer than PATH_MAX.
DEEP_TREE = (
    "import os, sys\n"
    "depth = int(sys.argv[1])\n"
    "for root in sys.argv[2:]:\n"
    "    os.chdir(root)\n"
    "    for _ in range(depth):\n"
    "        os.mkdir('d'); os.chdir('d')\n"
    "    open('leaf', 'w').write('bottom of ' + root)\n"
)
# Prints the depth of the chain of `d` directories under argv[1] and the contents of its leaf.
PROBE_TREE = (
    "import os, sys\n"
    "os.chdir(sys.argv[1]); depth = 0\n"
    "while os.path.isdir('d'):\n"
    "    os.chdir('d'); depth += 1\n"
    "print(depth, open('leaf').read() if os.path.exists('leaf') else None)\n"
)
STATE = "find /work /tmp /home/sandbox -maxdepth 3 -printf '%p %y %m %s\\n' | sort"


def test_deep_trees_do_not_break_reset(sandbox):
    before = sandbox.exec(STATE).stdout
    r = sandbox.exec(["python3", "-c", DEEP_TREE, "3000", "/work", "/tmp"], timeout=120)
    assert r.exit_code == 0, r
    r = sandbox.exec(["python3", "-c", DEEP_TREE, "10000", "/home/sandbox"], timeout=120)
    assert r.exit_code == 0, r
    sandbox.exec("chmod 000 /work/d /tmp/d")
    start = time.monotonic()
    sandbox.reset()
    assert time.monotonic() - start < 60
    assert sandbox.exec(STATE).stdout == before
    sandbox.reset()  # and the one after
    assert sandbox.exec(STATE).stdout == before
    assert_healthy(sandbox)


def test_a_deep_tree_in_the_checkpoint_is_restored_and_downloaded(sandbox, tmp_path):
    r = sandbox.exec(["python3", "-c", DEEP_TREE, "3000", "/work"], timeout=120)
    assert r.exit_code == 0, r
    sandbox.checkpoint()
    change = (
        "import os\nos.chdir('/work')\nfor _ in range(3000): os.chdir('d')\n"
        "open('leaf', 'w').write('changed'); os.makedirs('more/deep'); os.chmod('/work/d/d/d', 0o500)\n"
    )
    r = sandbox.exec(["python3", "-c", change])
    assert r.exit_code == 0, r
    sandbox.reset()
    assert sandbox.exec(["python3", "-c", PROBE_TREE, "/work"]).stdout == "3000 bottom of /work\n"
    # The same tree comes back to the host whole, though its paths are longer than PATH_MAX there too,
    # and goes back up again.
    try:
        sandbox.download("/work/d", tmp_path / "deep")
        probe = ["python3", "-c", PROBE_TREE, str(tmp_path / "deep")]
        assert (
            subprocess.run(probe, capture_output=True, text=True, check=True).stdout
            == "2999 bottom of /work\n"
        )
        sandbox.upload(tmp_path / "deep", "/tmp/up")
        assert sandbox.exec(["python3", "-c", PROBE_TREE, "/tmp/up"]).stdout == "2999 bottom of /work\n"
    finally:  # pytest's clean-up of old temporary directories recurses: it must never meet this tree
        subprocess.run(["rm", "-rf", str(tmp_path / "deep")], check=True)


def test_many_empty_files_reset_quickly(backend):
    """200,000 empty files under a 64 MB disk limit (inodes allowed by the limits here): the reset that
    removes them stays a matter of seconds, and so does taking a checkpoint that holds them."""
    with make_sandbox(backend, limits=Limits(disk_mb=64, inodes=250_000, memory_mb=1024)) as sb:
        make = "import os\nos.mkdir('/work/many')\nfor i in range(200000): open('/work/many/%d' % i, 'w').close()"
        r = sb.exec(["python3", "-c", make], timeout=120)
        assert r.exit_code == 0, r
        start = time.monotonic()
        sb.checkpoint()
        checkpoint_s = time.monotonic() - start
        sb.exec("find /work/many -name '1*' -delete", timeout=120)
        start = time.monotonic()
        sb.reset()
        restore_s = time.monotonic() - start
        assert sb.exec("ls /work/many | wc -l").stdout == "200000\n"
        sb.exec(["python3", "-c", "import shutil; shutil.rmtree('/work/many')"], timeout=120)
        sb.write_file("/work/marker", "x")
        sb.checkpoint()  # back to a small snapshot, then the 200,000 files are new again
        sb.exec(["python3", "-c", make], timeout=120)
        start = time.monotonic()
        sb.reset()
        prune_s = time.monotonic() - start
        assert sb.exec("ls /work").stdout == "marker\n"
        print(f"200k files: checkpoint {checkpoint_s:.2f}s, restore {restore_s:.2f}s, prune {prune_s:.2f}s")
        assert checkpoint_s < 60 and restore_s < 60 and prune_s < 60
        assert executor_peak_rss_mb(sb) < 400


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_host_writes_never_go_through_planted_files(tight, plant, tmp_path):
    """write_file refuses a planted link, FIFO or socket (it would write through or wedge); upload replaces
    them; checkpoint and reset neither open nor keep them (a sparse file is just too large to keep)."""
    assert tight.exec(PLANTS[plant].format(p="/work/planted")).exit_code == 0
    start = time.monotonic()
    if plant == "sparse":  # a regular file: overwritten like any other
        tight.write_file("/work/planted", b"new")
        assert tight.read_file("/work/planted") == b"new"
    else:
        with pytest.raises(SandboxError, match="not a regular file"):
            tight.write_file("/work/planted", b"new")
    upload = tmp_path / "planted"
    upload.write_bytes(b"uploaded")
    tight.upload(upload, "/work/planted")
    assert tight.read_file("/work/planted") == b"uploaded"
    assert time.monotonic() - start < 10
    for path in ("/work/again", "/work/again2", "/tmp/again3", "/home/sandbox/again4"):
        tight.exec(PLANTS[plant].format(p=path))
    if plant == "sparse":
        with pytest.raises(SandboxError, match="cannot snapshot"):
            tight.checkpoint()  # 4 x 60 MB of zeros: more than the tight executor keeps (3 x 64 MB)
        tight.reset()  # to the last snapshot that could be taken
        assert tight.exec("ls /work /tmp /home/sandbox").stdout.split() == [
            "/home/sandbox:",
            "/tmp:",
            "/work:",
        ]
    else:
        tight.checkpoint()
        tight.reset()
        kinds = tight.exec("stat -c '%n %F' /work/again /work/again.fifo 2>&1").stdout
        if plant.startswith("symlink"):
            assert "/work/again symbolic link" in kinds, kinds  # a link is kept as a link
        else:
            assert "No such file" in kinds, kinds  # FIFOs and sockets are not kept
    assert time.monotonic() - start < 20
    assert executor_peak_rss_mb(tight) < (300 if plant == "sparse" else 100)  # 3 x 60 MB read, not a 4th
    assert_healthy(tight)


def test_the_executor_bounds_its_own_memory(tight):
    def data_limit(text: str) -> str:
        return next(line.split()[3] for line in text.splitlines() if line.startswith("Max data size"))

    executor = data_limit(tight.read_file("/proc/1/limits").decode())
    assert executor != "unlimited"
    # Sized from the limits: the tight sandbox's 3 x 64 MB of disk, held twice, and a few transfers.
    assert 256 << 20 < int(executor) < 2 << 30, executor
    command = data_limit(tight.exec("cat /proc/self/limits").stdout)  # commands get the original back
    assert command == "unlimited" or int(command) > int(executor), command


def test_ipc_objects_do_not_survive_reset(tight):
    """SysV shared memory, message queues and semaphores live in the sandbox's IPC namespace, outside
    every file system reset() restores: a segment left by one episode would be seen by the next."""
    made = tight.exec("ipcmk -M 1048576 && ipcmk -Q && ipcmk -S 2", timeout=10)
    assert made.exit_code == 0, made
    listed = tight.exec("ipcs -m -q -s", timeout=10).stdout
    assert listed.count("0x") >= 3, listed
    tight.reset()
    after = tight.exec("ipcs -m -q -s", timeout=10).stdout
    assert "0x" not in after, after
    assert_healthy(tight)
