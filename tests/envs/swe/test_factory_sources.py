"""Library sources for the task factory: PyPI lookups (through a scripted HTTP double), safe sdist extraction,
package / test / requirement detection, the reproducible one-commit repository, and the default test command."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import httpx
import pytest
from m2rl.envs.swe.factory.known_libraries import KnownLibrary, lookup, pytest_command, requirements_for
from m2rl.envs.swe.factory.sources import (
    LibraryError,
    LibrarySource,
    declared_test_requirements,
    fetch_sdist,
    make_repo,
    resolve,
)

PKG_INFO = """Metadata-Version: 2.1
Name: demo
Version: 1.0
Requires-Dist: six
Provides-Extra: test
Requires-Dist: pytest-mock; extra == "test"
Requires-Dist: oldlib; extra == "test" and python_version < "3"
Requires-Dist: demo[speedups]; extra == "tests"
Provides-Extra: speedups
Requires-Dist: fastlib>=2; extra == "speedups"
Provides-Extra: docs
Requires-Dist: sphinx; extra == "docs"
"""


def make_sdist(
    path: Path,
    files: dict[str, str | bytes],
    modes: dict[str, int] | None = None,
    members: list[tarfile.TarInfo] | None = None,
    top: str = "demo-1.0",
) -> Path:
    """A .tar.gz like `python -m build --sdist` writes: everything under one top-level directory.
    `members` are extra raw entries (links, devices, hostile names) added as they are."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in sorted(files.items()):
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(f"{top}/{name}" if top else name)
            info.size, info.mode, info.mtime = len(data), (modes or {}).get(name, 0o644), 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
        for info in members or []:
            tar.addfile(info)
    return path


def demo_files(**extra: str) -> dict[str, str]:
    return {
        "PKG-INFO": PKG_INFO,
        "setup.py": "from setuptools import setup\nsetup()\n",
        "src/demo/__init__.py": "from demo.core import add\n",
        "src/demo/core.py": "def add(a, b):\n    return a + b\n",
        "src/demo/tests/test_inner.py": "def test_inner():\n    pass\n",
        "src/demo.egg-info/requires.txt": "six\n\n[test]\nfrom-egg-info\n",
        "src/demo/__pycache__/core.cpython-311.pyc": "junk",
        "tests/test_core.py": "from demo import add\n\ndef test_add():\n    assert add(1, 2) == 3\n",
        "requirements-test.txt": "# pinned for CI\n-r requirements/base.txt\nfreezegun==1.4.0  # time\n-e .\n",
        "requirements/base.txt": "hypothesis\n",
        **extra,
    }


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def test_make_repo_finds_package_tests_sources_and_declared_requirements(tmp_path):
    sdist = make_sdist(tmp_path / "demo-1.0.tar.gz", demo_files())
    source = make_repo("demo", "1.0", sdist, tmp_path / "work")
    repo = source.repo_dir
    assert repo == tmp_path / "work" / "demo-1.0"
    assert (source.package_root, source.import_names) == ("src", ("demo",))
    assert source.test_paths == ("tests", "src/demo/tests")
    assert source.source_files == ("src/demo/__init__.py", "src/demo/core.py")
    # test extras with markers evaluated for Python 3.11 (no oldlib), the egg-info's requires.txt read
    # before it is dropped, requirement files followed through -r (`-e .` names nothing), and the
    # `demo[speedups]` self-reference expanded; docs extras are not test requirements.
    assert source.declared_test_requirements == (
        "pytest-mock",
        "from-egg-info",
        "hypothesis",
        "freezegun==1.4.0",
        "fastlib>=2",
    )
    assert not list(repo.rglob("*.egg-info")) and not list(repo.rglob("__pycache__"))
    assert (repo / "PKG-INFO").is_file() and (repo / "setup.py").is_file()
    assert git(repo, "status", "--porcelain") == ""
    assert git(repo, "rev-list", "--count", "HEAD") == "1"
    assert git(repo, "rev-parse", "HEAD") == source.base_commit
    assert git(repo, "log", "--format=%an <%ae> %ad", "--date=iso") == (
        "m2rl factory <factory@m2rl.invalid> 2000-01-01 00:00:00 +0000"
    )


