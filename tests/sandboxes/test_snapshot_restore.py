"""Property test of the executor's incremental reset, run on a host directory (no sandbox needed).

Oracle: after any sequence of file-system mutations, `restore()` yields exactly the tree `take_snapshot()`
saw: the same paths, types, permission bits, file contents, symlink targets and file mtimes (seconds).
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m2rl.sandboxes import agent

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


class HostAgent(agent.Agent):
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
    ex = HostAgent({"writable_roots": [str(root)]})
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
    import pytest

    with pytest.raises(RuntimeError, match="PID 1"):
        agent.Agent({"writable_roots": []}).kill_all(keep_protected=False)
