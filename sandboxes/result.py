"""The outcome of one command run in a sandbox."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExecResult:
    exit_code: int  # the command's exit status; -N when killed by signal N (timeouts: -9)
    stdout: str  # decoded UTF-8 (invalid bytes replaced); ends with TRUNCATION_MARKER text when cut
    stderr: str
    timed_out: bool  # the per-exec timeout fired and the command's processes were killed
    truncated: bool  # stdout or stderr was cut at Limits.max_output_bytes
    duration_s: float  # wall time inside the sandbox, spawn to exit

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    @property
    def output(self) -> str:
        """stdout then stderr, as a tool result shows them to the model."""
        if self.stdout and self.stderr and not self.stdout.endswith("\n"):
            return self.stdout + "\n" + self.stderr
        return self.stdout + self.stderr
