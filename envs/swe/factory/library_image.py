"""The Docker image a factory library's tasks run in: its repo as a seed, and a virtualenv to test it with.

Layout: the repository (with its .git) at SEED_DIR owned by uid 1000 (the sandbox mounts a fresh /testbed
and seeds it from there); a root-owned virtualenv at /opt/venv holding the library's runtime dependencies
and its test dependencies, installed with no index from wheels the HOST downloaded; PYTHONPATH points at
/testbed (or /testbed/src) so the code under test is the repo's, never an installed copy. The library's
own wheel is installed only to pull in its dependencies and then uninstalled; its metadata is put back
so `importlib.metadata.version(NAME)` still answers as it does in a developer's checkout.

The build container has no network at all: apt work happens once in SWE_BASE (m2rl's usual derived-image
path), and everything pip needs is on the host's disk. Tags are content hashes, so a rebuild is a lookup.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from m2rl.envs.swe.factory.known_libraries import KnownLibrary, pytest_command, requirements_for
from m2rl.envs.swe.factory.sources import LibraryError, LibrarySource
from m2rl.sandboxes.errors import SandboxError
from m2rl.sandboxes.images import (
    IMAGE_LABEL,
    SANDBOX_UID,
    ImageSpec,
    _client,
    _image_exists,
    _log,
    _put,
    _run,
    build_image,
    image_tag,
)
from packaging.utils import canonicalize_name, parse_wheel_filename

# Bump when the recipe below changes in a way the hashed inputs do not capture.
RECIPE_VERSION = "1"
# git: the agent's and the grader's diffs; patch: SWE-bench's fallback apply; python3-venv: /opt/venv.
SWE_BASE = ImageSpec(name="m2rl-swe-base", apt_packages=("git", "patch", "python3-venv"))
SEED_DIR = "/opt/m2rl/seed/testbed"
TESTBED = "/testbed"
VENV = "/opt/venv"
GIT_IDENTITY = ("m2rl agent", "agent@m2rl.invalid")
# Every platform tag bookworm (glibc 2.36) runs, listed: `pip download --platform` does not expand
# manylinux_2_X to the older tags (it only expands manylinux2014/2010).
WHEEL_PLATFORMS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(36, 4, -1)),
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
)
LABEL_LIBRARY, LABEL_VERSION, LABEL_COMMIT = "m2rl.swe.library", "m2rl.swe.version", "m2rl.swe.base_commit"
LABEL_TEST_CMD, LABEL_WHEELS = "m2rl.swe.test_cmd", "m2rl.swe.wheels"


def image_name(source: LibrarySource) -> str:
    return f"m2rl-swe-{source.canonical_name}"


def library_image_tag(source: LibrarySource, extra: KnownLibrary | None) -> str:
    payload = {
        "recipe": RECIPE_VERSION,
        "base": image_tag(SWE_BASE),
        "name": source.canonical_name,
        "version": source.version,
        "base_commit": source.base_commit,
        "package_root": source.package_root,
        "test_requirements": requirements_for(source, extra),
        "extra": asdict(extra) if extra else None,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return f"{image_name(source)}:{digest}"


def testbed_pythonpath(source: LibrarySource) -> str:
    return f"{TESTBED}/{source.package_root}" if source.package_root else TESTBED


def build_library_image(source: LibrarySource, extra: KnownLibrary | None = None, force: bool = False) -> str:
    """Build (or find by content hash) the library's image; returns its `m2rl-swe-<name>:<hash>` tag.
    LibraryError when the library has no pure-Python wheel, its dependencies do not install offline,
    or it does not import from the repo's sources."""
    import docker.errors

    client = _client()
    tag = library_image_tag(source, extra)
    if not force and _image_exists(client, tag):
        _log(f"image {tag} is up to date")
        return tag
    base = build_image(SWE_BASE)
    requirements = requirements_for(source, extra)
    _log(f"building {tag} from {base}")
    container = client.containers.create(
        base,
        command=["sleep", "infinity"],
        user="0",
        network_mode="none",
        network_disabled=True,
        labels={IMAGE_LABEL: "build"},
    )
    try:
        container.start()
        with tempfile.TemporaryDirectory(prefix="m2rl-swe-wheels-") as wheels:
            wheel_files = download_wheels(source, requirements, Path(wheels), _python_version(container))
            _put(container, Path(wheels), "/tmp/m2rl-wheels")
        _put(container, source.repo_dir, SEED_DIR)
        _run(container, _install_script(source, requirements))
        _check_imports(container, source)
        container.commit(
            repository=tag.split(":")[0],
            tag=tag.split(":")[1],
            changes=_image_changes(source, extra, wheel_files),
        )
    except SandboxError as exc:  # a failed build step is this library's problem, said in its terms
        raise LibraryError(f"{source.name}=={source.version}: {exc}") from exc
    finally:
        try:
            container.remove(force=True)
        except docker.errors.APIError:
            pass
    _log(f"built {tag}")
    return tag


