"""The executor that runs INSIDE every sandbox (Docker and bubblewrap): one long-lived Python process.

It is started once per sandbox as PID 1 of the sandbox's PID namespace, connects to a unix socket the host
listens on (a bind-mounted directory), and serves framed requests: exec, read, write, tar, untar, reset,
checkpoint, ping. One process per sandbox instead of one `docker exec` per call is what makes an exec round
trip cost a fork+exec rather than an engine API call.

Being PID 1 matters: the kernel ignores SIGKILL/SIGTERM sent to a namespace's init from inside it, so a
command cannot kill the executor, and `kill(-1, SIGKILL)` from init kills every other process of the sandbox
in one atomic sweep (fork bombs included), which is how timeouts and clean-ups kill whole process trees.

Stdlib only; runs under the sandbox's own python3 (3.9+). The host side of the protocol is channel.py.
Frame: 4-byte big-endian header length, JSON header, then header["n"] raw payload bytes.
"""

import io
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
WATCHDOG_PERIOD_S = 0.02
TRUNCATION_MARKER = "\n[... output truncated by m2rl: {omitted} more bytes not shown ...]\n"


SIGNAL_HINTS = {
    signal.SIGXFSZ: " (file size limit reached)",
    signal.SIGXCPU: " (CPU time limit reached)",
    signal.SIGKILL: " (possibly out of memory)",
    signal.SIGSEGV: " (segmentation fault)",
}


