"""An image holding a library's instances: the library image plus the instances' base commits in the seed
repository's `.git` (the sandbox checks one out and re-initialises the history at reset, see
`m2rl.envs.swe.repository`). One thin layer; tagged by the library image and the commits it holds, so
the same build finds it again instead of rebuilding."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Sequence
from pathlib import Path

from m2rl.envs.swe.factory.library_image import SEED_DIR
from m2rl.envs.swe.factory.sources import LibraryError, LibrarySource, git
from m2rl.sandboxes.docker_backend import docker_client, image_exists
from m2rl.sandboxes.images import IMAGE_LABEL, SANDBOX_UID, SANDBOX_USER


def instance_image_tag(library_image: str, commits: Sequence[str]) -> str:
    digest = hashlib.sha256("\n".join([library_image, *sorted(commits)]).encode()).hexdigest()[:16]
    return f"{library_image.split(':')[0]}-tasks:{digest}"


def _git_dir_tar(repo: Path) -> bytes:
    """The repository's .git as a tar placed at SEED_DIR/.git, owned by the sandbox user."""
    buf = io.BytesIO()

    def owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = SANDBOX_UID
        info.uname = info.gname = SANDBOX_USER
        return info

    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(str(repo / ".git"), arcname=f"{SEED_DIR.lstrip('/')}/.git", filter=owned)
    return buf.getvalue()


def build_instance_image(source: LibrarySource, library_image: str, commits: Sequence[str]) -> str:
    """The library image with `commits` (reachable from tags in `source.repo_dir`) in its seed repo."""
    tag = instance_image_tag(library_image, commits)
    if image_exists(tag):
        return tag
    repo = source.repo_dir
    git(repo, "checkout", "-q", "-f", source.base_commit)
    git(repo, "gc", "-q", "--prune=now")  # one pack: the seed copy and every snapshot restore stay small
    client = docker_client()
    container = client.containers.create(library_image, command=["sleep", "infinity"], user="0",
                                         network_disabled=True, labels={IMAGE_LABEL: "build"})
    try:
        container.start()
        code, out = container.exec_run(["rm", "-rf", f"{SEED_DIR}/.git"], user="0")
        if code != 0:
            raise LibraryError(f"could not replace the seed repository's history: {out.decode(errors='replace')}")
        container.put_archive("/", _git_dir_tar(repo))
        check = " && ".join(f"git -C {SEED_DIR} cat-file -e {c}^{{commit}}" for c in commits)
        code, out = container.exec_run(["bash", "-c", check], user=str(SANDBOX_UID))
        if code != 0:
            raise LibraryError(f"the instance commits are missing from {tag}: {out.decode(errors='replace')[-500:]}")
        repository, version = tag.split(":")
        container.commit(repository=repository, tag=version, changes=[f"LABEL {IMAGE_LABEL}={repository}"])
    finally:
        container.remove(force=True)
    return tag