def _python_version(container) -> str:
    code, out = container.exec_run(["python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
    if code != 0:
        raise LibraryError(f"python3 does not run in {SWE_BASE.name}: {out.decode(errors='replace')}")
    return out.decode().strip()


def download_wheels(
    source: LibrarySource, requirements: tuple[str, ...], dest: Path, python: str
) -> list[str]:
    """The host's pip fetches wheels for the sandbox's Python and platform (no sdists: nothing is built).
    The library's own wheel must be a pure-Python one (some releases ship both, with an optional C
    accelerator in the platform wheel); dependencies may be platform wheels. Returns the wheel file names
    (the resolved versions)."""
    pinned = f"{source.name}=={source.version}"
    _pip_download(
        ["--no-deps", "--platform", "any", pinned],
        dest,
        python,
        f"{pinned} has no pure-Python wheel for Python {python} (pure-Python libraries only)",
    )
    pure = sorted(dest.glob("*.whl"))
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    _pip_download(
        [*platforms, pinned, *requirements],
        dest,
        python,
        f"{pinned}'s dependencies and its test requirements {list(requirements)} have no complete set "
        f"of Python {python} wheels",
    )
    for wheel in dest.glob("*.whl"):  # the platform twin of the library's pure wheel, if pip took it
        if (
            wheel not in pure
            and canonicalize_name(parse_wheel_filename(wheel.name)[0]) == source.canonical_name
        ):
            wheel.unlink()
    return sorted(p.name for p in dest.glob("*.whl"))


def _pip_download(args: list[str], dest: Path, python: str, failure: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--only-binary=:all:",
        "--python-version",
        python,
        "-d",
        str(dest),
        *args,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if not line.startswith("WARNING: Location")]
        raise LibraryError(f"{failure}:\n" + "\n".join(errors)[-2000:])


def _install_script(source: LibrarySource, requirements: tuple[str, ...]) -> str:
    quoted = shlex.join((f"{source.name}=={source.version}", *requirements))
    name, email = GIT_IDENTITY
    return f"""set -e
python3 -m venv {VENV}
{VENV}/bin/pip install -q --disable-pip-version-check --no-index --find-links /tmp/m2rl-wheels {quoted}
{VENV}/bin/python - <<'EOF'
{_KEEP_METADATA.replace("NAME", source.name)}
EOF
rm -rf /tmp/m2rl-wheels
chmod -R go-w {VENV}
mkdir -p {TESTBED} && chown {SANDBOX_UID}:{SANDBOX_UID} {TESTBED}
printf '[user]\\n\\tname = {name}\\n\\temail = {email}\\n[safe]\\n\\tdirectory = *\\n' > /etc/gitconfig
"""


# Uninstall the library's wheel but keep its metadata and console scripts, as an editable install would:
# the code is the repo's, while `importlib.metadata.version()`, plugin entry points and CLI tests that run
# the library's command (e.g. `glom ...` in a subprocess) behave as in a developer's checkout.
_KEEP_METADATA = """
import importlib.metadata, pathlib, subprocess, sys
dist = importlib.metadata.distribution("NAME")
info = next(f for f in dist.files if f.name == "METADATA").locate().parent
kept = {n: (info / n).read_bytes() for n in ("METADATA", "entry_points.txt") if (info / n).is_file()}
subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "NAME"], check=True)
info.mkdir()
for n, data in kept.items():
    (info / n).write_bytes(data)
(info / "INSTALLER").write_text("m2rl-swe-factory\\n")
for ep in importlib.metadata.distribution("NAME").entry_points.select(group="console_scripts"):
    script = pathlib.Path(sys.prefix, "bin", ep.name)
    script.write_text(f"#!{sys.executable}\\nimport sys\\nfrom {ep.module} import {ep.attr.split('.')[0]}\\n"
                      f"sys.exit({ep.attr}())\\n")
    script.chmod(0o755)
"""


def _check_imports(container, source: LibrarySource) -> None:
    """Every top-level name imports from the seed's sources: a library that needs a compiled extension
    (or a missing runtime dependency) fails here, not in the first task."""
    seed_path = f"{SEED_DIR}/{source.package_root}".rstrip("/")
    probe = (
        f"import importlib, sys\nfor n in {list(source.import_names)!r}:\n"
        f"    m = importlib.import_module(n)\n"
        f"    where = m.__file__ or next(iter(getattr(m, '__path__', [])), '')\n"
        f"    assert where.startswith({seed_path!r}), (n, where)\n"
    )
    code, out = container.exec_run(
        [f"{VENV}/bin/python", "-c", probe],
        user=str(SANDBOX_UID),
        workdir=SEED_DIR,
        environment={"PYTHONPATH": seed_path, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    if code != 0:
        raise LibraryError(
            f"{source.name}=={source.version} does not import from its sources in the image "
            f"(needs a C build or a missing dependency?):\n{out.decode(errors='replace')[-2000:]}"
        )


def _image_changes(source: LibrarySource, extra: KnownLibrary | None, wheels: list[str]) -> list[str]:
    labels = {
        IMAGE_LABEL: image_name(source),
        LABEL_LIBRARY: source.name,
        LABEL_VERSION: source.version,
        LABEL_COMMIT: source.base_commit,
        LABEL_TEST_CMD: pytest_command(source, extra),
        LABEL_WHEELS: " ".join(wheels),
    }
    env = {
        "PATH": f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "VIRTUAL_ENV": VENV,
        "PYTHONPATH": testbed_pythonpath(source),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PIP_NO_INDEX": "1",
    }
    return (
        [f"LABEL {k}={json.dumps(v)}" for k, v in labels.items()]
        + [f"ENV {k}={v}" for k, v in env.items()]
        + [f"WORKDIR {TESTBED}"]
    )
