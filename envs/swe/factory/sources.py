"""A PyPI library as a clean git repository: resolve its version, fetch its sdist, commit the sources once.

The sdist is the unit of truth: it is what the maintainers published with the tests they chose to ship,
it needs no git host, and its sha256 is on PyPI. `make_repo` extracts it safely (no absolute or `..`
members, no links out of the tree, no device files), drops build output (`*.egg-info`, `__pycache__`),
finds the package(s) and the tests, reads the test requirements the library declares, and makes one
commit with a fixed identity and date, so the same sdist always gives the same `base_commit`.
"""

from __future__ import annotations

import contextlib
import email.parser
import hashlib
import os
import posixpath
import re
import shutil
import ssl
import stat
import subprocess
import tarfile
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from m2rl.rewards.paths import TEST_DIR_NAMES, is_test_path
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

PYPI_JSON = "https://pypi.org/pypi"
# The machines here reach PyPI through a TLS-intercepting proxy whose CA is only in the system bundle;
# httpx's default (certifi) rejects it unless SSL_CERT_FILE happens to be set.
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
TEST_EXTRAS = frozenset({"test", "tests", "testing"})
# The sandbox's interpreter (Debian bookworm's python3): markers in declared requirements are evaluated
# for it, not for the host.
SANDBOX_MARKER_ENV = {
    "python_version": "3.11",
    "python_full_version": "3.11.2",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
}
# Fixed so that the commit sha depends on the sdist's content only.
COMMIT_ENV = {
    "GIT_AUTHOR_NAME": "m2rl factory",
    "GIT_AUTHOR_EMAIL": "factory@m2rl.invalid",
    "GIT_COMMITTER_NAME": "m2rl factory",
    "GIT_COMMITTER_EMAIL": "factory@m2rl.invalid",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00+0000",
    "GIT_COMMITTER_DATE": "2000-01-01T00:00:00+0000",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "TZ": "UTC",
}
MAX_UNPACKED_BYTES = 256 << 20  # an sdist of a small library is a few MB; this stops archive bombs
MAX_MEMBERS = 20_000
# Top-level directories that are never the library's package even when they hold an __init__.py.
NOT_PACKAGES = TEST_DIR_NAMES | {
    "docs",
    "doc",
    "examples",
    "example",
    "benchmarks",
    "bench",
    "scripts",
    "tools",
    "build",
    "dist",
    "src",
}
# Top-level modules that are build or task tooling, not the library (for single-module libraries).
TOOLING_MODULES = {
    "setup",
    "conftest",
    "noxfile",
    "fabfile",
    "tasks",
    "ez_setup",
    "versioneer",
    "bootstrap",
    "hatch_build",
    "build",
    "runtests",
    "run_tests",
    "make",
}
BUILD_JUNK_DIRS = ("__pycache__", ".eggs", ".tox", ".nox", ".pytest_cache", ".mypy_cache")


class LibraryError(ValueError):
    """This library cannot become a factory task (no sdist, no tests, no Python package, unsafe archive,
    needs a C build, ...); the message says which and why."""


@dataclass(frozen=True)
class LibrarySource:
    name: str  # the project name as PyPI spells it
    version: str
    sdist: Path  # the cached sdist file
    repo_dir: Path  # a clean git repository made from the sdist, one commit
    base_commit: str  # sha of that commit (reproducible: fixed identity and dates)
    package_root: str  # "" or "src": the directory that goes on PYTHONPATH
    test_paths: tuple[str, ...]  # repo-relative test directories / files
    source_files: tuple[str, ...]  # repo-relative non-test .py files of the package(s): mutation targets
    import_names: tuple[str, ...] = ()  # top-level importable packages / modules under package_root
    # PEP 508 strings (markers already evaluated for the sandbox) from the test extras, test dependency
    # groups and test requirements files the sdist declares; the library itself is not among them.
    declared_test_requirements: tuple[str, ...] = ()

    @property
    def canonical_name(self) -> str:
        return canonicalize_name(self.name)


def default_cache_dir() -> Path:
    return Path(os.environ.get("M2RL_FACTORY_CACHE") or Path.home() / ".cache" / "m2rl" / "factory")


# --------------------------------------------------------------------------- PyPI
def http_client() -> httpx.Client:
    cafile = os.environ.get("SSL_CERT_FILE") or (SYSTEM_CA_BUNDLE if Path(SYSTEM_CA_BUNDLE).is_file() else "")
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=cafile) if cafile else True
    return httpx.Client(verify=verify, timeout=60.0, follow_redirects=True)


