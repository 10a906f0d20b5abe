"""Which Docker image runs an SWE instance, and the sandbox layout an image must have.

Sandboxes mount a fresh tmpfs at /testbed and seed it from `/opt/m2rl/seed/testbed` (see
`m2rl.sandboxes.sandbox.SEED_ROOT`), so an image holds its repository there, owned by the sandbox user.

In order of preference:
1. An official SWE-bench eval image (`sweb.eval.x86_64.<id>`, with or without the `swebench/` namespace)
   present in the local engine: a thin derived image moves its /testbed to the seed directory (built
   once, tagged by the official image's id).
2. The instance's own `image` (our factory's images), when the local engine has it.
3. A builder (the task factory rebuilds its images from the task directory's recipes).
Otherwise: a clear error naming the image and how to build it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from m2rl.envs.swe.instances import SWEInstance, official_image_name
from m2rl.sandboxes.docker_backend import docker_client, image_exists
from m2rl.sandboxes.errors import SandboxError
from m2rl.sandboxes.images import IMAGE_LABEL, SANDBOX_UID
from m2rl.sandboxes.sandbox import SEED_ROOT

logger = logging.getLogger(__name__)

REPO_ROOT = "/testbed"
SEED_DIR = SEED_ROOT + REPO_ROOT
OFFICIAL_NAMESPACES = ("", "swebench/")
# Moves the official repository to where sandboxes seed /testbed from; adds the sandbox user if missing.
_ADAPT_OFFICIAL = f"""set -e
id -u {SANDBOX_UID} >/dev/null 2>&1 || useradd -u {SANDBOX_UID} -m sandbox 2>/dev/null || \
  echo "sandbox:x:{SANDBOX_UID}:{SANDBOX_UID}::/home/sandbox:/bin/bash" >> /etc/passwd
mkdir -p /home/sandbox /work {SEED_ROOT}
chown {SANDBOX_UID}:{SANDBOX_UID} /home/sandbox /work
cp -a {REPO_ROOT} {SEED_DIR}
chown -R {SANDBOX_UID}:{SANDBOX_UID} {SEED_DIR}
git config --system --add safe.directory '*'
command -v python3 >/dev/null
"""

ImageBuilder = Callable[[SWEInstance], str]


def official_image(instance_id: str) -> str | None:
    """The official eval image of an instance if the local engine has it."""
    name = official_image_name(instance_id)
    for namespace in OFFICIAL_NAMESPACES:
        ref = f"{namespace}{name}:latest"
        if image_exists(ref):
            return ref
    return None


def adapt_official(official: str) -> str:
    """A derived image of an official one with the seed layout (built once; tagged by the official id)."""
    client = docker_client()
    short_id = client.api.inspect_image(official)["Id"].split(":")[-1][:16]
    tag = f"m2rl-swe-official:{short_id}"
    if image_exists(tag):
        return tag
    logger.info("adapting %s to the sandbox layout as %s", official, tag)
    container = client.containers.create(official, command=["sleep", "infinity"], user="0",
                                         network_disabled=True, labels={IMAGE_LABEL: "build"})
    try:
        container.start()
        code, out = container.exec_run(["bash", "-c", _ADAPT_OFFICIAL], user="0")
        if code != 0:
            raise SandboxError(f"could not adapt {official} to the sandbox layout: {out.decode(errors='replace')[-2000:]}")
        container.commit(repository=tag.split(":")[0], tag=tag.split(":")[1],
                         changes=[f"LABEL {IMAGE_LABEL}=swe-official", "USER 0"])
    finally:
        container.remove(force=True)
    return tag


def resolve_image(instance: SWEInstance, builder: ImageBuilder | None = None) -> str:
    """The image an instance's sandboxes start from (see the module docstring for the order)."""
    official = official_image(instance.instance_id)
    if official is not None:
        return adapt_official(official)
    if instance.image and image_exists(instance.image):
        return instance.image
    if builder is not None:
        return builder(instance)
    wanted = instance.image or official_image_name(instance.instance_id)
    raise SandboxError(
        f"no image for SWE instance {instance.instance_id}: {wanted!r} is not in the local Docker engine. "
        "Build the images of a task directory with `m2rl tasks images DIR`, or load the official "
        f"{official_image_name(instance.instance_id)!r} image into the engine"
    )
