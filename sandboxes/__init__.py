"""m2rl.sandboxes: isolated machines where every tool call runs (Docker or bubblewrap).

from m2rl.sandboxes import make_sandbox
with make_sandbox("auto") as sb:
    result = sb.exec("echo hi")      # ExecResult(exit_code=0, stdout="hi\\n", ...)
"""

from m2rl.sandboxes.errors import EngineUnavailable, SandboxDead, SandboxError
from m2rl.sandboxes.factory import make_sandbox, resolve_backend
from m2rl.sandboxes.limits import Limits
from m2rl.sandboxes.pool import SandboxPool
from m2rl.sandboxes.result import ExecResult
from m2rl.sandboxes.sandbox import AsyncSandbox, Sandbox

__all__ = [
    "AsyncSandbox",
    "EngineUnavailable",
    "ExecResult",
    "Limits",
    "Sandbox",
    "SandboxDead",
    "SandboxError",
    "SandboxPool",
    "make_sandbox",
    "resolve_backend",
]