@contextlib.contextmanager
def _using(client: httpx.Client | None) -> Iterator[httpx.Client]:
    if client is not None:
        yield client
        return
    with http_client() as own:
        yield own


def _project_json(client: httpx.Client, name: str) -> dict:
    # The project document, not /pypi/NAME/VERSION/json: the PyPI mirror these machines reach serves
    # only the former, and its `releases` map holds every version's files.
    url = f"{PYPI_JSON}/{name}/json"
    response = client.get(url)
    if response.status_code == 404:
        raise LibraryError(f"{name} is not on PyPI ({url} answered 404)")
    response.raise_for_status()
    return response.json()


def _release(doc: dict, version: str) -> tuple[str, list[dict]]:
    """(the version as PyPI spells it, its files); "4.8" finds "4.8.0" (PEP 440 equality)."""
    releases: dict[str, list[dict]] = doc.get("releases") or {}
    if version in releases:
        return version, releases[version]
    for spelled, files in releases.items():
        with contextlib.suppress(InvalidVersion):
            if Version(spelled) == Version(version):
                return spelled, files
    name = doc["info"]["name"]
    raise LibraryError(f"{name}=={version} is not on PyPI; latest releases: {list(releases)[-5:]}")


_SPEC = re.compile(r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(?:==\s*([A-Za-z0-9.+!_-]+))?\s*$")


def resolve(spec: str, client: httpx.Client | None = None) -> tuple[str, str]:
    """ "tinydb" -> ("tinydb", its latest version); "tinydb==4.8.0" -> ("tinydb", "4.8.0") once PyPI has it.
    The name comes back as PyPI spells the project ("Python_Dateutil" -> "python-dateutil")."""
    match = _SPEC.match(spec)
    if match is None:
        raise LibraryError(f"library spec {spec!r}: expected NAME or NAME==VERSION")
    name, pinned = match.groups()
    with _using(client) as http:
        doc = _project_json(http, name)
    if pinned is None:
        return doc["info"]["name"], doc["info"]["version"]
    return doc["info"]["name"], _release(doc, pinned)[0]


def fetch_sdist(
    name: str, version: str, cache_dir: Path | None = None, client: httpx.Client | None = None
) -> Path:
    """The release's sdist, downloaded once into `cache_dir/sdists` and checked against PyPI's sha256."""
    with _using(client) as http:
        urls = _release(_project_json(http, name), version)[1]
        sdists = [u for u in urls if u.get("packagetype") == "sdist"]
        if not sdists:
            raise LibraryError(
                f"{name}=={version} has no sdist on PyPI (only {[u['filename'] for u in urls]})"
            )
        entry = sdists[0]
        filename, expected = entry["filename"], entry["digests"]["sha256"]
        if "/" in filename or filename.startswith("."):
            raise LibraryError(f"{name}=={version}: refusing sdist file name {filename!r}")
        target = (cache_dir or default_cache_dir()) / "sdists" / filename
        if target.is_file() and _sha256(target) == expected:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".part-", delete=False) as part:
            try:
                # Mirrors may give file URLs relative to the JSON document.
                url = httpx.URL(f"{PYPI_JSON}/{name}/json").join(entry["url"])
                with http.stream("GET", url) as response:
                    response.raise_for_status()
                    for chunk in response.iter_bytes():
                        part.write(chunk)
                part.close()
                if (got := _sha256(Path(part.name))) != expected:
                    raise LibraryError(f"{filename}: sha256 {got} does not match PyPI's {expected}")
                os.replace(part.name, target)
            finally:
                Path(part.name).unlink(missing_ok=True)
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- safe extraction
def _check_member_path(archive: str, name: str) -> str:
    path = name.replace("\\", "/")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise LibraryError(f"{archive}: refusing absolute member path {name!r}")
    if ".." in path.split("/"):
        raise LibraryError(f"{archive}: refusing member path with '..': {name!r}")
    return posixpath.normpath(path)


