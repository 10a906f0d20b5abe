"""The executor that runs INSIDE every sandbox (Docker and bubblewrap): one long-lived Python process.

It is started once per sandbox as PID 1 of the sandbox's PID namespace, connects to a unix socket the host
listens on (a bind-mounted directory), and serves framed requests: exec, read, write, tar, untar, kill,
reset, checkpoint, ping. One process per sandbox instead of one `docker exec` per call is what makes an
exec round trip cost a fork+exec rather than an engine API call.

Everything under the writable directories is the agent's: the file operations trust none of it (see
`executor_files.py`, the file-system half: safe file access, snapshots and restore, tar), and the executor
caps its own memory (`bound_own_memory`).

Being PID 1 matters: the kernel ignores SIGKILL/SIGTERM sent to a namespace's init from inside it, so a
command cannot kill the executor, and `kill(-1, SIGKILL)` from init kills every other process of the sandbox
in one atomic sweep (fork bombs included), which is how timeouts and clean-ups kill whole process trees.

Stdlib only; runs under the sandbox's own python3 (3.9+), from a read-only directory that holds it and
`executor_files.py` (`sandbox.stage_executor`). The host side of the protocol is channel.py.
Frame: 4-byte big-endian header length, JSON header, then header["n"] raw payload bytes.
"""

import json
import os
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

if __package__:  # imported on the host, as m2rl.sandboxes.executor
    from . import executor_files as files
else:  # run as a script inside the sandbox: `python3 -I` puts no directory of ours on sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import executor_files as files

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
WATCHDOG_PERIOD_S = 0.02
TRUNCATION_MARKER = "\n[... output truncated by m2rl: {omitted} more bytes not shown ...]\n"
DEFAULT_MAX_TRANSFER = 64 << 20  # bytes one read or download returns when the host names no bound
MAX_ROOT_BYTES = 2 << 30  # what one writable root counts for when it is not a size-limited mount
EXECUTOR_BASE_BYTES = 256 << 20  # the interpreter, its threads' stacks and exec buffers


SIGNAL_HINTS = {
    signal.SIGXFSZ: " (file size limit reached)",
    signal.SIGXCPU: " (CPU time limit reached)",
    signal.SIGKILL: " (possibly out of memory)",
    signal.SIGSEGV: " (segmentation fault)",
}


# ---- protocol framing and messages --------------------------------------------------------------------
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
    if len(payload) < 65536:  # one syscall for small replies; no copy of large ones
        sock.sendall(struct.pack(">I", len(data)) + data + bytes(payload))
    else:
        sock.sendall(struct.pack(">I", len(data)) + data)
        sock.sendall(payload)


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


