"""Sandbox images built offline: a debootstrap base image and small derived images, tagged by content hash.

No registry is reachable from the machines this runs on, so the base image is made with
`debootstrap --variant=minbase` and `docker import`. Derived images add Debian packages (apt inside a
build container on the host network), pip packages (wheels downloaded by the HOST's pip, installed inside
with `--no-index`) and files. Every tag is `<name>:<content hash>`, so a build whose inputs did not change
is a no-op lookup, and changing a derived spec never rebuilds the base.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from m2rl.sandboxes.errors import SandboxError

# Bump when the build recipe below changes in a way the spec fields do not capture.
RECIPE_VERSION = "3"
SANDBOX_UID = 1000
SANDBOX_USER = "sandbox"
# Files a derived spec places under /work go here instead: the sandbox mounts a fresh tmpfs on /work and
# the in-sandbox executor seeds it from this directory (see executor.py).
WORK_SEED_DIR = "/opt/m2rl/seed/work"
IMAGE_LABEL = "m2rl.image"


@dataclass(frozen=True)
class BaseSpec:
    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    # python3: envs run a persistent Python interpreter inside sandboxes; procps: `ps`/`kill` for agents.
    packages: tuple[str, ...] = ("python3", "ca-certificates", "procps")
    name: str = "m2rl-base"


@dataclass(frozen=True)
class ImageSpec:
    """A derived image. `files` maps an absolute destination path to a host path (file or directory)."""

    name: str
    base: str = "base"  # "base" = the default base image, else an existing image reference
    apt_packages: tuple[str, ...] = ()
    pip_packages: tuple[str, ...] = ()
    files: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> ImageSpec:
        known = {"name", "base", "apt_packages", "pip_packages", "files", "env"}
        unknown = set(d) - known
        if unknown:
            raise SandboxError(
                f"image spec {source}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}"
            )
        if not isinstance(d.get("name"), str) or not d["name"]:
            raise SandboxError(f"image spec {source}: 'name' (a non-empty string) is required")
        for key in ("apt_packages", "pip_packages"):
            if not isinstance(d.get(key, []), list) or not all(isinstance(x, str) for x in d.get(key, [])):
                raise SandboxError(f"image spec {source}: '{key}' must be a list of strings")
        for key in ("files", "env"):
            if not isinstance(d.get(key, {}), dict):
                raise SandboxError(f"image spec {source}: '{key}' must be a mapping")
        files = {str(k): str(v) for k, v in d.get("files", {}).items()}
        for dest in files:
            if not dest.startswith("/"):
                raise SandboxError(f"image spec {source}: file destination {dest!r} must be an absolute path")
        return cls(
            name=d["name"],
            base=str(d.get("base", "base")),
            apt_packages=tuple(d.get("apt_packages", [])),
            pip_packages=tuple(d.get("pip_packages", [])),
            files=files,
            env={str(k): str(v) for k, v in d.get("env", {}).items()},
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ImageSpec:
        path = Path(path)
        if not path.is_file():
            raise SandboxError(f"image spec file not found: {path}")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise SandboxError(f"image spec {path} is not UTF-8 text "
                               f"(byte 0x{raw[e.start]:02x} on line {line}, offset {e.start})") from None
        data = _parse_spec_text(text, path)
        if not isinstance(data, dict):
            raise SandboxError(f"image spec {path}: expected a mapping at the top level")
        files = data.get("files") or {}
        if not isinstance(files, dict):
            raise SandboxError(f"image spec {path}: 'files' must be a mapping")
        # Relative host paths in `files` are relative to the spec file.
        files = {dest: str((path.parent / str(src)).resolve()) for dest, src in files.items()}
        return cls.from_dict({**data, "files": files}, source=str(path))


def _parse_spec_text(text: str, path: Path) -> object:
    """YAML (.yaml/.yml) or JSON; a syntax error is a SandboxError naming the file and line."""
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise SandboxError(f"image spec {path}: bad YAML{where}: {getattr(e, 'problem', None) or e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise SandboxError(f"image spec {path}: bad JSON line {e.lineno}, column {e.colno}: {e.msg}") from e


def _hash_path(h: hashlib._Hash, path: Path) -> None:
    if not path.exists():
        raise SandboxError(f"image spec file source does not exist: {path}")
    if path.is_dir():
        for sub in sorted(path.rglob("*")):
            if sub.is_file():
                h.update(str(sub.relative_to(path)).encode() + b"\0" + sub.read_bytes())
    else:
        h.update(path.read_bytes())


def base_hash(spec: BaseSpec = BaseSpec()) -> str:
    payload = json.dumps({"recipe": RECIPE_VERSION, **asdict(spec), "uid": SANDBOX_UID}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def base_tag(spec: BaseSpec = BaseSpec()) -> str:
    return f"{spec.name}:{base_hash(spec)}"


def default_image() -> str:
    """The image sandboxes use when none is named: the base image of the current recipe."""
    return base_tag()


def image_hash(spec: ImageSpec) -> str:
    h = hashlib.sha256()
    base = base_tag() if spec.base == "base" else spec.base
    h.update(
        json.dumps(
            {
                "recipe": RECIPE_VERSION,
                "base": base,
                "apt": spec.apt_packages,
                "pip": spec.pip_packages,
                "env": spec.env,
                "files": sorted(spec.files),
            },
            sort_keys=True,
        ).encode()
    )
    for dest in sorted(spec.files):
        _hash_path(h, Path(spec.files[dest]))
    return h.hexdigest()[:16]


def image_tag(spec: ImageSpec) -> str:
    return f"{spec.name}:{image_hash(spec)}"


def _client():
    from m2rl.sandboxes.docker_backend import docker_client

    return docker_client()


def _image_exists(client, tag: str) -> bool:
    import docker.errors

    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def _log(msg: str) -> None:
    print(f"[images] {msg}", file=sys.stderr, flush=True)


def build_base(spec: BaseSpec = BaseSpec(), force: bool = False) -> str:
    """Build (or find cached) the base image; returns its tag. Needs root, debootstrap, the Debian mirror."""
    client = _client()
    tag = base_tag(spec)
    if not force and _image_exists(client, tag):
        _log(f"base image {tag} is up to date")
        return tag
    if os.geteuid() != 0:
        raise SandboxError(
            "building the base image needs root (debootstrap); run `m2rl images build` as root"
        )
    if shutil.which("debootstrap") is None:
        raise SandboxError("debootstrap is not installed: `apt-get install -y debootstrap`")
    with tempfile.TemporaryDirectory(prefix="m2rl-rootfs-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        cmd = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(spec.packages)}",
            spec.suite,
            str(rootfs),
            spec.mirror,
        ]
        _log(f"debootstrap {spec.suite} -> {tag} (about a minute)")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SandboxError(
                f"debootstrap failed ({proc.returncode}): {proc.stderr[-2000:] or proc.stdout[-2000:]}"
            )
        _add_sandbox_user(rootfs)
        # Keep the image small: apt lists and caches are not needed at run time.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (rootfs / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        tar = subprocess.Popen(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE
        )
        imp = subprocess.run(
            [
                "docker",
                "import",
                "--change",
                f"LABEL {IMAGE_LABEL}=base",
                "--change",
                "ENV LANG=C.UTF-8",
                "-",
                tag,
            ],
            stdin=tar.stdout,
            capture_output=True,
            text=True,
        )
        tar.wait()
        if imp.returncode != 0 or tar.returncode != 0:
            raise SandboxError(f"docker import failed: {imp.stderr.strip()}")
    _log(f"built base image {tag}")
    return tag


def _add_sandbox_user(rootfs: Path) -> None:
    """A fixed non-root user (uid 1000) and the directories every sandbox mounts over."""
    with open(rootfs / "etc/passwd", "a") as f:
        f.write(f"{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_UID}::/home/{SANDBOX_USER}:/bin/bash\n")
    with open(rootfs / "etc/group", "a") as f:
        f.write(f"{SANDBOX_USER}:x:{SANDBOX_UID}:\n")
    for d in (f"home/{SANDBOX_USER}", "work", "opt/m2rl", WORK_SEED_DIR.lstrip("/")):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    for d in (f"home/{SANDBOX_USER}", "work"):
        os.chown(rootfs / d, SANDBOX_UID, SANDBOX_UID)


def build_image(spec: ImageSpec, force: bool = False) -> str:
    """Build (or find cached) a derived image; returns its `name:hash` tag."""
    import docker.errors

    client = _client()
    base = build_base() if spec.base == "base" else spec.base
    if not _image_exists(client, base):
        raise SandboxError(f"base image {base!r} of spec {spec.name!r} does not exist; build it first")
    tag = image_tag(spec)
    if not force and _image_exists(client, tag):
        _log(f"image {tag} is up to date")
        return tag
    _log(f"building {tag} from {base}")
    # Root and the host network only at build time; sandboxes never run like this.
    container = client.containers.create(
        base, command=["sleep", "infinity"], user="0", network_mode="host", labels={IMAGE_LABEL: "build"}
    )
    try:
        container.start()
        if spec.apt_packages:
            _run(
                container,
                "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                "--no-install-recommends " + " ".join(spec.apt_packages) + " && rm -rf /var/lib/apt/lists/*",
            )
        if spec.pip_packages:
            _install_wheels(container, spec.pip_packages)
        for dest, src in sorted(spec.files.items()):
            _put(container, Path(src), _seeded(dest))
        changes = [f"LABEL {IMAGE_LABEL}={spec.name}"] + [f"ENV {k}={v}" for k, v in sorted(spec.env.items())]
        container.commit(repository=tag.split(":")[0], tag=tag.split(":")[1], changes=changes)
    finally:
        try:
            container.remove(force=True)
        except docker.errors.APIError:
            pass
    _log(f"built {tag}")
    return tag


def _seeded(dest: str) -> str:
    return WORK_SEED_DIR + dest[len("/work") :] if dest == "/work" or dest.startswith("/work/") else dest


def _run(container, script: str) -> None:
    code, out = container.exec_run(["bash", "-c", script], user="0")
    if code != 0:
        raise SandboxError(
            f"image build step failed ({code}): {script}\n{out.decode(errors='replace')[-3000:]}"
        )


def _install_wheels(container, packages: tuple[str, ...]) -> None:
    """Wheels are fetched by the host (which reaches PyPI) for the sandbox's Python, installed offline."""
    code, out = container.exec_run(["python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
    pyver = out.decode().strip()
    with tempfile.TemporaryDirectory(prefix="m2rl-wheels-") as wheels:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--only-binary=:all:",
            "--python-version",
            pyver,
            "--platform",
            "manylinux2014_x86_64",
            "--platform",
            "manylinux_2_28_x86_64",
            "--platform",
            "linux_x86_64",
            "-d",
            wheels,
            *packages,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SandboxError(f"pip download failed for {list(packages)}: {proc.stderr[-2000:]}")
        _put(container, Path(wheels), "/tmp/m2rl-wheels")
    # The minbase image has no pip: install it from Debian, then the wheels with no index at all.
    _run(
        container,
        "python3 -m pip --version >/dev/null 2>&1 || (apt-get update -qq && "
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip "
        "&& rm -rf /var/lib/apt/lists/*)",
    )
    _run(
        container,
        "python3 -m pip install -q --break-system-packages --no-index --find-links /tmp/m2rl-wheels "
        + " ".join(f"'{p}'" for p in packages)
        + " && rm -rf /tmp/m2rl-wheels",
    )


def _put(container, src: Path, dest: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(str(src), arcname=dest.lstrip("/"), filter=_owned_by_sandbox)
    container.put_archive("/", buf.getvalue())


def _owned_by_sandbox(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = SANDBOX_UID
    info.uname = info.gname = SANDBOX_USER
    return info