def test_base_commit_depends_on_content_only(tmp_path):
    def sha(case: str, files: dict[str, str | bytes], modes: dict[str, int] | None = None) -> str:
        # The sdist's file name is part of the commit message, so every case uses the release's name.
        (tmp_path / case).mkdir(exist_ok=True)
        sdist = make_sdist(tmp_path / case / "demo-1.0.tar.gz", files, modes)
        return make_repo("demo", "1.0", sdist, tmp_path / case / "work").base_commit

    files = demo_files()
    private = {name: 0o600 for name in files}  # a umask-0077 build of the same release
    plain = sha("plain", files)
    # Same content with other modes; and the same case again, which replaces the first repository.
    assert sha("private", files, private) == plain == sha("plain", files)
    # git records the executable bit, and only it: 0o700 and 0o755 are the same tree.
    assert (
        sha("exec755", files, {"setup.py": 0o755})
        == sha("exec700", files, private | {"setup.py": 0o700})
        != plain
    )
    assert sha("changed", demo_files(**{"src/demo/core.py": "x = 1\n"})) != plain
    assert (tmp_path / "private" / "work" / "demo-1.0" / "src/demo/core.py").stat().st_mode & 0o777 == 0o644


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _special(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    return info


@pytest.mark.parametrize(
    "member, message",
    [
        (tarfile.TarInfo("demo-1.0/../evil.py"), "'\\.\\.'"),
        (tarfile.TarInfo("/tmp/evil.py"), "absolute"),
        (_link("demo-1.0/passwd", "/etc/passwd"), "out of the tree"),
        (_link("demo-1.0/up", "../../../etc/passwd"), "out of the tree"),
        (
            _link("demo-1.0/docs/sibling", "../../other-1.0/x.py"),
            "out of the tree",
        ),  # stays in the archive only
        (_link("demo-1.0/hard", "other-1.0/x.py", tarfile.LNKTYPE), "out of the tree"),
        (_special("demo-1.0/fifo", tarfile.FIFOTYPE), "special file"),
        (_special("demo-1.0/dev", tarfile.CHRTYPE), "special file"),
    ],
)
def test_unsafe_members_are_refused_before_anything_is_written(tmp_path, member, message):
    sdist = make_sdist(tmp_path / "demo-1.0.tar.gz", demo_files(), members=[member])
    with pytest.raises(LibraryError, match=message):
        make_repo("demo", "1.0", sdist, tmp_path / "work")
    assert not (tmp_path / "work" / "demo-1.0").exists()
    assert not (tmp_path / "evil.py").exists() and not Path("/tmp/evil.py").exists()


def test_links_inside_the_tree_are_kept(tmp_path):
    sdist = make_sdist(
        tmp_path / "demo-1.0.tar.gz",
        demo_files(),
        members=[_link("demo-1.0/docs/core_link.py", "../src/demo/core.py")],
    )
    source = make_repo("demo", "1.0", sdist, tmp_path / "work")
    assert (source.repo_dir / "docs/core_link.py").read_text() == "def add(a, b):\n    return a + b\n"
    assert git(source.repo_dir, "ls-files", "-s", "docs/core_link.py").startswith(
        "120000"
    )  # a symlink in git


def test_single_module_library_with_top_level_test_file(tmp_path):
    files = {
        "PKG-INFO": "Metadata-Version: 2.1\nName: six\n",
        "six.py": "X = 1\n",
        "setup.py": "",
        "test_six.py": "import six\n\ndef test_x():\n    assert six.X == 1\n",
        "conftest.py": "",
    }
    source = make_repo("six", "1.0", make_sdist(tmp_path / "six-1.0.tar.gz", files, top="six-1.0"), tmp_path)
    assert (source.package_root, source.import_names) == ("", ("six",))
    assert source.test_paths == ("test_six.py",)
    assert source.source_files == ("six.py",)


def test_sdist_without_tests_or_package_is_a_clear_error(tmp_path):
    no_tests = {k: v for k, v in demo_files().items() if "test" not in k}
    with pytest.raises(LibraryError, match="ships no tests"):
        make_repo("demo", "1.0", make_sdist(tmp_path / "a.tar.gz", no_tests), tmp_path / "w1")
    only_tests = {"PKG-INFO": PKG_INFO, "tests/test_x.py": "def test_x():\n    pass\n", "setup.py": ""}
    with pytest.raises(LibraryError, match="no Python package"):
        make_repo("demo", "1.0", make_sdist(tmp_path / "b.tar.gz", only_tests), tmp_path / "w2")
    with pytest.raises(LibraryError, match="one top-level directory"):
        make_repo("demo", "1.0", make_sdist(tmp_path / "c.tar.gz", demo_files(), top=""), tmp_path / "w3")


def test_pyproject_extras_and_dependency_groups(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "demo"\n[project.optional-dependencies]\nTesting = ["pytest-timeout"]\n'
        'lint = ["ruff"]\n[dependency-groups]\ntest = ["coverage", {include-group = "typing"}]\n'
        'typing = ["mypy>=1"]\n'
    )
    assert declared_test_requirements(tmp_path, "demo") == ("pytest-timeout", "coverage", "mypy>=1")


# --------------------------------------------------------------------------- PyPI through a test double
SDIST_BYTES = b"not really a tarball, only bytes with a known sha256"


def pypi_double(requests: list[str], sdist: bytes = SDIST_BYTES) -> httpx.Client:
    """A scripted stand-in for PyPI (httpx.MockTransport): the project JSON of python-dateutil with two
    releases, file URLs relative to the document as the mirror here gives them, and the sdist bytes."""
    doc = {
        "info": {"name": "python-dateutil", "version": "2.9.0"},
        "releases": {
            "2.8.2": [
                {
                    "packagetype": "bdist_wheel",
                    "filename": "python_dateutil-2.8.2-py3-none-any.whl",
                    "url": "x",
                    "digests": {"sha256": "0"},
                }
            ],
            "2.9.0": [
                {
                    "packagetype": "bdist_wheel",
                    "filename": "python_dateutil-2.9.0-py3-none-any.whl",
                    "url": "../../packages/aa/python_dateutil-2.9.0-py3-none-any.whl",
                    "digests": {"sha256": "0"},
                },
                {
                    "packagetype": "sdist",
                    "filename": "python_dateutil-2.9.0.tar.gz",
                    "url": "../../packages/bb/python_dateutil-2.9.0.tar.gz",
                    "digests": {"sha256": hashlib.sha256(SDIST_BYTES).hexdigest()},
                },
            ],
        },
    }

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request.url.path)
        if request.url.path.lower() in ("/pypi/python-dateutil/json", "/pypi/python_dateutil/json"):
            return httpx.Response(200, content=json.dumps(doc))
        if request.url.path == "/packages/bb/python_dateutil-2.9.0.tar.gz":
            return httpx.Response(200, content=sdist)
        return httpx.Response(404)

    return httpx.Client(transport=httpx.MockTransport(handler))