def _check_tar(archive: str, members: list[tarfile.TarInfo]) -> None:
    if len(members) > MAX_MEMBERS:
        raise LibraryError(f"{archive}: {len(members)} members, more than {MAX_MEMBERS}")
    if sum(m.size for m in members if m.isfile()) > MAX_UNPACKED_BYTES:
        raise LibraryError(f"{archive}: unpacks to more than {MAX_UNPACKED_BYTES >> 20} MB")
    for m in members:
        path = _check_member_path(archive, m.name)
        if m.issym() or m.islnk():
            # A symlink's target is relative to its directory, a hard link's to the archive root; either
            # must stay inside the member's top-level directory, which becomes the repository.
            top = path.split("/")[0]
            target = posixpath.normpath(
                posixpath.join(posixpath.dirname(path), m.linkname) if m.issym() else m.linkname
            )
            if m.linkname.startswith("/") or not (target == top or target.startswith(top + "/")):
                raise LibraryError(f"{archive}: refusing link {m.name!r} -> {m.linkname!r} out of the tree")
        elif not (m.isfile() or m.isdir()):
            raise LibraryError(f"{archive}: refusing special file {m.name!r}")


def extract_sdist(sdist: Path, dest: Path) -> None:
    """Unpack the sdist's single top-level directory as `dest` (which must not exist)."""
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".unpack-") as tmp:
        if sdist.name.endswith(".zip"):
            with zipfile.ZipFile(sdist) as zf:
                infos = zf.infolist()
                if len(infos) > MAX_MEMBERS or sum(i.file_size for i in infos) > MAX_UNPACKED_BYTES:
                    raise LibraryError(f"{sdist.name}: too many members or too large unpacked")
                for info in infos:
                    _check_member_path(sdist.name, info.filename)
                zf.extractall(tmp)  # zipfile writes links as plain files: nothing can point outside
        else:
            with tarfile.open(sdist) as tf:
                members = tf.getmembers()
                _check_tar(sdist.name, members)
                # The "data" filter re-checks all of the above and drops setuid bits and ownership.
                tf.extractall(tmp, members=members, filter="data")
        tops = list(Path(tmp).iterdir())
        if len(tops) != 1 or not tops[0].is_dir():
            found = sorted(p.name for p in tops)
            raise LibraryError(f"{sdist.name}: expected one top-level directory, found {found}")
        tops[0].rename(dest)
    _normalise_modes(dest)


def _normalise_modes(root: Path) -> None:
    """git records only 644/755; fix modes here so the tree (and the sha) never depends on the umask."""
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            continue
        if stat.S_ISDIR(st.st_mode):
            path.chmod(0o755)
        else:
            path.chmod(0o755 if st.st_mode & 0o111 else 0o644)


def _drop_build_junk(root: Path) -> None:
    """Build output a source checkout does not have. PKG-INFO stays: setuptools-scm and hatch-vcs read
    the version from it when they build outside the original git history."""
    for path in sorted(root.rglob("*"), reverse=True):
        junk_dir = path.name.endswith(".egg-info") or path.name in BUILD_JUNK_DIRS
        if junk_dir and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.suffix in (".pyc", ".pyo") and path.is_file():
            path.unlink()


# --------------------------------------------------------------------------- declared test requirements
def _evaluated(line: str, extra: str = "") -> Requirement | None:
    try:
        req = Requirement(line)
    except InvalidRequirement:
        return None  # paths, URLs, editable installs: not something pip can fetch from PyPI by name
    if req.url:
        return None
    if req.marker is not None and not req.marker.evaluate({**SANDBOX_MARKER_ENV, "extra": extra}):
        return None
    req.marker = None
    return req


def _extras_map(root: Path) -> dict[str, list[str]]:
    """extra name -> its requirement lines, from PKG-INFO, pyproject's [project] and egg-info requires.txt."""
    extras: dict[str, list[str]] = {}
    pkg_info = root / "PKG-INFO"
    if pkg_info.is_file():
        meta = email.parser.Parser().parsestr(pkg_info.read_text(encoding="utf-8", errors="replace"))
        for line in meta.get_all("Requires-Dist") or []:
            for extra in _marker_extras(line):
                extras.setdefault(extra, []).append(line)
    pyproject = _pyproject(root)
    for extra, lines in (pyproject.get("project", {}).get("optional-dependencies") or {}).items():
        extras.setdefault(canonicalize_name(extra), []).extend(str(x) for x in lines)
    for requires in [*root.glob("*.egg-info/requires.txt"), *root.glob("src/*.egg-info/requires.txt")]:
        section, condition = "", ""
        for raw in requires.read_text(encoding="utf-8", errors="replace").splitlines():
            line = raw.strip()
            if line.startswith("[") and line.endswith("]"):
                extra, _, marker = line[1:-1].partition(":")
                section = canonicalize_name(extra) if extra else ""
                condition = f" ; {marker}" if marker else ""
            elif line and section:
                extras.setdefault(section, []).append(line + condition)
    return extras


