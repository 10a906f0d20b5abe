"""Which paths are tests or test configuration, and matching sandbox paths against repo paths.

Shared by the anti-hacking detectors (what the agent touched) and the grader (what of the agent's
patch is allowed onto the clean copy), so both agree on what "a test file" is.
"""

from __future__ import annotations

import configparser
import fnmatch
import posixpath
import tomllib
from collections.abc import Iterable

TEST_DIR_NAMES = frozenset({"tests", "test", "testing"})
TEST_FILE_GLOBS = ("test_*.py", "*_test.py", "*_tests.py", "conftest.py")
# Files that are test configuration whatever they contain.
TEST_CONFIG_FILES = frozenset({"pytest.ini", ".pytest.ini", "tox.ini", "noxfile.py"})
# Files that are test configuration only in their pytest section.
MIXED_CONFIG_FILES = frozenset({"setup.cfg", "pyproject.toml"})


def normalize_path(path: str) -> str:
    """'./a//b/../c.py' -> 'a/c.py'."""
    p = posixpath.normpath(path.strip().replace("\\", "/"))
    return "" if p == "." else p


def path_matches(path: str, repo_path: str) -> bool:
    """True if `path` (maybe absolute in the sandbox, e.g. /work/repo/src/x.py) names `repo_path`
    (relative to the repo root, e.g. src/x.py): equal, or ends with it at a component boundary."""
    p, r = normalize_path(path), normalize_path(repo_path).lstrip("/")
    if not p or not r:
        return False
    return p == r or p.endswith("/" + r)


def path_under(path: str, prefix: str) -> bool:
    """True if `path` is `prefix` or lies inside it (prefix may be a file or a directory)."""
    p, r = normalize_path(path), normalize_path(prefix).lstrip("/")
    if not p or not r:
        return False
    return f"/{r}/" in f"/{p}/"


def is_test_path(path: str, extra: Iterable[str] = ()) -> bool:
    """A test file or pure test-configuration file (not setup.cfg / pyproject.toml: see
    `pytest_config_section`). `extra` are task-specific test paths (files or directories)."""
    p = normalize_path(path)
    if not p:
        return False
    parts = p.split("/")
    name = parts[-1]
    if any(part in TEST_DIR_NAMES for part in parts):  # the directory itself too (rm -rf tests)
        return True
    if name in TEST_CONFIG_FILES or any(fnmatch.fnmatchcase(name, g) for g in TEST_FILE_GLOBS):
        return True
    return any(path_under(p, e) for e in extra)


def is_mixed_config(path: str) -> bool:
    return posixpath.basename(normalize_path(path)) in MIXED_CONFIG_FILES


def pytest_config_section(path: str, text: str) -> str | None:
    """The pytest configuration inside setup.cfg ([tool:pytest]) or pyproject.toml
    ([tool.pytest.ini_options] / [tool.pytest]) as a canonical string, or None if absent.
    Unparseable text yields the raw text, so any change to a broken file counts as a change."""
    name = posixpath.basename(normalize_path(path))
    if name == "setup.cfg":
        cp = configparser.ConfigParser(interpolation=None)
        try:
            cp.read_string(text)
        except configparser.Error:
            return text
        if not cp.has_section("tool:pytest"):
            return None
        return repr(sorted(cp.items("tool:pytest", raw=True)))
    if name == "pyproject.toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            return text
        section = data.get("tool", {}).get("pytest")
        return None if section is None else repr(section)
    return None


def text_mentions_pytest_config(text: str) -> bool:
    """Cheap check on agent-written text (edit contents, commands) for pytest config sections."""
    return "[tool:pytest]" in text or "[tool.pytest" in text or "tool.pytest" in text