class Executor:
    """Serves the host's requests inside one sandbox: runs commands, reads and writes files, snapshots and
    restores the writable roots. One instance per sandbox, in its PID 1 (`main`)."""

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
        # What one request may make the executor hold: a snapshot of the writable roots, one transfer.
        # Both fit the sandbox's memory too: the executor is charged to its cgroup (and tmpfs files are,
        # so a snapshot of them gets at most half).
        sizes = root_sizes(self.roots, config.get("disk_bytes"))
        memory = sandbox_memory(config)
        self.snapshot_budget = sum(sizes) if memory is None else min(sum(sizes), memory // 2)
        self.max_transfer = int(config.get("max_transfer_bytes") or DEFAULT_MAX_TRANSFER)
        self.largest_payload = max(sizes + [self.max_transfer])  # a read, a download, or a write's payload
        if memory is not None:
            self.largest_payload = min(self.largest_payload, memory)
        self.child_rlimits = {}  # limits the executor holds tighter than its commands: undone after spawn

    def bound_own_memory(self):
        """Cap the executor's own heap and private mappings (RLIMIT_DATA) by what its bounded requests can
        need: the snapshot (twice while a new one replaces it), a few payloads, the interpreter. A bug that
        reads without end then ends in a MemoryError reported to the host, instead of eating the host's
        memory (bwrap) or getting the sandbox OOM-killed (docker). Only the soft limit is lowered, so
        `limit_child` can give commands the original back."""
        need = EXECUTOR_BASE_BYTES + 2 * self.snapshot_budget + 3 * self.largest_payload
        soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            need = min(need, hard)
        if soft != resource.RLIM_INFINITY and soft <= need:
            return
        resource.setrlimit(resource.RLIMIT_DATA, (need, hard))
        self.child_rlimits[resource.RLIMIT_DATA] = (soft, hard)

    # ---- processes -------------------------------------------------------------------------------
    def limit_child(self, pid):
        """Applied right after spawn (not in a preexec hook, which would force a slow fork over vfork):
        make the command the OOM killer's first choice and cap its memory and CPU time."""
        try:
            with open("/proc/%d/oom_score_adj" % pid, "w") as f:
                f.write("1000")
        except OSError:
            pass
        for limit, values in self.child_rlimits.items():
            try:
                resource.prlimit(pid, limit, values)
            except (ValueError, OSError):
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

    def kill_processes(self):
        """Every process of the sandbox gone, kept background sessions included: only the executor is left."""
        self.kill_all(keep_protected=False)
        left = [pid for pid, _ in self.sessions()]
        if left:
            raise RuntimeError("%d processes survived SIGKILL: %s" % (len(left), left[:10]))

    def exec(self, req, stdin):
        """Run one command (see `Command`) and reply with its exit code and output."""
        command = Command(self, req, stdin)
        if not command.spawn():
            return command.start_failure()
        command.pump()
        command.stop()
        return command.reply()

    # ---- files -------------------------------------------------------------------------------------
    def take_snapshot(self):
        """Remember /work, /tmp and $HOME (contents in memory) as the state `restore()` returns to."""
        self.snapshot = files.take_snapshot(self.roots, self.snapshot_budget)

    def restore(self):
        """Back to the snapshot: no process left, no IPC object, the writable roots as they were."""
        self.kill_all(keep_protected=False)  # from here on nothing in the sandbox changes under our feet
        remove_ipc_objects()
        files.restore_snapshot(self.snapshot)

    # ---- requests ----------------------------------------------------------------------------------
    def handle(self, req, payload):
        op = req.get("op")
        if op == "ping":
            return {"pid": os.getpid()}, b""
        if op == "exec":
            return self.exec(req, payload)
        if op == "read":
            return {}, files.read_file(req["path"], int(req.get("max_bytes") or self.max_transfer))
        if op == "write":
            path = req["path"]
            if req.get("parents", True) and os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            files.write_file(path, payload, req.get("mode"))
            return {}, b""
        if op == "tar":  # download: a tar of one path, named by its basename
            return {}, files.tar_path(req["path"], int(req.get("max_bytes") or self.max_transfer))
        if op == "untar":  # upload: unpack into a directory
            os.makedirs(req["path"], exist_ok=True)
            fd = os.open(req["path"], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                files.extract_tar(payload, fd, rename_top=req.get("top"))
            finally:
                os.close(fd)
            return {}, b""
        if op == "kill":
            self.kill_processes()
            return {}, b""
        if op == "reset":
            self.restore()
            return {}, b""
        if op == "checkpoint":
            self.take_snapshot()
            return {"bytes": self.snapshot.bytes}, b""
        raise ValueError("unknown op %r" % op)


class Command:
    """One `exec` request from spawn to reply; `Executor.exec` runs its steps in order:

    - `spawn`: start the command in its own session, limited (`Executor.limit_child`), its pipes watched;
    - `pump`: feed stdin, read stdout and stderr (keeping `max_output` bytes of each) until the command has
      exited and its pipes are closed, or the executor ends it (`killed_for`): past its deadline, past
      `max_drain` bytes of output, or past the sandbox's memory (`memory_watchdog`, without a cgroup);
    - `stop`: kill what must not outlive it, collect its status and what it wrote last;
    - `reply`: the header and stdout + stderr, with notes telling the model what the sandbox did.
    """

    def __init__(self, executor, req, stdin):
        self.executor = executor
        self.argv = req["argv"]
        self.timeout = float(req.get("timeout", 30.0))
        self.max_output = int(req.get("max_output", 128 * 1024))  # bytes kept of stdout, and of stderr
        self.max_drain = int(req.get("max_drain", 64 << 20))  # bytes read in all before the command is killed
        self.keep_background = bool(req.get("keep_background"))  # its background processes survive it
        self.cwd = req.get("cwd") or "/work"
        self.env = dict(executor.default_env)
        self.env.update(req.get("env") or {})
        self.stdin = stdin
        self.start = time.monotonic()
        self.deadline = self.start + self.timeout
        self.next_watch = self.start + WATCHDOG_PERIOD_S  # commands shorter than one period never pay for a scan
        self.proc = None
        self.failure = ""  # why spawn failed
        self.selector = selectors.DefaultSelector()
        self.pidfd = -1
        self.kept = {}  # stdout fd, stderr fd -> the first max_output bytes read from it
        self.seen = {}  # the same fds -> bytes read from it
        self.pending = memoryview(stdin) if stdin else None  # stdin not yet written
        self.exited = False  # the command's own process has exited and its status is collected
        self.exit_code = -9
        self.killed_for = None  # "timeout" | "flood" | "memory": why the executor ended the command
        self.duration = 0.0

    # ---- steps
    def spawn(self):
        """Start the command; False when it cannot start (`start_failure` is the reply)."""
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.PIPE if self.stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            self.failure = "m2rl: cannot start %r: %s\n" % (self.argv[0] if self.argv else self.argv, exc)
            self.selector.close()
            return False
        self.executor.limit_child(self.proc.pid)
        for stream in (self.proc.stdout, self.proc.stderr):
            fd = stream.fileno()
            self.kept[fd], self.seen[fd] = bytearray(), 0
            os.set_blocking(fd, False)
            self.selector.register(fd, selectors.EVENT_READ)
        self.pidfd = os.pidfd_open(self.proc.pid)  # readable once the process exits
        self.selector.register(self.pidfd, selectors.EVENT_READ)
        if self.pending is not None:
            os.set_blocking(self.proc.stdin.fileno(), False)
            self.selector.register(self.proc.stdin.fileno(), selectors.EVENT_WRITE)
        return True

    def start_failure(self):
        return {
            "exit_code": 127,
            "timed_out": False,
            "truncated": False,
            "stdout_n": 0,
            "duration_s": time.monotonic() - self.start,
        }, self.failure.encode()

    def pump(self):
        """Move bytes until the command is done, or set `killed_for` and return."""
        while not self.exited or self.pipes_open():
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                self.killed_for = "timeout"
                return
            # After the main process exits, kept background processes may hold the pipes open forever:
            # then only drain what is already buffered.
            wait = 0 if (self.exited and self.keep_background) else remaining
            if self.executor.memory_watchdog:
                wait = min(wait, WATCHDOG_PERIOD_S)
                if self.memory_exceeded():
                    self.killed_for = "memory"
                    return
            events = self.selector.select(wait)
            if self.exited and self.keep_background and not events:
                return
            for key, mask in events:
                self.on_event(key.fd, mask)
            if sum(self.seen.values()) > self.max_drain:
                self.killed_for = "flood"
                return

    def stop(self):
        """Kill what must not outlive the command, collect its status and its last output, release its fds."""
        if self.killed_for == "memory":
            self.executor.kill_all(keep_protected=False)  # background processes count towards the limit too
        elif self.killed_for or not self.keep_background:
            self.executor.kill_all(keep_protected=True)
        if self.proc.stdin and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        if not self.exited:
            self.proc.wait()  # killed above (timeout or flood); its status is reported as -9
        self.duration = time.monotonic() - self.start
        if self.keep_background and not self.killed_for:
            self.executor.protected_sessions.add(self.proc.pid)
        for fd in self.kept:  # whatever the killed processes wrote last, without blocking
            while self.is_watched(fd) and sum(self.seen.values()) <= self.max_drain and select_ready(fd):
                if not self.read(fd):
                    break
        if self.keep_background and not self.killed_for:
            # Kept processes may still write to the command's pipes: drain them in the background, so
            # a server started with a plain `&` does not die of SIGPIPE on its first print.
            for fd in self.kept:
                if self.is_watched(fd):
                    threading.Thread(target=discard_until_eof, args=(os.dup(fd),), daemon=True).start()
        self.selector.close()
        os.close(self.pidfd)
        self.proc.stdout.close()
        self.proc.stderr.close()

    def reply(self):
        """(header, stdout + stderr): each stream cut to max_output with a marker saying how much more there
        was, and a note on stderr when the sandbox ended the command or a signal did."""
        stdout, stderr = (self.output(fd) for fd in self.kept)  # stdout first, then stderr
        truncated = any(self.seen[fd] > len(self.kept[fd]) for fd in self.kept)
        return {
            "exit_code": -9 if self.killed_for else self.exit_code,
            "timed_out": self.killed_for == "timeout",
            "truncated": truncated or self.killed_for == "flood",
            "stdout_n": len(stdout),
            "duration_s": self.duration,
        }, stdout + stderr + self.notes()

    # ---- helpers of the steps
    def pipes_open(self):
        return any(self.is_watched(fd) for fd in self.kept)

    def is_watched(self, fd):
        return fd in self.selector.get_map()

    def memory_exceeded(self):
        """Whether the sandbox's processes hold more memory than the watchdog allows (scanned once a period)."""
        now = time.monotonic()
        if now < self.next_watch:
            return False
        self.next_watch = now + WATCHDOG_PERIOD_S
        return self.executor.resident_bytes() > self.executor.memory_watchdog

    def on_event(self, fd, mask):
        if fd == self.pidfd:
            self.collect_exit()
        elif mask & selectors.EVENT_WRITE:
            self.feed_stdin(fd)
        elif not self.read(fd):
            self.selector.unregister(fd)

    def collect_exit(self):
        self.exited = True
        self.selector.unregister(self.pidfd)
        self.exit_code = self.proc.wait()  # collect the status before any clean-up reaps it
        if not self.keep_background:
            # Leftovers (`sleep 100 &`) hold the pipes open: kill them so the pipes reach EOF.
            self.executor.kill_all(keep_protected=True)

    def feed_stdin(self, fd):
        try:
            self.pending = self.pending[os.write(fd, self.pending[: 1 << 16]) :]
        except BlockingIOError:
            return
        except BrokenPipeError:
            self.pending = self.pending[:0]  # the command will read no more: drop the rest
        if not len(self.pending):
            self.selector.unregister(fd)
            self.proc.stdin.close()

    def read(self, fd):
        """Read what `fd` has (keeping what fits in max_output); False at end of file."""
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        self.seen[fd] += len(chunk)
        room = self.max_output - len(self.kept[fd])
        if room > 0:
            self.kept[fd] += chunk[:room]
        return True

    def output(self, fd):
        data = bytes(self.kept[fd])
        if self.seen[fd] > len(data):
            data += TRUNCATION_MARKER.format(omitted=self.seen[fd] - len(data)).encode()
        return data

    def notes(self):
        if self.killed_for == "timeout":
            return note("timed out after %gs; every process of the command was killed" % self.timeout)
        if self.killed_for == "flood":
            return note("command killed after writing more than %d bytes of output" % self.max_drain)
        if self.killed_for == "memory":
            mb = self.executor.memory_watchdog >> 20
            return note("killed: the sandbox's processes used more than %d MB of memory" % mb)
        if self.exit_code < 0:
            signum = -self.exit_code
            return note("command killed by %s%s" % (signal_name(signum), SIGNAL_HINTS.get(signum, "")))
        return b""


# ---- process and memory helpers ---------------------------------------------------------------------
IPC_RMID = 0
# /proc/sysvipc file -> the libc call that removes one of its objects (semctl takes a semaphore index).
SYSV_IPC = (("shm", "shmctl"), ("msg", "msgctl"), ("sem", "semctl"))


def remove_ipc_objects():
    """SysV shared memory, message queues and semaphores and POSIX message queues live in the sandbox's
    IPC namespace, not in any directory a reset restores: remove every one, so nothing an episode made
    survives into the next (and no segment keeps holding memory)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for table, call in SYSV_IPC:
        try:
            with open("/proc/sysvipc/" + table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) < 2:
                continue
            ipc_id = int(fields[1])
            if call == "semctl":
                libc.semctl(ipc_id, 0, IPC_RMID)
            else:
                libc[call](ipc_id, IPC_RMID, None)
    try:
        names = os.listdir("/dev/mqueue")
    except OSError:
        return
    for name in names:
        try:
            os.unlink(os.path.join("/dev/mqueue", name))
        except OSError:
            pass


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


def sandbox_memory(config):
    """The sandbox's memory limit in bytes, or None: the configured one, else its cgroup's (v2, then v1),
    else the per-command address-space limit."""
    if config.get("memory_bytes"):
        return int(config["memory_bytes"])
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 1 << 60:  # "max" or a huge number: no limit there
            return int(value)
    value = config.get("rlimits", {}).get("RLIMIT_AS") or config.get("memory_watchdog_bytes")
    return int(value) if value else None


def root_sizes(roots, disk_bytes=None):
    """Bytes each writable root can hold: the configured disk limit, else its mount's size (capped: a root
    that is not a size-limited tmpfs reports the whole disk)."""
    if disk_bytes:
        return [int(disk_bytes)] * len(roots)
    sizes = []
    for root in roots:
        try:
            fs = os.statvfs(root)
            sizes.append(min(fs.f_blocks * fs.f_frsize, MAX_ROOT_BYTES))
        except OSError:
            sizes.append(MAX_ROOT_BYTES)
    return sizes


# ---- start-up -----------------------------------------------------------------------------------------
def seed_roots(roots, seed_root):
    """An image places the initial files of a writable root R under seed_root + R: each root is a fresh
    tmpfs that hides the image's own R. A root already holding files (a restarted executor) is left as is."""
    for root in roots:
        seed_dir = seed_root + root
        if not os.path.isdir(seed_dir) or not os.path.isdir(root) or os.listdir(root):
            continue
        for name in os.listdir(seed_dir):
            src, dst = os.path.join(seed_dir, name), os.path.join(root, name)
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
    seed_roots(config["writable_roots"], config.get("seed_root", "/opt/m2rl/seed"))
    executor = Executor(config)
    executor.bound_own_memory()
    executor.take_snapshot()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(config["socket"])
    send(sock, {"op": "hello", "pid": os.getpid()})
    while True:
        try:
            req, payload = recv(sock)
        except (EOFError, ConnectionError):
            break  # the host went away: exiting as PID 1 tears the whole sandbox down
        try:
            header, data = executor.handle(req, payload)
            header["ok"] = True
        except Exception as exc:  # every failure goes back to the host as a message, never kills us
            header, data = {"ok": False, "error": "%s: %s" % (type(exc).__name__, exc)}, b""
        executor.reap()
        send(sock, header, data)


if __name__ == "__main__":
    main()