def _marker_extras(line: str) -> list[str]:
    """The extras a Requires-Dist line belongs to (`; extra == "test"`), canonicalised."""
    try:
        marker = Requirement(line).marker
    except InvalidRequirement:
        return []
    if marker is None:
        return []
    return sorted(
        {canonicalize_name(m) for m in re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", str(marker))}
    )


def _pyproject(root: Path) -> dict:
    path = root / "pyproject.toml"
    try:
        return tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}


def _dependency_group(groups: dict, name: str, seen: set[str]) -> list[str]:
    """PEP 735 group lines, following `{include-group = ...}`."""
    lines: list[str] = []
    for item in groups.get(name) or []:
        if isinstance(item, str):
            lines.append(item)
        elif isinstance(item, dict) and (included := item.get("include-group")) and included not in seen:
            seen.add(included)
            lines += _dependency_group(groups, str(included), seen)
    return lines


_REQUIREMENTS_FILE = re.compile(r"^(requirements[-_]tests?|tests?[-_]requirements)([-_.].*)?\.txt$")


def _requirements_files(root: Path) -> list[Path]:
    found = [p for p in root.glob("*.txt") if _REQUIREMENTS_FILE.match(p.name)]
    found += list(root.glob("requirements/test*.txt")) + list(root.glob("tests/requirements*.txt"))
    return sorted(p for p in found if p.is_file())


def _requirements_lines(path: Path, root: Path, depth: int = 0) -> list[str]:
    lines: list[str] = []
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if line.startswith(("-r ", "--requirement ")) and depth < 3:
            included = (path.parent / line.split(None, 1)[1].strip()).resolve()
            if included.is_file() and included.is_relative_to(root.resolve()):
                lines += _requirements_lines(included, root, depth + 1)
        elif line and not line.startswith("-"):  # -e, -c and pip options name nothing to fetch by name
            lines.append(line)
    return lines


def declared_test_requirements(root: Path, name: str) -> tuple[str, ...]:
    """What the sdist says its tests need: the test/tests/testing extras (self-references like
    `attrs[tests-no-zope]` expanded), PEP 735 groups of those names, and test requirements files."""
    extras = _extras_map(root)
    own = canonicalize_name(name)
    # (requirement line, the extra it came from: its marker may say `extra == "tests"`)
    lines = [(line, extra) for extra in sorted(TEST_EXTRAS) for line in extras.get(extra, [])]
    groups = _pyproject(root).get("dependency-groups") or {}
    lines += [
        (line, "")
        for group in sorted(groups)
        if canonicalize_name(group) in TEST_EXTRAS
        for line in _dependency_group(groups, group, {group})
    ]
    lines += [(line, "") for path in _requirements_files(root) for line in _requirements_lines(path, root)]
    found: dict[str, None] = {}
    expanded: set[str] = set(TEST_EXTRAS)
    while lines:
        line, extra = lines.pop(0)
        req = _evaluated(line, extra)
        if req is None:
            continue
        if canonicalize_name(req.name) == own:  # the library itself: take the extras it names
            for sub in sorted(
                canonicalize_name(e) for e in req.extras if canonicalize_name(e) not in expanded
            ):
                expanded.add(sub)
                lines += [(x, sub) for x in extras.get(sub, [])]
            continue
        found.setdefault(str(req), None)
    return tuple(found)


# --------------------------------------------------------------------------- layout
def _is_test_file(name: str) -> bool:
    return name.endswith(".py") and (name.startswith("test_") or name.endswith("_test.py"))


def _has_test_files(directory: Path) -> bool:
    return any(_is_test_file(p.name) for p in directory.rglob("*.py"))


def find_packages(root: Path, name: str) -> tuple[str, tuple[str, ...]]:
    """(package_root, top-level import names): packages (directories with __init__.py) under "src" or
    the root; top-level modules count only when there is no package or they carry the project's name."""
    src = root / "src"
    package_root = (
        "src"
        if src.is_dir()
        and any((p.is_dir() and p.name.isidentifier()) or p.suffix == ".py" for p in src.iterdir())
        else ""
    )
    base = root / package_root
    packages = [
        d.name
        for d in sorted(base.iterdir())
        if d.is_dir()
        and d.name.isidentifier()
        and d.name not in NOT_PACKAGES
        and (d / "__init__.py").is_file()
    ]
    if package_root and not packages:  # a PEP 420 namespace (src/jaraco/text/__init__.py)
        packages = [
            d.name
            for d in sorted(base.iterdir())
            if d.is_dir() and d.name.isidentifier() and any(base.glob(f"{d.name}/**/__init__.py"))
        ]
    wanted = {canonicalize_name(name).replace("-", "_"), canonicalize_name(name).split("-")[-1]}
    modules = [
        p.stem
        for p in sorted(base.glob("*.py"))
        if p.stem.isidentifier()
        and not is_test_path(p.name)
        and p.stem not in TOOLING_MODULES
        and (not packages or p.stem.lower() in wanted)
    ]
    return package_root, tuple(packages + modules)


