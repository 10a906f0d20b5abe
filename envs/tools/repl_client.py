"""One `python` tool call, run INSIDE the sandbox by a short exec (stdlib only; see repl_server.py).

argv: DIR N TIMEOUT GRACE; stdin: the cell's source. Prints one JSON line {"status": "ok" | "error" |
"interrupted" | "killed" | "dead", "truncated": bool, "changed": [paths], "interrupted": bool}
and then the cell's raw output (not JSON-escaped, so its size stays within the exec's output limit).
On timeout it sends SIGINT (KeyboardInterrupt in the cell); if the cell ignores it for GRACE seconds
(a C loop that never checks signals, or code swallowing KeyboardInterrupt) the server is killed.
"""

import json
import os
import signal
import stat
import sys
import time

MAX_OUTPUT = 96 * 1024  # bytes; the exec keeps 128 KiB of stdout


def read_regular(path, limit):
    """At most `limit` bytes of the regular file `path`. A cell can replace the files of this directory:
    a link is not followed and a FIFO never waited on (OSError instead)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("%s is not a regular file" % path)
        chunks, got = [], 0
        while got < limit:
            chunk = os.read(fd, min(limit - got, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def changed_since(since_ns, root="/work", limit=200):
    """Files under `root` (the working directory) modified after `since_ns` (hidden paths skipped): the
    cell's writes."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.startswith(".") or len(out) >= limit:
                continue
            try:
                if os.lstat(path).st_mtime_ns > since_ns:
                    out.append(path)
            except OSError:
                pass
    return out


def main():
    directory, n, timeout, grace = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    workdir = sys.argv[5] if len(sys.argv) > 5 else "/work"
    code = sys.stdin.buffer.read()
    pid = None
    for _ in range(2500):  # a just-started server writes its pid within milliseconds
        try:
            pid = int(read_regular(os.path.join(directory, "pid"), 32))
            break
        except (OSError, ValueError):
            time.sleep(0.002)
    if pid is None or not alive(pid):
        print(json.dumps({"status": "dead", "truncated": False, "changed": [], "interrupted": False}))
        return
    # mtimes come from the kernel's coarse clock (one tick, a few ms): wait until a fresh write's mtime passes
    # the marker's, so every write of the cell is strictly newer than `since_ns` and nothing before it is.
    mark = os.path.join(directory, "mark-%d" % n)
    open(mark, "w").close()
    since_ns = os.stat(mark).st_mtime_ns
    while True:
        open(mark, "w").close()
        if os.stat(mark).st_mtime_ns > since_ns:
            break
        time.sleep(0.0005)
    tmp = os.path.join(directory, "req-%d.tmp" % n)
    with open(tmp, "wb") as f:
        f.write(code)
    os.rename(tmp, os.path.join(directory, "req-%d.py" % n))
    result = os.path.join(directory, "res-%d.json" % n)
    deadline = time.monotonic() + timeout
    interrupts = 0
    status = None
    while status is None:
        if os.path.exists(result):
            try:
                status = json.loads(read_regular(result, 4096))["status"]
            except (OSError, ValueError, KeyError, TypeError):
                status = "error"  # the cell replaced its own result file
            break
        if not alive(pid):
            status = "dead"
            break
        now = time.monotonic()
        if now > deadline:
            if interrupts >= 3:  # SIGINT was ignored for the whole grace period
                os.kill(pid, signal.SIGKILL)
                status = "killed"
                break
            os.kill(pid, signal.SIGINT)
            interrupts += 1
            deadline = now + grace / 3
        time.sleep(0.003)
    data = b""
    try:
        data = read_regular(os.path.join(directory, "out-%d.txt" % n), MAX_OUTPUT + 1)
    except OSError:
        pass
    truncated = len(data) > MAX_OUTPUT
    changed = changed_since(since_ns, workdir)
    for name in (
        "req-%d.py",
        "out-%d.txt",
        "res-%d.json",
        "mark-%d",
    ):  # a flood of output must not pile up in /tmp
        try:
            os.remove(os.path.join(directory, name % n))
        except OSError:
            pass
    header = json.dumps(
        {"status": status, "truncated": truncated, "changed": changed, "interrupted": interrupts > 0}
    )
    sys.stdout.buffer.write(header.encode() + b"\n" + data[:MAX_OUTPUT])
    sys.stdout.flush()


if __name__ == "__main__":
    main()
