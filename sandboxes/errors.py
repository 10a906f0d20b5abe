"""Errors raised by sandboxes. Envs catch `SandboxDead` to end an episode; the rest is `SandboxError`."""


class SandboxError(RuntimeError):
    """Base class: a sandbox operation failed (bad input, missing engine, executor-side error)."""


class SandboxDead(SandboxError):
    """The sandbox is gone (container removed, executor killed, connection lost): end the episode."""


class EngineUnavailable(SandboxError):
    """The Docker engine does not answer (the message says how to start it)."""