def find_tests(root: Path, package_root: str, import_names: tuple[str, ...]) -> tuple[str, ...]:
    """Top-level test directories and files, then test directories inside the package(s)."""
    found = [
        entry.name
        for entry in sorted(root.iterdir())
        if (entry.is_dir() and entry.name in TEST_DIR_NAMES and _has_test_files(entry))
        or (entry.is_file() and _is_test_file(entry.name))
    ]
    base = root / package_root
    for top in import_names:
        if not (base / top).is_dir():
            continue
        for d in sorted(p for p in (base / top).rglob("*") if p.is_dir()):
            rel = d.relative_to(root).as_posix()
            inside_found = any(rel.startswith(f + "/") for f in found)
            if d.name in TEST_DIR_NAMES and not inside_found and _has_test_files(d):
                found.append(rel)
    return tuple(found)


def find_source_files(root: Path, package_root: str, import_names: tuple[str, ...]) -> tuple[str, ...]:
    base = root / package_root
    files: list[str] = []
    for top in import_names:
        paths = sorted((base / top).rglob("*.py")) if (base / top).is_dir() else [base / f"{top}.py"]
        files += [p.relative_to(root).as_posix() for p in paths if p.is_file() and not p.is_symlink()]
    return tuple(f for f in files if not is_test_path(f))


# --------------------------------------------------------------------------- the repository
def git(repo: Path, *args: str, stdin: str | None = None) -> str:
    """Run git in `repo` with the fixed identity and dates of COMMIT_ENV; its stdout, as printed."""
    # Only PATH from the caller: a GIT_DIR or GIT_INDEX_FILE in its environment must not redirect us.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **COMMIT_ENV}
    proc = subprocess.run(["git", *args], cwd=repo, env=env, input=stdin, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise LibraryError(f"git {' '.join(args)} failed in {repo}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def commit_tree(repo: Path, message: str) -> str:
    """`git init` + one commit of everything (ignored files too: the sdist is the release as shipped)."""
    git(repo, "init", "-q", "--template=", "-b", "main")
    git(repo, "add", "--all", "--force", ".")
    git(repo, "-c", "commit.gpgsign=false", "commit", "-q", "--no-verify", "-m", message)
    return git(repo, "rev-parse", "HEAD").strip()


def make_repo(name: str, version: str, sdist: Path, work_dir: Path) -> LibrarySource:
    """Extract the sdist into `work_dir/<name>-<version>` (replacing what was there) and commit it."""
    work_dir.mkdir(parents=True, exist_ok=True)
    repo = work_dir / f"{canonicalize_name(name)}-{version}"
    if repo.exists():
        shutil.rmtree(repo)
    extract_sdist(sdist, repo)
    # Read before the egg-info goes: old setuptools sdists keep extras only in requires.txt.
    test_requirements = declared_test_requirements(repo, name)
    _drop_build_junk(repo)
    package_root, import_names = find_packages(repo, name)
    if not import_names:
        raise LibraryError(f"{sdist.name}: no Python package or module found at the top level or under src/")
    test_paths = find_tests(repo, package_root, import_names)
    if not test_paths:
        raise LibraryError(
            f"{sdist.name}: the sdist ships no tests (no test_*.py / *_test.py in tests/, "
            f"test/, testing/, the package, or the top level)"
        )
    source_files = find_source_files(repo, package_root, import_names)
    if not source_files:
        raise LibraryError(f"{sdist.name}: the package(s) {import_names} have no non-test .py files")
    base_commit = commit_tree(repo, f"{name} {version} (PyPI sdist {sdist.name})")
    return LibrarySource(
        name=name,
        version=version,
        sdist=sdist,
        repo_dir=repo,
        base_commit=base_commit,
        package_root=package_root,
        test_paths=test_paths,
        source_files=source_files,
        import_names=import_names,
        declared_test_requirements=test_requirements,
    )
