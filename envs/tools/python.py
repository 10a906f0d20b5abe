"""`python`: a persistent Python interpreter per episode, running inside the sandbox.

The interpreter is `repl_server.py`, started at the first call as a kept background process of the sandbox
(`exec(..., keep_background=True)`: the sandbox's executor spares its session when other commands end or time
out, and kills it on `reset()`). Each call is one short exec of `repl_client.py` that hands over the cell
through files in a private directory under /tmp and waits for the result (see repl_server.py for why files).
A cell past the timeout gets SIGINT -> KeyboardInterrupt: the cell ends, the interpreter and its variables
stay. A cell that ignores the interrupt gets the interpreter killed; the next call starts a fresh one and
says so.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Any

from m2rl.envs.tool import ToolError, ToolOutput

logger = logging.getLogger(__name__)
HERE = Path(__file__).parent


class PythonTool:
    def __init__(
        self, sandbox: Any, timeout_s: float = 30.0, interrupt_grace_s: float = 3.0, workdir: str = "/work"
    ) -> None:
        self.sandbox = sandbox
        self.workdir = workdir
        self.timeout_s = timeout_s
        self.grace_s = interrupt_grace_s
        self.directory: str | None = None
        self.cell = 0
        self.restarts = 0

    def _start(self) -> None:
        # A fresh directory per interpreter: a restarted server never sees a stale request or pid.
        self.directory = f"/tmp/.m2rl_repl_{secrets.token_hex(6)}"
        self.cell = 0
        self.sandbox.exec(["mkdir", "-p", self.directory], timeout=10.0)
        self.sandbox.write_file(f"{self.directory}/server.py", (HERE / "repl_server.py").read_bytes())
        self.sandbox.write_file(f"{self.directory}/client.py", (HERE / "repl_client.py").read_bytes())
        started = self.sandbox.exec(
            [
                "bash",
                "-c",
                'python3 -u "$1/server.py" "$1" "$2" </dev/null >/dev/null 2>&1 &',
                "m2rl",
                self.directory,
                self.workdir,
            ],
            timeout=10.0,
            cwd=self.workdir,
            keep_background=True,
        )
        if started.exit_code != 0:
            raise ToolError(f"could not start the Python interpreter: {started.stderr.strip()[:300]}")

    def python(self, code: str) -> ToolOutput:
        """Run Python code in a persistent interpreter: variables, imports and functions survive calls.

        The value of a final expression is printed, as in a REPL. Use print() for other output. A cell that
        runs past the time limit is interrupted with KeyboardInterrupt; the interpreter keeps its state.

        Args:
            code: Python source to execute (working directory /work).
        """
        note = ""
        if self.directory is None:
            self._start()
        self.cell += 1
        result = self._run(code)
        if result["status"] == "dead":  # the interpreter was gone before the cell ran: start over once
            self.restarts += 1
            self._start()
            self.cell = 1
            note = "[the Python interpreter had exited and was restarted; earlier variables are gone]\n"
            result = self._run(code)
        status = result["status"]
        output = note + result["output"]
        if result.get("truncated"):
            output += "\n[output truncated]"
        timed_out = status in ("killed",) or bool(result.get("interrupted"))
        if status == "killed":
            output += (
                f"\n[the cell ignored KeyboardInterrupt after the {self.timeout_s:g} s limit; the "
                "interpreter was killed and the next call starts a fresh one (variables are lost)]"
            )
            self.directory = None
        elif status == "interrupted" and timed_out:
            output += f"\n[cell interrupted after the {self.timeout_s:g} s time limit]"
        elif status == "dead":
            output += (
                "\n[the Python interpreter exited while running this cell; the next call starts a fresh one]"
            )
            self.directory = None
        edits = [{"path": p, "syntax_ok": None} for p in result.get("changed", [])]
        return ToolOutput(
            output=output if output.strip() else "[no output]",
            ok=status == "ok",
            timed_out=timed_out,
            edits=edits,
            commands=[code],
        )

    def _run(self, code: str) -> dict[str, Any]:
        assert self.directory is not None
        argv = [
            "python3",
            "-I",
            f"{self.directory}/client.py",
            self.directory,
            str(self.cell),
            str(self.timeout_s),
            str(self.grace_s),
            self.workdir,
        ]
        res = self.sandbox.exec(
            argv,
            timeout=self.timeout_s + self.grace_s + 15.0,
            cwd=self.workdir,
            stdin=code.encode("utf-8", "replace"),
        )
        header, _, output = res.stdout.partition("\n")
        try:
            if res.timed_out or res.exit_code != 0:
                raise ValueError("no reply")
            result = json.loads(header)
        except ValueError:
            self.directory = None
            raise ToolError(
                f"the Python tool's client failed (exit {res.exit_code}): {res.stderr.strip()[-300:]}"
            )
        result["output"] = output
        return result

    def close(self) -> None:
        """Stop the interpreter (a sandbox reset would too; this frees it for pooled sandboxes sooner)."""
        if self.directory is None:
            return
        directory, self.directory = self.directory, None
        try:
            self.sandbox.exec(
                ["bash", "-c", 'kill -9 "$(cat "$1/pid")" 2>/dev/null; rm -rf "$1"', "m2rl", directory],
                timeout=10.0,
            )
        except Exception:  # a dead sandbox has no interpreter left to stop
            logger.debug("stopping the python interpreter failed", exc_info=True)
