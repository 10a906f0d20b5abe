"""The Sandbox protocol on both backends: exec semantics, files, reset, async, closing."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from m2rl.sandboxes import AsyncSandbox, ExecResult, Limits, SandboxDead, SandboxError, make_sandbox


def test_exec_basics(sandbox):
    r = sandbox.exec("echo out; echo err >&2; exit 3")
    assert isinstance(r, ExecResult)
    assert (r.exit_code, r.stdout, r.stderr, r.timed_out, r.truncated) == (3, "out\n", "err\n", False, False)
    assert 0 <= r.duration_s < 5
    assert (
        sandbox.exec(["python3", "-c", "import sys; print(sys.argv[1:])", "a b", "$HOME"]).stdout
        == "['a b', '$HOME']\n"
    )


def test_exec_cwd_env_stdin_user(sandbox):
    assert sandbox.exec("pwd").stdout == "/work\n"
    sandbox.exec("mkdir -p /work/sub")
    assert sandbox.exec("pwd", cwd="/work/sub").stdout == "/work/sub\n"
    assert sandbox.exec("echo $FOO-$HOME", env={"FOO": "bar"}).stdout == "bar-/home/sandbox\n"
    assert sandbox.exec("tr a-z A-Z", stdin="hello\n").stdout == "HELLO\n"
    big = os.urandom(3 << 20)  # larger than any pipe buffer: the executor must interleave writes and reads
    assert (
        sandbox.exec("sha256sum", stdin=big).stdout.split()[0]
        == __import__("hashlib").sha256(big).hexdigest()
    )
    assert sandbox.exec("id -u").stdout == "1000\n"
    assert sandbox.exec("python3 -c 'import sys; print(sys.version_info[0])'").stdout == "3\n"


def test_exec_missing_program_and_bad_input(sandbox):
    r = sandbox.exec(["/no/such/program"])
    assert r.exit_code == 127 and "cannot start" in r.stderr
    assert sandbox.exec("no-such-command-xyz").exit_code == 127
    with pytest.raises(SandboxError, match="timeout"):
        sandbox.exec("true", timeout=-1)
    with pytest.raises(SandboxError, match="cwd"):
        sandbox.exec("true", cwd="relative")
    with pytest.raises(SandboxError, match="empty"):
        sandbox.exec("  ")
    with pytest.raises(SandboxError, match="env"):
        sandbox.exec("true", env={"A": 1})  # type: ignore[dict-item]
    r = sandbox.exec("true", cwd="/does/not/exist")
    assert r.exit_code == 127 and "does/not/exist" in r.stderr


def test_the_executor_runs_from_its_own_read_only_directory(sandbox):
    """Both backends ship the executor's two modules, and nothing else, where the sandbox cannot change them."""
    from m2rl.sandboxes.sandbox import EXECUTOR_DIR, EXECUTOR_FILES

    assert sandbox.exec(["ls", EXECUTOR_DIR]).stdout.split() == sorted(EXECUTOR_FILES)
    r = sandbox.exec(f"echo x >> {EXECUTOR_DIR}/executor_files.py; touch {EXECUTOR_DIR}/new")
    assert r.exit_code != 0 and "Read-only file system" in r.stderr
    assert sandbox.exec("echo still answers").stdout == "still answers\n"


