"""The executor's file-system half: file access on the host's behalf, snapshots of the writable roots and
their incremental restore, and tar archives for uploads and downloads.

Stdlib only and Python 3.9+, like `executor.py`, beside which every backend ships it into the sandbox
(`sandbox.stage_executor`); the host imports it too, to unpack and check what it downloads
(`m2rl.sandboxes.executor_files`).
"""

import errno
import io
import os
import stat
import tarfile

# ---- file system access on the host's behalf -------------------------------------------------------------
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


# ---- snapshot and restore ---------------------------------------------------------------------------------
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


def take_snapshot(roots, budget_bytes):
    """A `Snapshot` of the directories `roots` (contents in memory, at most `budget_bytes`; RefusedFile past
    that): the state `restore_snapshot` returns to.

    FIFOs, sockets and devices are not kept (a reset removes them); a hard-linked file is kept once and
    restored as separate copies. The tree is walked without recursion or whole paths, so any depth works.
    """
    nodes = {}
    budget = [budget_bytes]
    for root in roots:
        fd = os.open(root, OPEN_DIR)
        try:
            st = os.fstat(fd)
            node = Node("d", stat.S_IMODE(st.st_mode), st.st_mtime_ns)
            node.children = {}
            snapshot_tree(fd, node, budget, root)
        finally:
            os.close(fd)
        nodes[root] = node
    return Snapshot(nodes, budget_bytes - budget[0])


def restore_snapshot(snapshot):
    """Back to `snapshot`, touching only what differs: a reset after a small edit to a big checkout costs a
    read-and-compare of the checkout, not a delete-and-rewrite of it. Contents are compared byte for byte
    (not by mtime/ctime, which a command can preserve, e.g. through a shared mmap). Nothing may change
    the roots meanwhile: the executor kills every process first."""
    for root, node in snapshot.roots.items():
        fd = os.open(root, OPEN_DIR)
        try:
            own = os.fstat(fd).st_uid == os.getuid()
            if own:
                os.fchmod(fd, 0o700)  # a command may have chmod-ed the root itself
            restore_tree(fd, node)
            if own:
                os.fchmod(fd, node.mode)
        finally:
            os.close(fd)


def restore_tree(root_fd, root):
    """Depth first with an explicit stack: each directory's entries are made right first (`sync_dir`),
    then its subdirectories are visited, then its own mode and mtime are set (its contents are final)."""
    cursor = DirCursor(root_fd)
    stack = [(root, sync_dir(root_fd, root))]
    try:
        while stack:
            node, subdirs = stack[-1]
            if subdirs:
                name = subdirs.pop()
                cursor.down(name)
                child = node.children[name]
                stack.append((child, sync_dir(cursor.fd, child)))
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

def sync_dir(fd, node):
    """Make the entries of the open directory `fd` those of the snapshot directory `node`: delete what
    differs, create what is missing. Returns the names of its subdirectories (left searchable)."""
    want = node.children
    kept = set()
    for name in os.listdir(fd):
        entry = want.get(name)
        if entry is not None and matches(fd, name, entry):
            kept.add(name)
        else:
            remove_at(fd, name)
    for name, entry in want.items():
        if name not in kept:
            create_at(fd, name, entry)
    return [name for name, entry in want.items() if entry.kind == "d"]

def matches(fd, name, entry):
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
    if not same_content(fd, name, entry):
        return False
    if not readable or stat.S_IMODE(st.st_mode) != entry.mode:
        os.chmod(name, entry.mode, dir_fd=fd)
    if st.st_mtime_ns != entry.mtime_ns:
        os.utime(name, ns=(entry.mtime_ns, entry.mtime_ns), dir_fd=fd, follow_symlinks=False)
    return True

def same_content(dir_fd, name, entry):
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

def create_at(fd, name, entry):
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


# ---- tar archives ------------------------------------------------------------------------------------------
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
