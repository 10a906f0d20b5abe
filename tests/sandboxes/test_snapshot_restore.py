"""Property test of the executor's incremental reset, run on a host directory (no sandbox needed).

Oracle: after any sequence of file-system mutations, `restore()` yields exactly the tree `take_snapshot()`
saw: the same paths, types, permission bits, file contents, symlink targets and file mtimes (seconds).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from m2rl.sandboxes import executor

# A small path space, so mutations often hit what the set-up created.
NAMES = st.sampled_from(["a", "b"])
RELPATH = st.lists(NAMES, min_size=1, max_size=2).map(lambda parts: "/".join(parts))
CONTENT = st.binary(max_size=64)
MODE = st.sampled_from([0o644, 0o600, 0o755, 0o444, 0o000])
OPS = st.one_of(
    st.tuples(st.just("write"), RELPATH, CONTENT),
    st.tuples(st.just("append"), RELPATH, CONTENT),
    st.tuples(st.just("same_size_same_mtime"), RELPATH, CONTENT),
    st.tuples(st.just("delete"), RELPATH, CONTENT),
    st.tuples(st.just("mkdir"), RELPATH, CONTENT),
    st.tuples(st.just("symlink"), RELPATH, CONTENT),
    st.tuples(st.just("chmod"), RELPATH, MODE),
)


class HostExecutor(executor.Executor):
    """The real executor logic on a plain directory; there are no processes to kill."""

    def kill_all(self, keep_protected: bool) -> None:
        pass


def tree(root: Path) -> list[tuple]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st_ = p.lstat()
            if stat.S_ISLNK(st_.st_mode):
                out.append((str(p), "l", os.readlink(p)))
            elif stat.S_ISDIR(st_.st_mode):
                out.append((str(p), "d", stat.S_IMODE(st_.st_mode)))
            else:
                out.append((str(p), "f", stat.S_IMODE(st_.st_mode), p.read_bytes(), int(st_.st_mtime)))
    return out


def apply(root: Path, op: tuple) -> None:
    kind, rel, arg = op
    p = root / rel
    try:
        if kind == "write":
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(arg)
        elif kind == "append":
            with open(p, "ab") as f:
                f.write(arg + b"!")
        elif kind == "same_size_same_mtime" and p.is_file() and p.stat().st_size:
            before = p.stat()
            p.write_bytes(bytes(255 - b for b in p.read_bytes()))
            os.utime(p, ns=(before.st_atime_ns, before.st_mtime_ns))
        elif kind == "delete":
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        elif kind == "mkdir":
            p.mkdir(parents=True)
        elif kind == "symlink":  # replaces a file or an older link, with one of a few targets
            if p.is_symlink() or p.is_file():
                p.unlink()
            p.symlink_to(f"../target{len(arg) % 3}")
        elif kind == "chmod" and not p.is_symlink():
            p.chmod(arg)
    except OSError:
        pass  # the sandboxed command's own failure; the reset must cope with whatever state is left


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(setup=st.lists(OPS, max_size=8), mutations=st.lists(OPS, min_size=1, max_size=12))
def test_restore_returns_to_the_snapshot(tmp_path_factory, setup, mutations):
    root = tmp_path_factory.mktemp("work")
    for op in setup:
        apply(root, op)
    for dirpath, _, _ in os.walk(root):  # the snapshot must be readable to be taken at all
        os.chmod(dirpath, 0o755)
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            p.chmod(p.stat().st_mode | 0o400)
    ex = HostExecutor({"writable_roots": [str(root)]})
    ex.take_snapshot()
    expected = tree(root)
    for op in mutations:
        apply(root, op)
    ex.restore()
    assert tree(root) == expected
    ex.restore()  # idempotent
    assert tree(root) == expected
    os.chmod(root, 0o755)
    for dirpath, _, _ in os.walk(root):
        os.chmod(dirpath, 0o755)


def test_kill_all_refuses_outside_a_sandbox():
    with pytest.raises(RuntimeError, match="PID 1"):
        executor.Executor({"writable_roots": []}).kill_all(keep_protected=False)


# ---- deep trees (issue 12, item 3) -------------------------------------------------------------------
# Paths this deep are longer than PATH_MAX (4096 bytes), so neither the set-up nor the oracle may use whole
# paths or recursion: both go by name from open directory descriptors, as a shell's `mkdir d; cd d` would.


@pytest.fixture
def deep_root(tmp_path: Path) -> Iterator[Path]:
    """An empty directory, deleted with `rm -rf` afterwards: pytest's own clean-up of old temporary
    directories recurses and would fail on these trees in a later session."""
    root = tmp_path / "work"
    root.mkdir()
    yield root
    subprocess.run(["chmod", "-R", "u+rwx", str(tmp_path)], check=False)
    subprocess.run(["rm", "-rf", str(tmp_path)], check=True)


def make_chain(root: Path, depth: int, leaf: bytes | None = None) -> None:
    """`depth` nested directories `d` under root, with a file `leaf` (contents `leaf`) at the bottom."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        fd_next = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = fd_next
    if leaf is not None:
        out = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, leaf)
        os.close(out)
    os.close(fd)


