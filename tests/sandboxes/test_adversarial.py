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
        "*) rm -f \"$f\"; if [ $((RANDOM % 2)) = 0 ]; then mkfifo \"$f\"; else ln -sf /dev/zero \"$f\"; fi;; "
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
