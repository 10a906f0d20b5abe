"""The live process tree under a pid, read from /proc (Linux): how tests and envs check that closing a
browser or an MCP server left no process behind."""

from __future__ import annotations

import os
from pathlib import Path


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state letter) of `pid`, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name sits in parentheses and may itself contain spaces or parentheses.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0]


def live_descendants(root: int | None = None) -> dict[int, str]:
    """{pid: command line} of every non-zombie process descended from `root` (default: this process)."""
    root = os.getpid() if root is None else root
    parents: dict[int, int] = {}
    states: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _stat(int(entry))
            if info is not None:
                parents[int(entry)], states[int(entry)] = info
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, str] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        if states.get(pid) == "Z":
            continue
        try:
            cmd = (
                Path(f"/proc/{pid}/cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
                .strip()
            )
        except OSError:
            continue
        out[pid] = cmd
    return out
