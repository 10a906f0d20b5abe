"""A real library through the factory's first stage on the real engine: tinydb's sdist from PyPI becomes a
repository and an image, and its suite runs in a container with no network, as uid 1000, against /testbed."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from m2rl.envs.swe.factory import known_libraries
from m2rl.envs.swe.factory.baseline import TestContainer, run_tests_in_image
from m2rl.envs.swe.factory.library_image import LABEL_COMMIT, LABEL_LIBRARY, build_library_image
from m2rl.envs.swe.factory.sources import LibrarySource, fetch_sdist, make_repo, resolve
from m2rl.sandboxes.docker_backend import OWNER_PID_LABEL, docker_client

pytestmark = pytest.mark.docker

LIBRARY = "tinydb==4.8.0"  # pinned: the counts below are this release's


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LibrarySource, str]]:
    import httpx
    from m2rl.sandboxes.errors import SandboxError

    try:
        name, version = resolve(LIBRARY)
        source = make_repo(name, version, fetch_sdist(name, version), tmp_path_factory.mktemp("factory"))
    except httpx.TransportError as exc:
        pytest.skip(f"PyPI is not reachable from here: {exc}")
    try:
        image = build_library_image(source, known_libraries.lookup(name))
    except SandboxError as exc:  # the SWE base image needs the Debian mirror once
        pytest.skip(f"cannot build the SWE base image: {exc}")
    yield source, image
    leftover = docker_client().containers.list(
        all=True, filters={"label": f"{OWNER_PID_LABEL}={os.getpid()}"}
    )
    assert leftover == [], f"containers outlived their TestContainer: {leftover}"


def test_image_is_labelled_and_rebuilding_is_a_lookup(built):
    source, image = built
    assert image.startswith("m2rl-swe-tinydb:")
    labels = docker_client().images.get(image).labels
    assert labels[LABEL_LIBRARY] == "tinydb" and labels[LABEL_COMMIT] == source.base_commit
    start = time.monotonic()
    assert build_library_image(source, known_libraries.lookup("tinydb")) == image
    assert time.monotonic() - start < 5


def test_baseline_suite_passes(built):
    source, image = built
    run = run_tests_in_image(image, known_libraries.pytest_command(source, None), timeout=300)
    assert not run.timed_out and run.exit_code == 0, run.log[-3000:]
    assert run.passed == 200 and run.failed == 0  # the 200 tests tinydb 4.8.0 ships
    assert run.status["tests/test_tinydb.py::test_insert[memory]"] == "PASSED"


def test_container_isolation_and_file_round_trip(built):
    source, image = built
    with TestContainer(image) as box:
        code, out = box.exec("id -u; python -c 'import tinydb; print(tinydb.__file__)'; git rev-parse HEAD")
        assert code == 0 and out.split() == ["1000", "/testbed/tinydb/__init__.py", source.base_commit]
        for path in ("/opt/venv/bin/x", "/opt/venv/lib/python3.11/site-packages/x.pth"):
            code, out = box.exec(f"touch {path}")
            assert code != 0 and "Permission denied" in out
        probe = "import socket; socket.create_connection(('1.1.1.1', 53), timeout=3)"
        code, out = box.exec(f"python -c {probe!r}; ls /sys/class/net")
        assert code == 0 and "unreachable" in out and out.split()[-1] == "lo"  # only loopback

        box.write_file("tinydb/utils.py", "raise ImportError('mutated')\n")
        broken = box.run("python -m pytest -rA -q -p no:cacheprovider tests/test_utils.py", timeout=60)
        assert broken.exit_code != 0 and "mutated" in broken.log
        box.restore("tinydb/utils.py")
        box.write_file("tinydb/new_module.py", "x = 1\n")
        box.restore("tinydb/new_module.py")  # untracked: removed
        assert box.exec("git status --porcelain")[1] == ""
        fixed = box.run("python -m pytest -rA -q -p no:cacheprovider tests/test_utils.py", timeout=60)
        assert fixed.exit_code == 0 and fixed.passed > 0
        with pytest.raises(ValueError, match="outside"):
            box.write_file("../etc/passwd", "")