def test_files_roundtrip(sandbox, tmp_path):
    payload = bytes(range(256)) * 1000
    sandbox.write_file("/work/deep/dir/blob.bin", payload)
    assert sandbox.read_file("/work/deep/dir/blob.bin") == payload
    sandbox.write_file("/work/run.sh", "#!/bin/sh\necho ran\n", mode=0o755)
    assert sandbox.exec("/work/run.sh").stdout == "ran\n"
    with pytest.raises(SandboxError, match="FileNotFoundError"):
        sandbox.read_file("/work/missing")
    with pytest.raises(SandboxError, match="absolute"):
        sandbox.read_file("work/relative")
    with pytest.raises(SandboxError):
        sandbox.write_file("/usr/bin/evil", "x")  # read-only system directories

    src = tmp_path / "proj"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("A = 1\n")
    (src / "README").write_text("hi\n")
    sandbox.upload(src, "/work/proj")
    assert (
        sandbox.exec("cd /work/proj && python3 -c 'import pkg.a; print(pkg.a.A)' && cat README").stdout
        == "1\nhi\n"
    )
    sandbox.exec("echo new > /work/proj/pkg/b.txt")
    sandbox.download("/work/proj", tmp_path / "back")
    assert (tmp_path / "back" / "pkg" / "b.txt").read_text() == "new\n"
    assert (tmp_path / "back" / "README").read_text() == "hi\n"
    single = tmp_path / "one.txt"
    single.write_text("one")
    sandbox.upload(single, "/tmp/copied.txt")
    assert sandbox.read_file("/tmp/copied.txt") == b"one"
    sandbox.download("/tmp/copied.txt", tmp_path / "one_back.txt")
    assert (tmp_path / "one_back.txt").read_text() == "one"


def listing(sb) -> str:
    return sb.exec("find /work /tmp /home/sandbox -printf '%p %m %s\\n' | sort").stdout


def test_reset_restores_initial_state_and_kills_processes(sandbox):
    before = listing(sandbox)
    sandbox.write_file("/work/a.txt", "x")
    sandbox.exec("mkdir -p /work/d/e && chmod 000 /work/d && echo y > /tmp/t && touch ~/.hist")
    r = sandbox.exec("setsid sleep 300 >/dev/null 2>&1 & echo started", keep_background=True)
    assert r.stdout == "started\n"
    assert "sleep 300" in sandbox.exec("ps -eo args").stdout
    sandbox.reset()
    assert listing(sandbox) == before
    assert "sleep 300" not in sandbox.exec("ps -eo args").stdout


def test_checkpoint_moves_the_reset_point(sandbox):
    sandbox.write_file("/work/task.py", "print('task')\n")
    sandbox.checkpoint()
    sandbox.write_file("/work/scratch", "junk")
    sandbox.exec("rm /work/task.py")
    sandbox.reset()
    assert sandbox.exec("ls /work").stdout == "task.py\n"


def test_async_sandbox(backend):
    async def main() -> list[str]:
        async with AsyncSandbox(make_sandbox(backend)) as asb:
            await asb.write_file("/work/x", "1")
            results = await asyncio.gather(*(asb.exec(f"cat /work/x; echo {i}") for i in range(3)))
            assert (await asb.read_file("/work/x")) == b"1"
            await asb.reset()
            return [r.stdout for r in results]

    assert asyncio.run(main()) == ["1" + f"{i}\n" for i in range(3)]


def test_closed_sandbox_raises_dead(backend):
    sb = make_sandbox(backend)
    sb.close()
    sb.close()  # idempotent
    with pytest.raises(SandboxDead):
        sb.exec("true")


def test_kept_background_server_can_keep_printing(sandbox):
    """A long-lived helper started with a plain `&` (no redirect) must not die when its exec returns."""
    script = "import time\nfor i in range(40):\n    print('tick', i, flush=True)\n    time.sleep(0.05)\n"
    sandbox.write_file("/work/ticker.py", script)
    r = sandbox.exec("python3 /work/ticker.py & echo started", keep_background=True)
    assert r.stdout.startswith("started") or "started" in r.stdout
    time.sleep(0.5)
    assert "ticker.py" in sandbox.exec(["ps", "-eo", "args"]).stdout  # still alive after ~10 prints
    sandbox.reset()
    assert "ticker.py" not in sandbox.exec(["ps", "-eo", "args"]).stdout


def test_keep_background_survives_until_reset(sandbox):
    sandbox.exec("nohup sleep 120 >/dev/null 2>&1 &", keep_background=True)
    assert sandbox.exec("pgrep -c sleep").stdout.strip() == "1"
    assert sandbox.exec("sleep 0.1").exit_code == 0  # a later exec does not kill it
    assert sandbox.exec("pgrep -c sleep").stdout.strip() == "1"


