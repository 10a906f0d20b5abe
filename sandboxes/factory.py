"""`make_sandbox`: the one entry point envs use to get a sandbox of either backend."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

from m2rl.sandboxes.errors import SandboxError
from m2rl.sandboxes.limits import Limits
from m2rl.sandboxes.sandbox import Sandbox

BACKENDS = ("docker", "bwrap", "auto")


def resolve_backend(backend: str = "auto", image: str | None = None) -> str:
    """'auto' -> 'docker' when the engine answers and the image exists, else 'bwrap'."""
    if backend not in BACKENDS:
        raise SandboxError(f"unknown sandbox backend {backend!r}; choose one of {BACKENDS}")
    if backend != "auto":
        return backend
    from m2rl.sandboxes.docker_backend import engine_available, image_exists
    from m2rl.sandboxes.images import default_image

    if engine_available() and image_exists(image or default_image()):
        return "docker"
    return "bwrap"


def make_sandbox(
    backend: str = "auto", image: str | None = None, limits: Limits | dict | None = None, **options: Any
) -> Sandbox:
    """Start a sandbox. Options: docker: reset_strategy, start_timeout; bwrap: start_timeout, python."""
    if isinstance(limits, dict):
        try:
            limits = Limits(**limits)
        except TypeError as exc:
            raise SandboxError(f"bad sandbox limits {limits}: {exc}") from exc
    if limits is not None and not isinstance(limits, Limits):
        raise SandboxError(f"limits must be a Limits or a dict, got {type(limits).__name__}")
    chosen = resolve_backend(backend, image)
    if chosen == "docker":
        from m2rl.sandboxes.docker_backend import DockerSandbox as cls
    else:
        from m2rl.sandboxes.bwrap_backend import BwrapSandbox as cls

        if image is not None:
            # bubblewrap runs on the host's read-only /usr: a Docker image cannot apply.
            warnings.warn(
                f"bwrap sandbox ignores image {image!r} (it binds the host's /usr read-only)", stacklevel=2
            )
        image = None
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "image", "limits"}
    unknown = set(options) - allowed
    if unknown:
        raise SandboxError(
            f"unknown option(s) {sorted(unknown)} for the {chosen} backend; allowed: {sorted(allowed)}"
        )
    if chosen == "docker":
        return cls(image=image, limits=limits, **options)
    return cls(limits=limits, **options)