def deep_tree(root: Path) -> list[tuple]:
    """Pre-order (depth, name, kind, mode, contents or target) of everything under root, sorted by name:
    the same oracle as `tree`, with depth and name instead of whole paths. An independent walk: it moves
    the process's working directory with chdir(name) / chdir("..") and never holds a descriptor."""
    out: list[tuple] = []
    home = os.getcwd()
    os.chdir(root)
    try:
        stack = [sorted(os.listdir("."), reverse=True)]
        while stack:
            if not stack[-1]:
                stack.pop()
                os.chdir("..")
                continue
            name = stack[-1].pop()
            st_ = os.lstat(name)
            mode = stat.S_IMODE(st_.st_mode)
            if stat.S_ISLNK(st_.st_mode):
                out.append((len(stack), name, "l", os.readlink(name)))
            elif stat.S_ISDIR(st_.st_mode):
                out.append((len(stack), name, "d", mode))
                os.chdir(name)
                stack.append(sorted(os.listdir("."), reverse=True))
            else:
                with open(name, "rb") as f:
                    out.append((len(stack), name, "f", mode, f.read(), st_.st_mtime_ns))
    finally:
        os.chdir(home)
    return out


def test_deep_trees_made_after_the_snapshot_are_removed(deep_root):
    root = deep_root
    (root / "keep.txt").write_text("keep")
    ex = HostExecutor({"writable_roots": [str(root)]})
    ex.take_snapshot()
    expected = deep_tree(root)
    make_chain(root, 3000, leaf=b"bottom")
    (root / "d").chmod(0o000)  # and the top of it unreadable
    other = root / "e"
    other.mkdir()
    make_chain(other, 10_000)  # about 20 KB of path: five times PATH_MAX
    ex.restore()
    assert deep_tree(root) == expected


def test_a_deep_tree_in_the_snapshot_is_restored(deep_root):
    root = deep_root
    make_chain(root, 3000, leaf=b"original")
    ex = HostExecutor({"writable_roots": [str(root)]})
    ex.take_snapshot()
    expected = deep_tree(root)
    # Change the bottom: new contents in the leaf, a stray file, a deeper chain, a read-only middle.
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(3000):
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        if _ == 1500:
            os.chmod(nxt, 0o500)
        os.close(fd)
        fd = nxt
    for name, data in (("leaf", b"changed!"), ("stray", b"x")):
        out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=fd)
        os.write(out, data)
        os.close(out)
    os.close(fd)
    ex.restore()
    assert deep_tree(root) == expected
    ex.restore()  # idempotent
    assert deep_tree(root) == expected


def test_walks_never_hold_more_descriptors_than_a_few(deep_root):
    """10,000 levels under an open-files limit of 256 (the tight sandboxes' limit): snapshot and restore."""
    import resource

    root = deep_root
    make_chain(root, 10_000, leaf=b"deep")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        ex = HostExecutor({"writable_roots": [str(root)]})
        ex.take_snapshot()
        (root / "d" / "stray").write_text("x")  # a change near the top; restore walks the whole chain
        ex.restore()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    tree_ = deep_tree(root)
    assert len(tree_) == 10_001 and tree_[-1][:5] == (10_001, "leaf", "f", 0o644, b"deep")


def test_the_executor_memory_bound_turns_a_runaway_read_into_memory_error(tmp_path):
    """What `bound_own_memory` is for: an executor bug that reads without end (as `read` of a /dev/zero
    link once did) stops at the bound with a MemoryError, instead of growing until the host runs out."""
    code = (
        "import resource, sys\n"
        f"sys.path.insert(0, {str(Path(executor.__file__).parent)!r})\n"
        "import executor\n"
        f"ex = executor.Executor({{'writable_roots': [{str(tmp_path)!r}], 'disk_bytes': 16 << 20,"
        " 'memory_bytes': 64 << 20})\n"
        "ex.bound_own_memory()\n"
        "print(resource.getrlimit(resource.RLIMIT_DATA)[0] >> 20)\n"
        "try:\n"
        "    open('/dev/zero', 'rb').read()\n"
        "except MemoryError:\n"
        "    print('MemoryError')\n"
        # VmHWM is this process image's own peak; ru_maxrss would carry the forking pytest's peak over.
        "print([int(l.split()[1]) >> 10 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
    )
    out = subprocess.run(["python3", "-c", code], capture_output=True, text=True, timeout=60, check=True)
    limit_mb, verdict, peak_mb = out.stdout.split()
    # 256 MB for the interpreter + 2 x a snapshot (the one 16 MB root) + 3 x a payload (64 MB at most)
    assert int(limit_mb) == 256 + 2 * 16 + 3 * 64
    assert verdict == "MemoryError" and int(peak_mb) <= int(limit_mb) + 16