def test_factory_errors():
    with pytest.raises(SandboxError, match="unknown sandbox backend"):
        make_sandbox("podman")
    with pytest.raises(SandboxError, match="unknown option"):
        make_sandbox("bwrap", colour="red")
    with pytest.raises(SandboxError, match="limits"):
        make_sandbox("bwrap", limits={"memory_gb": 1})
    with pytest.raises(ValueError, match="memory_mb"):
        Limits(memory_mb=0)


@pytest.mark.parametrize("n", [0, 999, 1000, 1001, 250_000])
def test_output_cap_is_exact(backend, n):
    """Oracle: the first max_output_bytes bytes, then a marker naming exactly how many were dropped."""
    cap = 1000
    with make_sandbox(backend, limits=Limits(max_output_bytes=cap)) as sb:
        r = sb.exec(
            ["python3", "-c", f"import sys; sys.stdout.write('a' * {n}); sys.stderr.write('b' * {n})"]
        )
    marker = f"\n[... output truncated by m2rl: {n - cap} more bytes not shown ...]\n" if n > cap else ""
    assert r.stdout == "a" * min(n, cap) + marker
    assert r.stderr == "b" * min(n, cap) + marker
    assert r.truncated == (n > cap) and r.exit_code == 0


def test_reset_undoes_sneaky_changes(sandbox):
    """The incremental reset must not trust metadata: every kind of change below is undone."""
    sandbox.exec(
        "mkdir -p /work/repo/sub /work/locked && cd /work/repo && echo original > a.txt && echo keep > b.txt"
        " && ln -s a.txt link && echo inner > sub/c.txt && echo secret > /work/locked/f && chmod 555 sub"
    )
    sandbox.checkpoint()
    listing = "find /work -printf '%p %y %m %s %l\\n' | sort; find /work -type f -exec md5sum {} + | sort"
    before = sandbox.exec(listing).stdout
    sneaky = (
        "cd /work/repo"
        " && cp -p a.txt /tmp/ref && echo Modified > a.txt && touch -r /tmp/ref a.txt"  # same size and mtime
        " && python3 -c \"import mmap; f=open('b.txt','r+b'); m=mmap.mmap(f.fileno(),0); m[0:1]=b'K'\""
        " && ln -sf b.txt link && chmod 755 sub && rm sub/c.txt && mkdir sub/c.txt"
        " && chmod 000 /work/locked && mkdir -p /work/new/deep && echo x > /work/new/deep/y"
    )
    r = sandbox.exec(sneaky)
    assert r.exit_code == 0, r
    assert sandbox.exec(listing).stdout != before
    sandbox.reset()
    assert sandbox.exec(listing).stdout == before


def test_kill_processes_leaves_only_the_executor(sandbox):
    """Kept background sessions too (a python interpreter, a nohup loop): grading starts after this."""
    sandbox.exec("nohup sh -c 'while :; do sleep 0.01; done' >/dev/null 2>&1 &", keep_background=True)
    sandbox.exec("python3 -c 'import time; time.sleep(300)' >/dev/null 2>&1 &", keep_background=True)
    assert "sleep(300)" in sandbox.exec(["ps", "-eo", "args"]).stdout
    sandbox.kill_processes()
    # ps and nothing else besides the executor: no survivor, no zombie.
    assert sandbox.exec(["ps", "-eo", "pid=,stat=,args="]).stdout.count("\n") == 2
    assert sandbox.exec("echo alive").stdout == "alive\n"


def test_read_file_bound(sandbox):
    sandbox.write_file("/work/blob", b"x" * 1000)
    assert sandbox.read_file("/work/blob", max_bytes=1000) == b"x" * 1000
    with pytest.raises(SandboxError, match=r"/work/blob has 1000 bytes, more than the 999 bytes"):
        sandbox.read_file("/work/blob", max_bytes=999)
    with pytest.raises(SandboxError, match="max_bytes"):
        sandbox.read_file("/work/blob", max_bytes=0)
    status = sandbox.read_file("/proc/1/status", max_bytes=1 << 20)  # no size in stat: the bound still holds
    assert status.startswith(b"Name:")
    with pytest.raises(SandboxError, match="more than 10 bytes"):
        sandbox.read_file("/proc/1/status", max_bytes=10)