def signal_name(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "signal %d" % signum


def note(text):
    """A line appended to stderr that tells the model what the sandbox did to its command."""
    return ("\n[m2rl: %s]\n" % text).encode()


def send(sock, header, payload=b""):
    header = dict(header, n=len(payload))
    data = json.dumps(header).encode()
    sock.sendall(struct.pack(">I", len(data)) + data + payload)


def recv_exact(sock, n):
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise EOFError("host closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv(sock):
    (size,) = struct.unpack(">I", recv_exact(sock, 4))
    header = json.loads(recv_exact(sock, size))
    return header, recv_exact(sock, header.get("n", 0))


class Agent:
    def __init__(self, config):
        self.roots = config["writable_roots"]  # directories whose contents reset() restores
        self.rlimits = config.get("rlimits", {})  # name -> value, set on every command right after spawn
        # Without a memory cgroup (bwrap) the sandbox's total resident memory is polled during exec.
        self.memory_watchdog = config.get("memory_watchdog_bytes")
        # The image's own environment (Docker ENV; empty under bwrap's --clearenv) wins over the defaults.
        self.default_env = dict(
            config.get("env", {}), **{k: v for k, v in os.environ.items() if k != "HOSTNAME"}
        )
        self.protected_sessions = set()  # sessions of keep_background execs: survive clean-ups until reset
        self.snapshot = None

    # ---- processes -------------------------------------------------------------------------------
    def limit_child(self, pid):
        """Applied right after spawn (not in a preexec hook, which would force a slow fork over vfork):
        make the command the OOM killer's first choice and cap its memory and CPU time."""
        try:
            with open("/proc/%d/oom_score_adj" % pid, "w") as f:
                f.write("1000")
        except OSError:
            pass
        for name, value in self.rlimits.items():
            try:
                resource.prlimit(pid, getattr(resource, name), (value, value))
            except (ValueError, OSError):
                pass

    def resident_bytes(self):
        total = 0
        for pid, _ in self.sessions():
            try:
                with open("/proc/%d/statm" % pid) as f:
                    total += int(f.read().split()[1]) * PAGE_SIZE
            except (OSError, IndexError, ValueError):
                pass
        return total

    def reap(self):
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def sessions(self):
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != me:
                try:
                    with open("/proc/%s/stat" % entry) as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if fields[0] != "Z":
                    yield int(entry), int(fields[3])  # pid, session id

    def kill_all(self, keep_protected):
        """Kill every process of the sandbox except this one (and protected sessions when asked)."""
        if keep_protected and self.protected_sessions:
            alive = {sid for _, sid in self.sessions()}
            self.protected_sessions &= alive
        if os.getpid() != 1:
            # kill(-1) outside a PID namespace would kill every process of this user on the host.
            raise RuntimeError("the executor only kills processes as PID 1 of a sandbox")
        if not (keep_protected and self.protected_sessions):
            self.protected_sessions.clear()
            for _ in range(1000):
                try:
                    os.kill(-1, signal.SIGKILL)  # atomic sweep of the namespace; init (us) is exempt
                except ProcessLookupError:
                    break
                self.reap()
                time.sleep(0.001)
            self.reap()
            return
        for _ in range(200):
            victims = [pid for pid, sid in self.sessions() if sid not in self.protected_sessions]
            if not victims:
                break
            for pid in victims:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.reap()
        else:  # never converged (a fork bomb racing the scan): fall back to killing everything
            self.kill_all(keep_protected=False)
        self.reap()

    def exec(self, req, stdin):
        argv = req["argv"]
        timeout = float(req.get("timeout", 30.0))
        max_out = int(req.get("max_output", 128 * 1024))
        max_drain = int(req.get("max_drain", 64 << 20))
        env = dict(self.default_env)
        env.update(req.get("env") or {})
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=req.get("cwd") or "/work",
                env=env,
                start_new_session=True,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            msg = "m2rl: cannot start %r: %s\n" % (argv[0] if argv else argv, exc)
            return {
                "exit_code": 127,
                "timed_out": False,
                "truncated": False,
                "stdout_n": 0,
                "duration_s": time.monotonic() - start,
            }, msg.encode()
        self.limit_child(proc.pid)
        bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
        seen = {fd: 0 for fd in bufs}
        sel = selectors.DefaultSelector()
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        pidfd = os.pidfd_open(proc.pid)
        sel.register(pidfd, selectors.EVENT_READ)
        pending = memoryview(stdin) if stdin else None
        if pending is not None:
            os.set_blocking(proc.stdin.fileno(), False)
            sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
        deadline = start + timeout
        keep_background = bool(req.get("keep_background"))
        timed_out = flooded = exited = over_memory = False
        next_watch = start + WATCHDOG_PERIOD_S  # commands shorter than one period never pay for a scan
        code = -9

        def read_fd(fd):
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                return True
            if not chunk:
                return False
            seen[fd] += len(chunk)
            room = max_out - len(bufs[fd])
            if room > 0:
                bufs[fd] += chunk[:room]
            return True

        while not exited or any(fd in sel.get_map() for fd in bufs):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            # After the main process exits, kept background processes may hold the pipes open forever:
            # then only drain what is already buffered.
            wait = 0 if (exited and keep_background) else remaining
            if self.memory_watchdog:
                wait = min(wait, WATCHDOG_PERIOD_S)
                if time.monotonic() >= next_watch:
                    next_watch = time.monotonic() + WATCHDOG_PERIOD_S
                    if self.resident_bytes() > self.memory_watchdog:
                        over_memory = True
                        break
            events = sel.select(wait)
            if exited and keep_background and not events:
                break
            for key, mask in events:
                fd = key.fd
                if fd == pidfd:
                    exited = True
                    sel.unregister(pidfd)
                    code = proc.wait()  # collect the status before any clean-up reaps it
                    if not keep_background:
                        # Leftovers (`sleep 100 &`) hold the pipes open: kill them so the pipes reach EOF.
                        self.kill_all(keep_protected=True)
                elif mask & selectors.EVENT_WRITE:
                    try:
                        pending = pending[os.write(fd, pending[: 1 << 16]) :]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not len(pending):
                        sel.unregister(fd)
                        proc.stdin.close()
                elif not read_fd(fd):
                    sel.unregister(fd)
            if sum(seen.values()) > max_drain:
                flooded = True
                break
        if over_memory:
            self.kill_all(keep_protected=False)  # background processes count towards the limit too
        elif timed_out or flooded or not keep_background:
            self.kill_all(keep_protected=True)
        if proc.stdin and not proc.stdin.closed:
            try:
                proc.stdin.close()
            except OSError:
                pass
        if not exited:
            proc.wait()  # killed above (timeout or flood); its status is reported as -9
        duration = time.monotonic() - start
        if keep_background and not (timed_out or flooded):
            self.protected_sessions.add(proc.pid)
        for fd in bufs:  # whatever the killed processes wrote last, without blocking
            while fd in sel.get_map() and sum(seen.values()) <= max_drain and select_ready(fd):
                if not read_fd(fd):
                    break
        if keep_background and not (timed_out or flooded or over_memory):
            # Kept processes may still write to the command's pipes: drain them in the background, so
            # a server started with a plain `&` does not die of SIGPIPE on its first print.
            for fd in bufs:
                if fd in sel.get_map():
                    threading.Thread(target=discard_until_eof, args=(os.dup(fd),), daemon=True).start()
        sel.close()
        os.close(pidfd)
        proc.stdout.close()
        proc.stderr.close()
        truncated = False
        outs = []
        for fd in bufs:  # stdout first, then stderr
            data = bytes(bufs[fd])
            if seen[fd] > len(data):
                truncated = True
                data += TRUNCATION_MARKER.format(omitted=seen[fd] - len(data)).encode()
            outs.append(data)
        if timed_out:
            outs[1] += note("timed out after %gs; every process of the command was killed" % timeout)
        elif code < 0 and not flooded and not over_memory:
            outs[1] += note("command killed by %s%s" % (signal_name(-code), SIGNAL_HINTS.get(-code, "")))
        if over_memory:
            mb = self.memory_watchdog >> 20
            outs[1] += note("killed: the sandbox's processes used more than %d MB of memory" % mb)
        if flooded:
            outs[1] += note("command killed after writing more than %d bytes of output" % max_drain)
        return {
            "exit_code": -9 if (timed_out or flooded or over_memory) else code,
            "timed_out": timed_out,
            "truncated": truncated or flooded,
            "stdout_n": len(outs[0]),
            "duration_s": duration,
        }, outs[0] + outs[1]

    # ---- files -------------------------------------------------------------------------------------
    def take_snapshot(self):
        self.root_modes = {root: stat.S_IMODE(os.stat(root).st_mode) for root in self.roots}
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for root in self.roots:
                for name in sorted(os.listdir(root)):
                    tar.add(os.path.join(root, name), arcname=os.path.join(root, name).lstrip("/"))
        self.snapshot = buf.getvalue()
        self.snapshot_tar = tarfile.open(fileobj=io.BytesIO(self.snapshot), mode="r")
        self.members = {"/" + m.name: m for m in self.snapshot_tar.getmembers()}

    def restore(self):
        """Back to the snapshot, touching only what differs: a reset after a small edit to a big checkout
        costs a read-and-compare of the checkout, not a delete-and-rewrite of it. Contents are compared
        byte for byte (not by mtime/ctime, which a command can preserve, e.g. through a shared mmap)."""
        self.kill_all(keep_protected=False)
        for root in self.roots:
            if os.stat(root).st_uid == os.getuid():
                os.chmod(root, 0o700)  # a command may have chmod-ed the root itself
            self.prune(root)
        dirs = []
        for path, m in self.members.items():
            if m.isdir():
                dirs.append(m)  # modes last: a read-only directory must not block restoring its contents
                if not os.path.lexists(path):
                    os.mkdir(path, 0o700)
            elif not os.path.lexists(path):
                self.snapshot_tar.extract(m, "/", set_attrs=True, numeric_owner=False)
            elif not m.issym():
                st = os.lstat(path)
                if stat.S_IMODE(st.st_mode) != m.mode:
                    os.chmod(path, m.mode)
                if int(st.st_mtime) != int(m.mtime):
                    os.utime(path, (m.mtime, m.mtime))
        for m in reversed(dirs):
            os.chmod("/" + m.name, m.mode)
            os.utime("/" + m.name, (m.mtime, m.mtime))
        for root in self.roots:
            if os.stat(root).st_uid == os.getuid():
                os.chmod(root, self.root_modes[root])

    def prune(self, directory):
        """Delete everything under `directory` that is not exactly as in the snapshot."""
        try:
            names = os.listdir(directory)
        except PermissionError:
            os.chmod(directory, 0o700)
            names = os.listdir(directory)
        for name in names:
            path = os.path.join(directory, name)
            m = self.members.get(path)
            st = os.lstat(path)
            if m is None:
                remove(path)
            elif m.isdir():
                if stat.S_ISDIR(st.st_mode):
                    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
                        os.chmod(path, 0o700)
                    self.prune(path)
                else:
                    remove(path)
            elif m.isfile():
                if not stat.S_ISREG(st.st_mode) or st.st_size != m.size or not self.same_content(path, m):
                    remove(path)
            elif m.issym():
                if not stat.S_ISLNK(st.st_mode) or os.readlink(path) != m.linkname:
                    remove(path)
            else:
                remove(path)

    def same_content(self, path, member):
        try:
            if not os.access(path, os.R_OK):
                os.chmod(path, 0o600)
            with open(path, "rb") as f:
                data = f.read(member.size + 1)
        except OSError:
            return False
        return data == self.snapshot[member.offset_data : member.offset_data + member.size]  # memcmp

    def handle(self, req, payload):
        op = req.get("op")
        if op == "ping":
            return {"pid": os.getpid()}, b""
        if op == "exec":
            return self.exec(req, payload)
        if op == "read":
            with open(req["path"], "rb") as f:
                return {}, f.read()
        if op == "write":
            path = req["path"]
            if req.get("parents", True) and os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(payload)
            if req.get("mode") is not None:
                os.chmod(path, req["mode"])
            return {}, b""
        if op == "tar":  # download: a tar of one path, named by its basename
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as tar:
                tar.add(req["path"], arcname=os.path.basename(req["path"].rstrip("/")) or ".")
            return {}, buf.getvalue()
        if op == "untar":  # upload: unpack into a directory
            os.makedirs(req["path"], exist_ok=True)
            with tarfile.open(fileobj=io.BytesIO(payload), mode="r") as tar:
                extract(tar, req["path"])
            return {}, b""
        if op == "reset":
            self.restore()
            return {}, b""
        if op == "checkpoint":
            self.take_snapshot()
            return {"bytes": len(self.snapshot)}, b""
        raise ValueError("unknown op %r" % op)


def discard_until_eof(fd):
    os.set_blocking(fd, True)
    try:
        while os.read(fd, 1 << 16):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def select_ready(fd):
    import select

    return bool(select.select([fd], [], [], 0)[0])


def remove(path):
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=_force)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _force(func, path, _exc):
    # A command may have chmod-ed a directory to 000; we own it, so restore write access and retry.
    try:
        os.chmod(os.path.dirname(path) or "/", 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
            shutil.rmtree(path, onerror=_force)
        else:
            func(path)
    except FileNotFoundError:
        pass


def extract(tar, dest):
    members = []
    for m in tar.getmembers():
        if m.name.startswith("/") or ".." in m.name.split("/"):
            raise ValueError("unsafe path in archive: %r" % m.name)
        if m.isdev():
            continue
        m.uid = m.gid = os.getuid()
        members.append(m)
    tar.extractall(dest, members=members, numeric_owner=True)


def seed_work(seed_dir):
    """Derived images place files for /work in seed_dir: /work is a fresh tmpfs that hides the image's."""
    if os.path.isdir(seed_dir) and os.path.isdir("/work") and not os.listdir("/work"):
        for name in os.listdir(seed_dir):
            src, dst = os.path.join(seed_dir, name), os.path.join("/work", name)
            if os.path.isdir(src) and not os.path.islink(src):
                shutil.copytree(src, dst, symlinks=True)
            else:
                shutil.copy2(src, dst, follow_symlinks=False)


def main():
    config = json.loads(sys.argv[1])
    # Nobody in the sandbox may ptrace the executor (same uid): not dumpable.
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except Exception:
        pass
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    # The kernel drops signals sent to a namespace's init from inside it unless init handles them, and
    # Python handles SIGINT (KeyboardInterrupt): swallow it. A handler, unlike SIG_IGN, resets at exec, so
    # commands still get the default SIGINT behaviour.
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    for root in config["writable_roots"]:
        os.makedirs(root, exist_ok=True)
    seed_work(config.get("seed_dir", "/opt/m2rl/seed/work"))
    agent = Agent(config)
    agent.take_snapshot()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(config["socket"])
    send(sock, {"op": "hello", "pid": os.getpid()})
    while True:
        try:
            req, payload = recv(sock)
        except (EOFError, ConnectionError):
            break  # the host went away: exiting as PID 1 tears the whole sandbox down
        try:
            header, data = agent.handle(req, payload)
            header["ok"] = True
        except Exception as exc:  # every failure goes back to the host as a message, never kills us
            header, data = {"ok": False, "error": "%s: %s" % (type(exc).__name__, exc)}, b""
        agent.reap()
        send(sock, header, data)


if __name__ == "__main__":
    main()
