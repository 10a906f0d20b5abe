"""`bash`: run a shell command in the episode's sandbox.

Each call is one `Sandbox.exec` (a fresh `bash -c` in the working directory, /work unless the env says
otherwise: shell variables and `cd` do not carry over; files do). The command runs inside a small wrapper that
lists the files under the working directory it created or modified,
so the step's `info["edits"]` can report shell writes without another round trip per file.

The list lives in /tmp, which the agent's commands can write: each call uses a fresh random name (nothing
can be planted there in advance), the wrapper opens it read-write (`1<>`: a FIFO swapped in meanwhile takes
the at most 64 KiB without blocking), and the host reads it with a size bound (a link, FIFO or oversized
file there is refused). A spoiled list means no edits reported, never a hang.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from m2rl.envs.tool import ToolError, ToolOutput

logger = logging.getLogger(__name__)

CHANGED_LIST_PREFIX = "/tmp/.m2rl_changed_"
MAX_LIST_BYTES = 65536  # 200 paths; also what a pipe buffers, so a swapped-in FIFO never blocks the write
# $1 = the user's command, $2 = this call's list, $3 = the previous call's list (removed), $4 = the working
# directory whose changes are listed. File mtimes
# come from the kernel's coarse clock (one tick, a few ms), so a file written in the marker's tick would
# not be "newer". Waiting until a probe file's mtime passes the marker's (at most one tick) makes every
# write of the command strictly newer, and none before it. Hidden paths are skipped.
WRAPPER = (
    'rm -f -- "$3"; m=$(mktemp /tmp/.m2rl_mark.XXXXXX); p=$(mktemp /tmp/.m2rl_probe.XXXXXX); '
    'while ! [ "$p" -nt "$m" ]; do touch "$p"; done; '
    'bash -c "$1"; rc=$?; '
    "find \"$4\" -newer \"$m\" -type f -not -path '*/.*' 2>/dev/null | head -n 200 "
    f'| head -c {MAX_LIST_BYTES} 1<>"$2"; '
    'rm -f "$m" "$p"; exit $rc'
)


def format_exec(stdout: str, stderr: str, exit_code: int, timed_out: bool, timeout_s: float) -> str:
    parts = [stdout]
    if stderr:
        parts.append(stderr if not stdout or stdout.endswith("\n") else "\n" + stderr)
    text = "".join(parts)
    if timed_out:
        text += f"\n[command timed out after {timeout_s:g} s and was killed]"
    elif exit_code != 0:
        text += f"\n[exit code {exit_code}]"
    return text if text.strip() else "[no output]"


def changed_files(sandbox: Any, path: str, workdir: str = "/work") -> list[str]:
    try:
        listing = sandbox.read_file(path, max_bytes=MAX_LIST_BYTES).decode("utf-8", "replace")
    except Exception:  # killed (timeout) before writing the list, or a command spoiled it
        logger.debug("no list of changed files at %s", path, exc_info=True)
        return []
    return [line for line in listing.splitlines() if line.startswith(workdir.rstrip("/") + "/")]


class BashTool:
    def __init__(
        self, sandbox: Any, timeout_s: float = 30.0, workdir: str = "/work", env: dict[str, str] | None = None
    ) -> None:
        self.sandbox = sandbox
        self.timeout_s = timeout_s
        self.workdir = workdir
        self.env = dict(env or {})  # extra environment variables of every command
        self.last_list = ""  # the previous call's changed-files list, removed by the next call

    def bash(self, command: str) -> ToolOutput:
        """Run a bash command in the sandbox (working directory /work) and return its stdout and stderr.

        Args:
            command: The command line to run, e.g. `ls -la` or `grep -c ERROR logs/*.log`.
        """
        if not command.strip():
            raise ToolError("the command is empty; pass a shell command, e.g. `ls`")
        if "\x00" in command:
            raise ToolError("the command contains a NUL byte, which a shell command cannot hold")
        changed_list = CHANGED_LIST_PREFIX + secrets.token_hex(8)
        result = self.sandbox.exec(
            ["bash", "-c", WRAPPER, "m2rl", command, changed_list, self.last_list, self.workdir],
            timeout=self.timeout_s,
            cwd=self.workdir,
            env=self.env or None,
        )
        self.last_list = changed_list
        text = format_exec(result.stdout, result.stderr, result.exit_code, result.timed_out, self.timeout_s)
        edits = (
            []
            if result.timed_out
            else [{"path": p, "syntax_ok": None} for p in changed_files(self.sandbox, changed_list, self.workdir)]
        )
        return ToolOutput(
            output=text, ok=result.ok, timed_out=result.timed_out, edits=edits, commands=[command]
        )
