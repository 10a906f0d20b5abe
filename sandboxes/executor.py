"""The executor that runs INSIDE every sandbox (Docker and bubblewrap): one long-lived Python process.

It is started once per sandbox as PID 1 of the sandbox's PID namespace, connects to a unix socket the host
listens on (a bind-mounted directory), and serves framed requests: exec, read, write, tar, untar, kill,
reset, checkpoint, ping. One process per sandbox instead of one `docker exec` per call is what makes an
exec round trip cost a fork+exec rather than an engine API call.

Everything under the writable directories is the agent's: the file operations below trust none of it (see
"file system access on the host's behalf"), and the executor caps its own memory (`bound_own_memory`).

Being PID 1 matters: the kernel ignores SIGKILL/SIGTERM sent to a namespace's init from inside it, so a
command cannot kill the executor, and `kill(-1, SIGKILL)` from init kills every other process of the sandbox
in one atomic sweep (fork bombs included), which is how timeouts and clean-ups kill whole process trees.

Stdlib only; runs under the sandbox's own python3 (3.9+). The host side of the protocol is channel.py.
Frame: 4-byte big-endian header length, JSON header, then header["n"] raw payload bytes.
"""

import errno
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
DEFAULT_MAX_TRANSFER = 64 << 20  # bytes one read or download returns when the host names no bound
MAX_ROOT_BYTES = 2 << 30  # what one writable root counts for when it is not a size-limited mount
EXECUTOR_BASE_BYTES = 256 << 20  # the interpreter, its threads' stacks and exec buffers


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
        """Remember /work, /tmp and $HOME (contents in memory) as the state `restore()` returns to.

        FIFOs, sockets and devices are not kept (a reset removes them); a hard-linked file is kept once and
        restored as separate copies. The tree is walked without recursion or whole paths, so any depth works.
        """
        roots = {}
        budget = [self.snapshot_budget]
        for root in self.roots:
            fd = os.open(root, OPEN_DIR)
            try:
                st = os.fstat(fd)
                node = Node("d", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
                node.children = {}
                snapshot_tree(fd, node, budget, root)
            finally:
                os.close(fd)
            roots[root] = node
        self.snapshot = Snapshot(roots, self.snapshot_budget - budget[0])

    def restore(self):
        """Back to the snapshot, touching only what differs: a reset after a small edit to a big checkout
        costs a read-and-compare of the checkout, not a delete-and-rewrite of it. Contents are compared
        byte for byte (not by mtime/ctime, which a command can preserve, e.g. through a shared mmap)."""
        self.kill_all(keep_protected=False)  # from here on nothing in the sandbox changes under our feet
        remove_ipc_objects()
        for root, node in self.snapshot.roots.items():
            fd = os.open(root, OPEN_DIR)
            try:
                own = os.fstat(fd).st_uid == os.getuid()
                if own:
                    os.fchmod(fd, 0o700)  # a command may have chmod-ed the root itself
                self.restore_tree(fd, node)
                if own:
                    os.fchmod(fd, node.mode)
            finally:
                os.close(fd)

    def restore_tree(self, root_fd, root):
        """Depth first with an explicit stack: each directory's entries are made right first (`sync_dir`),
        then its subdirectories are visited, then its own mode and mtime are set (its contents are final)."""
        cursor = DirCursor(root_fd)
        stack = [(root, self.sync_dir(root_fd, root))]
        try:
            while stack:
                node, subdirs = stack[-1]
                if subdirs:
                    name = subdirs.pop()
                    cursor.down(name)
                    child = node.children[name]
                    stack.append((child, self.sync_dir(cursor.fd, child)))
                    continue
                stack.pop()
                if stack:
                    fd = cursor.up()
                    try:
                        os.fchmod(fd, node.mode)  # last: a read-only directory must not block its contents
                        os.utime(fd, ns=(node.mtime_ns, node.mtime_ns))
                    finally:
                        os.close(fd)
        finally:
            cursor.close()

    def sync_dir(self, fd, node):
        """Make the entries of the open directory `fd` those of the snapshot directory `node`: delete what
        differs, create what is missing. Returns the names of its subdirectories (left searchable)."""
        want = node.children
        kept = set()
        for name in os.listdir(fd):
            entry = want.get(name)
            if entry is not None and self.matches(fd, name, entry):
                kept.add(name)
            else:
                remove_at(fd, name)
        for name, entry in want.items():
            if name not in kept:
                self.create_at(fd, name, entry)
        return [name for name, entry in want.items() if entry.kind == "d"]

    def matches(self, fd, name, entry):
        """Whether `name` is already what the snapshot has (fixing a file's mode and mtime on the way)."""
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        if entry.kind == "d":
            if not stat.S_ISDIR(st.st_mode):
                return False
            if st.st_mode & 0o700 != 0o700:
                os.chmod(name, 0o700, dir_fd=fd)  # its mode is set once its contents are restored
            return True
        if entry.kind == "l":
            return stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=fd) == entry.target
        if not stat.S_ISREG(st.st_mode) or st.st_size != len(entry.data):
            return False
        readable = st.st_mode & stat.S_IRUSR
        if not readable:
            os.chmod(name, 0o600, dir_fd=fd)
        if not self.same_content(fd, name, entry):
            return False
        if not readable or stat.S_IMODE(st.st_mode) != entry.mode:
            os.chmod(name, entry.mode, dir_fd=fd)
        if st.st_mtime_ns != entry.mtime_ns:
            os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=fd, follow_symlinks=False)
        return True

    def same_content(self, dir_fd, name, entry):
        try:
            fd, _ = open_regular(name, dir_fd=dir_fd)
        except (OSError, RefusedFile):
            return False
        try:
            want = memoryview(entry.data)
            for start in range(0, len(want) + 1, CHUNK):
                got = read_upto(fd, CHUNK)
                if got != want[start : start + CHUNK]:  # memcmp, one chunk at a time
                    return False
            return True
        finally:
            os.close(fd)

    def create_at(self, fd, name, entry):
        if entry.kind == "d":
            os.mkdir(name, 0o700, dir_fd=fd)
        elif entry.kind == "l":
            os.symlink(entry.target, name, dir_fd=fd)
        else:
            out = os.open(name, OPEN_CREATE, 0o600, dir_fd=fd)
            try:
                write_all(out, entry.data)
                os.fchmod(out, entry.mode)
                os.utime(out, ns=(entry.mtime_ns, entry.mtime_ns))
            finally:
                os.close(out)

    def kill_processes(self):
        """Every process of the sandbox gone, kept background sessions included: only the executor is left."""
        self.kill_all(keep_protected=False)
        left = [pid for pid, _ in self.sessions()]
        if left:
            raise RuntimeError("%d processes survived SIGKILL: %s" % (len(left), left[:10]))

    def handle(self, req, payload):
        op = req.get("op")
        if op == "ping":
            return {"pid": os.getpid()}, b""
        if op == "exec":
            return self.exec(req, payload)
        if op == "read":
            return {}, read_file(req["path"], int(req.get("max_bytes") or self.max_transfer))
        if op == "write":
            path = req["path"]
            if req.get("parents", True) and os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            write_file(path, payload, req.get("mode"))
            return {}, b""
        if op == "tar":  # download: a tar of one path, named by its basename
            return {}, tar_path(req["path"], int(req.get("max_bytes") or self.max_transfer))
        if op == "untar":  # upload: unpack into a directory
            os.makedirs(req["path"], exist_ok=True)
            fd = os.open(req["path"], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                extract_tar(payload, fd, rename_top=req.get("top"))
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


# ---- file system access on the host's behalf ---------------------------------------------------------
# Everything under /work, /tmp and $HOME belongs to the agent's uid: any path there may be an agent-made
# symlink (to /dev/zero, to a FIFO), a FIFO, a socket, or a sparse file of any size, and may change while we
# look. So the executor opens final components with O_NOFOLLOW (a link is refused, never followed) and
# O_NONBLOCK (opening a FIFO never waits for a writer), reads only what fstat calls a regular file, and reads
# at most a bound it was given. Trees are walked by name from open directories, never by whole paths and
# never by recursion, so depth is bounded neither by PATH_MAX nor by Python's recursion limit.
OPEN_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
OPEN_WRITE = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
OPEN_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
CHUNK = 1 << 20
KEEP_FDS = 32  # open directories a walk holds at most; deeper ancestors are re-opened through '..'
ENTRY_COST = 512  # bytes a snapshot or a download charges per entry, on top of the contents (a tar header)

FILE_KINDS = (
    (stat.S_ISLNK, "a symbolic link (links are never followed)"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a directory"),
)


class RefusedFile(Exception):
    """A path the executor will not read or write: not a regular file, or larger than the bound."""


def kind_of(mode):
    for test, kind in FILE_KINDS:
        if test(mode):
            return kind
    return "not a regular file"


def refuse_kind(path, mode):
    return RefusedFile("%s is %s, not a regular file" % (path, kind_of(mode)))


def open_regular(name, flags=OPEN_READ, dir_fd=None, mode=0o666):
    """(fd, stat) of the regular file `name`; RefusedFile for a link, FIFO, socket, device or directory."""
    try:
        fd = os.open(name, flags, mode, dir_fd=dir_fd)
    except OSError as exc:
        # ELOOP: the final component is a link. ENXIO: a socket, or a FIFO without a reader (for writing).
        if exc.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                raise exc from None
            if not stat.S_ISREG(st.st_mode):
                raise refuse_kind(name, st.st_mode) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise refuse_kind(name, st.st_mode)
    return fd, st


def read_upto(fd, n):
    """At most `n` bytes: fewer only at the end of the file."""
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def too_large(path, size, limit):
    return RefusedFile(
        "%s has %s bytes, more than the %d bytes one transfer may carry (raise max_bytes to read it)"
        % (path, size, limit)
    )


def read_file(path, limit):
    fd, st = open_regular(path)
    try:
        if st.st_size > limit:  # a sparse file says so before a byte is read
            raise too_large(path, st.st_size, limit)
        data = read_upto(fd, limit + 1)  # files without a size (/proc) still stop at the bound
        if len(data) > limit:
            raise too_large(path, "more than %d" % limit, limit)
        return data
    finally:
        os.close(fd)


def write_all(fd, data):
    view = memoryview(data)
    while len(view):
        view = view[os.write(fd, view[:CHUNK]) :]


def write_file(path, data, mode=None, dir_fd=None):
    """Replace the contents of the regular file `path` (created when missing); never through a link."""
    fd, _ = open_regular(path, OPEN_WRITE, dir_fd=dir_fd)
    try:
        os.ftruncate(fd, 0)  # only now: truncating at open would truncate before the type was checked
        write_all(fd, data)
        if mode is not None:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


class DirCursor:
    """The chain of open directories from a root down to the current one, entered by name, never through a
    link. Only the last KEEP_FDS stay open: a walk deeper than the open-files limit re-opens an ancestor
    through '..' on the way back up, checked by device and inode (a directory moved meanwhile is an error,
    not a walk somewhere else). The root's fd belongs to the caller."""

    def __init__(self, root_fd):
        st = os.fstat(root_fd)
        self.fds = [root_fd]
        self.ids = [(st.st_dev, st.st_ino)]

    @property
    def fd(self):
        return self.fds[-1]

    def down(self, name):
        fd = os.open(name, OPEN_DIR, dir_fd=self.fd)
        st = os.fstat(fd)
        self.fds.append(fd)
        self.ids.append((st.st_dev, st.st_ino))
        old = len(self.fds) - 1 - KEEP_FDS
        if old >= 1 and self.fds[old] is not None:
            os.close(self.fds[old])
            self.fds[old] = None
        return st

    def up(self):
        """Back to the parent. Returns the child's fd, still open: the caller finishes it and closes it."""
        child = self.fds.pop()
        self.ids.pop()
        if self.fds[-1] is None:
            try:
                fd = os.open("..", OPEN_DIR, dir_fd=child)
            except OSError:
                os.close(child)
                raise
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self.ids[-1]:
                os.close(fd)
                os.close(child)
                raise RuntimeError("a directory was moved while the executor walked the tree")
            self.fds[-1] = fd
        return child

    def close(self):
        for fd in self.fds[1:]:
            if fd is not None:
                os.close(fd)
        del self.fds[1:], self.ids[1:]


def enter_writable(cursor, name):
    """Enter a directory we own whatever its mode (a command may have chmod-ed it to 000)."""
    try:
        st = cursor.down(name)
    except PermissionError:
        os.chmod(name, 0o700, dir_fd=cursor.fd)
        st = cursor.down(name)
    if st.st_mode & 0o700 != 0o700:
        os.fchmod(cursor.fd, 0o700)


def remove_at(dir_fd, name):
    """Delete `name` in the open directory `dir_fd`, a whole tree included, whatever its depth."""
    try:
        os.unlink(name, dir_fd=dir_fd)
        return
    except FileNotFoundError:
        return
    except (IsADirectoryError, PermissionError):  # Linux says EISDIR for a directory
        if not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise
    cursor = DirCursor(dir_fd)
    try:
        enter_writable(cursor, name)
        stack = [(name, unlink_files(cursor.fd))]
        while stack:
            dname, subdirs = stack[-1]
            if subdirs:
                sub = subdirs.pop()
                enter_writable(cursor, sub)
                stack.append((sub, unlink_files(cursor.fd)))
            else:
                stack.pop()
                os.close(cursor.up())
                os.rmdir(dname, dir_fd=cursor.fd)
    finally:
        cursor.close()


def unlink_files(fd):
    """Unlink every non-directory in `fd`; returns the subdirectories' names."""
    subdirs = []
    for name in os.listdir(fd):
        try:
            os.unlink(name, dir_fd=fd)
        except IsADirectoryError:
            subdirs.append(name)
        except FileNotFoundError:
            pass
    return subdirs


def walk(root_fd):
    """Yield (dir_fd, name, lstat, depth) for every entry below the open directory `root_fd`, pre-order
    and sorted by name, without recursion or following links; depth 0 = a child of the root. A directory
    is entered right after it is yielded (made readable for the walk and given its mode back after)."""
    cursor = DirCursor(root_fd)
    stack = [(sorted(os.listdir(root_fd), reverse=True), None)]  # (names left, mode to give back)
    try:
        while stack:
            names, mode_back = stack[-1]
            if not names:
                stack.pop()
                if stack:
                    fd = cursor.up()
                    try:
                        if mode_back is not None:
                            os.fchmod(fd, mode_back)
                    finally:
                        os.close(fd)
                continue
            name = names.pop()
            try:
                st = os.stat(name, dir_fd=cursor.fd, follow_symlinks=False)
            except FileNotFoundError:  # deleted by a running command meanwhile
                continue
            yield cursor.fd, name, st, len(stack) - 1
            if stat.S_ISDIR(st.st_mode):
                mode_back = None
                if not os.access(name, os.R_OK | os.X_OK, dir_fd=cursor.fd, follow_symlinks=False):
                    mode_back = stat.S_IMODE(st.st_mode)
                    os.chmod(name, mode_back | 0o700, dir_fd=cursor.fd)
                cursor.down(name)
                stack.append((sorted(os.listdir(cursor.fd), reverse=True), mode_back))
    finally:
        cursor.close()


def read_regular_at(dir_fd, name, st, limit, path):
    """The contents of a regular file we own, even one chmod-ed to 000; at most `limit` bytes."""
    if st.st_size > limit:
        raise too_large(path, st.st_size, limit)
    if not st.st_mode & stat.S_IRUSR:
        os.chmod(name, stat.S_IMODE(st.st_mode) | stat.S_IRUSR, dir_fd=dir_fd)
    fd, fst = open_regular(name, dir_fd=dir_fd)
    try:
        if not st.st_mode & stat.S_IRUSR:
            os.fchmod(fd, stat.S_IMODE(st.st_mode))
        if fst.st_size > limit:
            raise too_large(path, fst.st_size, limit)
        return read_upto(fd, fst.st_size)
    finally:
        os.close(fd)


class Node:
    """One entry of a snapshot: a directory ("d", with children), a regular file ("f", with its contents)
    or a symlink ("l", with its target)."""

    __slots__ = ("children", "data", "kind", "mode", "mtime_ns", "target")

    def __init__(self, kind, mode=0, mtime_ns=0, data=b"", target=None):
        self.kind, self.mode, self.mtime_ns = kind, mode, mtime_ns
        self.data, self.target = data, target
        self.children = None


class Snapshot:
    def __init__(self, roots, size):
        self.roots = roots  # root path -> directory Node
        self.bytes = size  # what it holds, entries counted at ENTRY_COST each


def snapshot_tree(root_fd, root, budget, root_path):
    """Fill the directory Node `root` from the open directory `root_fd`. `budget` ([bytes left]) bounds
    what the snapshot may hold in memory."""
    parents = [root]  # parents[d] holds the entries at depth d
    seen = {}  # (dev, ino) of hard-linked files -> their Node: contents kept once
    for dir_fd, name, st, depth in walk(root_fd):
        del parents[depth + 1 :]
        budget[0] -= ENTRY_COST
        if budget[0] < 0:
            raise snapshot_too_large(root_path)
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            node = Node("d", mode, st.st_mtime_ns)
            node.children = {}
            parents.append(node)
        elif stat.S_ISLNK(st.st_mode):
            node = Node("l", target=os.readlink(name, dir_fd=dir_fd))
        elif stat.S_ISREG(st.st_mode):
            same = seen.get((st.st_dev, st.st_ino)) if st.st_nlink > 1 else None
            if same is not None:
                node = Node("f", mode, st.st_mtime_ns, same.data)
            else:
                try:
                    data = read_regular_at(dir_fd, name, st, budget[0], root_path)
                except RefusedFile:
                    raise snapshot_too_large(root_path) from None
                budget[0] -= len(data)
                node = Node("f", mode, st.st_mtime_ns, data)
                if st.st_nlink > 1:
                    seen[(st.st_dev, st.st_ino)] = node
        else:
            continue  # FIFOs, sockets, devices: never opened, not kept
        parents[depth].children[name] = node


def snapshot_too_large(root_path):
    return RefusedFile(
        "cannot snapshot %s: the writable directories hold more than the executor may keep in memory"
        % root_path
    )


class ExactReader:
    """`size` bytes of an open file for tarfile: zero-padded if the file shrank, cut if it grew."""

    def __init__(self, fd, size):
        self.fd, self.left = fd, size

    def read(self, n=-1):
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = read_upto(self.fd, n)
        data += b"\0" * (n - len(data))
        self.left -= n
        return data


def tar_path(path, limit):
    """A tar of `path` (named by its basename) holding only directories, regular files and symlinks, at
    most `limit` bytes; RefusedFile past that, or when `path` itself is not a directory or regular file."""
    path = path.rstrip("/") or "/"
    top = os.path.basename(path) or "."
    st = os.stat(path, follow_symlinks=False)
    budget = [limit]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        if stat.S_ISREG(st.st_mode):
            fd, fst = open_regular(path)
            try:
                if fst.st_size > limit:
                    raise too_large(path, fst.st_size, limit)
                add_file(tar, top, fd, fst, budget, path, limit)
            finally:
                os.close(fd)
        elif stat.S_ISDIR(st.st_mode):
            fd = os.open(path, OPEN_DIR)
            try:
                tar.addfile(tar_info(top, os.fstat(fd)))
                names = [top]  # names[d] is the archive name of the directory holding depth-d entries
                for dir_fd, name, est, depth in walk(fd):
                    del names[depth + 1 :]
                    arcname = names[depth] + "/" + name
                    budget[0] -= ENTRY_COST + len(arcname)
                    if budget[0] < 0:
                        raise too_large(path, "more than %d" % limit, limit)
                    if stat.S_ISDIR(est.st_mode):
                        tar.addfile(tar_info(arcname, est))
                        names.append(arcname)
                    elif stat.S_ISLNK(est.st_mode):
                        info = tar_info(arcname, est)
                        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(name, dir_fd=dir_fd)
                        tar.addfile(info)
                    elif stat.S_ISREG(est.st_mode):
                        try:
                            ffd, fst = open_regular(name, dir_fd=dir_fd)
                        except (OSError, RefusedFile):
                            continue  # replaced by something else meanwhile, or unreadable
                        try:
                            add_file(tar, arcname, ffd, fst, budget, path, limit)
                        finally:
                            os.close(ffd)
            finally:
                os.close(fd)
        else:
            raise refuse_kind(path, st.st_mode)
    return buf.getbuffer()


def tar_info(name, st):
    info = tarfile.TarInfo(name)
    info.mode = stat.S_IMODE(st.st_mode)
    info.mtime = st.st_mtime
    info.type = tarfile.DIRTYPE if stat.S_ISDIR(st.st_mode) else tarfile.REGTYPE
    return info


def add_file(tar, arcname, fd, st, budget, path, limit):
    budget[0] -= st.st_size
    if budget[0] < 0:
        raise too_large(path, "more than %d" % limit, limit)
    info = tar_info(arcname, st)
    info.size = st.st_size
    tar.addfile(info, ExactReader(fd, st.st_size))


def extract_tar(data, dest_fd, keep_links=True, keep_modes=True, rename_top=None):
    """Unpack a tar into the open directory `dest_fd`, iteratively and by name: members never write
    through a link or into a FIFO, `..` and absolute names are refused, devices and FIFOs skipped.
    `rename_top` replaces the first component of every name (a download lands under the caller's name)."""
    cursor = DirCursor(dest_fd)
    at = []  # the components of the directory the cursor is in
    dir_modes = []  # (components, mode): set after the contents, so a read-only directory fills first

    def goto(parts):
        common = 0
        while common < min(len(at), len(parts)) and at[common] == parts[common]:
            common += 1
        while len(at) > common:
            os.close(cursor.up())
            at.pop()
        for part in parts[common:]:
            make_dir(cursor.fd, part)
            enter_writable(cursor, part)
            at.append(part)

    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
            for m in tar:
                parts = [p for p in m.name.split("/") if p not in ("", ".")]
                if m.name.startswith("/") or ".." in parts:
                    raise ValueError("unsafe path in archive: %r" % m.name)
                if not parts:
                    continue
                if rename_top is not None:
                    parts[0] = rename_top
                goto(parts[:-1])
                name = parts[-1]
                if m.isdir():
                    make_dir(cursor.fd, name)
                    if keep_modes:
                        dir_modes.append((parts, m.mode & 0o7777))
                elif m.isfile() or (m.islnk() and keep_links):
                    src = tar.extractfile(m)  # a hard link reads its target's contents: a copy
                    try:
                        os.unlink(name, dir_fd=cursor.fd)  # whatever was there: a link, a FIFO, a file
                    except FileNotFoundError:
                        pass
                    fd = os.open(name, OPEN_CREATE, 0o600, dir_fd=cursor.fd)
                    try:
                        while True:
                            chunk = src.read(CHUNK)
                            if not chunk:
                                break
                            write_all(fd, chunk)
                        os.fchmod(fd, (m.mode & 0o7777) if keep_modes else 0o644)
                        os.utime(fd, (m.mtime, m.mtime))
                    finally:
                        os.close(fd)
                elif m.issym() and keep_links:
                    remove_at(cursor.fd, name)
                    os.symlink(m.linkname, name, dir_fd=cursor.fd)
        for parts, mode in reversed(dir_modes):
            goto(parts[:-1])
            os.chmod(parts[-1], mode, dir_fd=cursor.fd)
    finally:
        cursor.close()


def make_dir(dir_fd, name):
    try:
        os.mkdir(name, 0o755, dir_fd=dir_fd)
    except FileExistsError:
        if not stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            remove_at(dir_fd, name)  # a file or link where the archive has a directory
            os.mkdir(name, 0o755, dir_fd=dir_fd)


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
