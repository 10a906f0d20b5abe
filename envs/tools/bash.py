"""`bash`: run a shell command in the episode's sandbox.

Each call is one `Sandbox.exec` (a fresh `bash -c` in /work: shell variables and `cd` do not carry over;
files do). The command runs inside a small wrapper that lists the files under /work it created or modified,
so the step's `info["edits"]` can report shell writes without another round trip per file.
"""

from __future__ import annotations

from typing import Any

from m2rl.envs.tool import ToolError, ToolOutput

CHANGED_LIST = "/tmp/.m2rl_changed"
# $1 = the user's command. File mtimes come from the kernel's coarse clock (one tick, a few ms), so a file
# written in the marker's tick would not be "newer". Waiting until a probe file's mtime passes the marker's
# (at most one tick) makes every write of the command strictly newer, and none before it.
# Hidden paths are skipped.
WRAPPER = (
    "m=$(mktemp /tmp/.m2rl_mark.XXXXXX); p=$(mktemp /tmp/.m2rl_probe.XXXXXX); "
    'while ! [ "$p" -nt "$m" ]; do touch "$p"; done; '
    'bash -c "$1"; rc=$?; '
    f"find /work -newer \"$m\" -type f -not -path '*/.*' 2>/dev/null | head -n 200 > {CHANGED_LIST}; "
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


def changed_files(sandbox: Any) -> list[str]:
    try:
        listing = sandbox.read_file(CHANGED_LIST).decode("utf-8", "replace")
    except Exception:  # the wrapper was killed (timeout) before writing the list
        return []
    return [line for line in listing.splitlines() if line]


class BashTool:
    def __init__(self, sandbox: Any, timeout_s: float = 30.0) -> None:
        self.sandbox = sandbox
        self.timeout_s = timeout_s

    def bash(self, command: str) -> ToolOutput:
        """Run a bash command in the sandbox (working directory /work) and return its stdout and stderr.

        Args:
            command: The command line to run, e.g. `ls -la` or `grep -c ERROR logs/*.log`.
        """
        if not command.strip():
            raise ToolError("the command is empty; pass a shell command, e.g. `ls`")
        if "\x00" in command:
            raise ToolError("the command contains a NUL byte, which a shell command cannot hold")
        result = self.sandbox.exec(
            ["bash", "-c", WRAPPER, "m2rl", command], timeout=self.timeout_s, cwd="/work"
        )
        text = format_exec(result.stdout, result.stderr, result.exit_code, result.timed_out, self.timeout_s)
        edits = (
            [] if result.timed_out else [{"path": p, "syntax_ok": None} for p in changed_files(self.sandbox)]
        )
        return ToolOutput(
            output=text, ok=result.ok, timed_out=result.timed_out, edits=edits, commands=[command]
        )