def test_resolve_reads_the_project_json():
    requests: list[str] = []
    with pypi_double(requests) as client:
        assert resolve("Python_Dateutil", client) == ("python-dateutil", "2.9.0")  # latest, PyPI's spelling
        assert resolve("python-dateutil==2.8.2", client) == ("python-dateutil", "2.8.2")
        assert resolve("python-dateutil == 2.9", client) == ("python-dateutil", "2.9.0")  # PEP 440 equal
        with pytest.raises(LibraryError, match="python-dateutil==3.0 is not on PyPI"):
            resolve("python-dateutil==3.0", client)
        with pytest.raises(LibraryError, match="not on PyPI"):
            resolve("no-such-project", client)
        with pytest.raises(LibraryError, match="NAME or NAME==VERSION"):
            resolve("python-dateutil>=2", client)
    assert requests[0] == "/pypi/Python_Dateutil/json"


def test_fetch_sdist_verifies_sha256_and_caches(tmp_path):
    requests: list[str] = []
    with pypi_double(requests) as client:
        path = fetch_sdist("python-dateutil", "2.9.0", tmp_path, client)
        assert path == tmp_path / "sdists" / "python_dateutil-2.9.0.tar.gz"
        assert path.read_bytes() == SDIST_BYTES
        assert fetch_sdist("python-dateutil", "2.9.0", tmp_path, client) == path
        with pytest.raises(LibraryError, match="no sdist"):
            fetch_sdist("python-dateutil", "2.8.2", tmp_path, client)
    assert requests.count("/packages/bb/python_dateutil-2.9.0.tar.gz") == 1  # the second call used the cache

    with pypi_double([], sdist=b"tampered") as client, pytest.raises(LibraryError, match="does not match"):
        fetch_sdist("python-dateutil", "2.9.0", tmp_path / "other", client)
    assert list((tmp_path / "other" / "sdists").iterdir()) == []  # no partial or bad file left behind


# --------------------------------------------------------------------------- default test command
def _source(repo: Path, declared: tuple[str, ...] = ()) -> LibrarySource:
    return LibrarySource(
        name="demo",
        version="1.0",
        sdist=repo / "x.tar.gz",
        repo_dir=repo,
        base_commit="0" * 40,
        package_root="",
        test_paths=("tests", "test_top.py"),
        source_files=("demo.py",),
        declared_test_requirements=declared,
    )


def test_default_command_and_requirements(tmp_path):
    source = _source(tmp_path, ("pytest<9", "tox", "hypothesis"))
    assert (
        pytest_command(source, None)
        == "python -m pytest -rA -p no:cacheprovider -q --color=no tests test_top.py"
    )
    assert requirements_for(source, None) == ("pytest", "pytest<9", "hypothesis")  # tox only orchestrates


def test_addopts_plugins_are_installed_and_neutralised(tmp_path):
    (tmp_path / "setup.cfg").write_text("[tool:pytest]\naddopts = --cov=demo --cov-report=term -n auto\n")
    source = _source(tmp_path)
    assert requirements_for(source, None) == ("pytest", "pytest-cov", "pytest-xdist")
    assert pytest_command(source, None).endswith("--color=no --no-cov -n 0 tests test_top.py")


def test_known_library_entry_shapes_the_command(tmp_path):
    known = KnownLibrary(
        "demo",
        "why",
        extra_test_requirements=("whatever",),
        drop_test_requirements=("Mock",),
        pytest_args=("--ignore", "tests/legacy.py"),
        deselect=("tests/test_a.py::test b",),
        env=(("DEMO_PURE", "1"),),
    )
    source = _source(tmp_path, ("mock", "hypothesis"))
    assert requirements_for(source, known) == ("pytest", "hypothesis", "whatever")
    assert pytest_command(source, known) == (
        "env DEMO_PURE=1 python -m pytest -rA -p no:cacheprovider -q --color=no --ignore tests/legacy.py "
        "--deselect 'tests/test_a.py::test b' tests test_top.py"
    )
    assert lookup("Python_Dateutil") is not None and lookup("tinydb") is None
