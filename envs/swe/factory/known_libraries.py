"""The test command and test dependencies of a factory library: defaults, and the few that need more.

Defaults: `python -m pytest -rA -p no:cacheprovider -q --color=no` over the test paths `sources.find_tests`
found; test dependencies are pytest plus what the sdist declares (`LibrarySource.declared_test_requirements`:
the test/tests/testing extras, dependency groups and test requirements files) less pure tooling (tox,
linters), plus the pytest plugins the repo's own `addopts` need (`--cov` -> pytest-cov, run with
`--no-cov`). An entry below exists only where a library's suite does not run or does not pass with those
defaults, and says why. This table is the only place with library-specific knowledge in the factory.

Verified on 2026-11-30 (image built, then the suite run once in a container with no network; passed /
failed+errors as SWE-bench's parser counts them; seconds on a quiet 2-core machine):
  tinydb 4.9.0 218/0 1s             boltons 26.2.0 519/0 4s           toolz 1.2.0 192/0 1s
  cachetools 8.0.2 476/0 2s         inflection 0.5.1 449/0 1s         parse 1.22.4 109/0 0.4s
  schema 0.7.8 118/0 1s             six 1.17.0 184/0 2s               tabulate 0.10.0 280/0 2s
  humanize 4.17.0 873/0 7s          pathspec 1.1.1 197/0 1s           tomlkit 0.15.2 1186/0 3s
  python-slugify 9.2.0 140/0 2s     xmltodict 1.0.4 119/0 1s          itsdangerous 2.2.0 297/0 2s
  wcwidth 0.9.4 1667/0 6s           markdown 3.11.3 1111/0 4s         docopt-ng 0.9.0 515/0 1s
  simplejson 4.3.0 238/0 1s         toml 0.10.2 19/0 0.4s             click 8.5.1 2300/0 10s
  isodate 0.7.2 280/0 1s            asttokens 3.0.2 123/0 3s          funcy 2.1 219/0 1s
  glom 25.12.0 200/0 1s             marshmallow 4.4.0 1183/0 3s       parsimonious 0.11.0 84/0 1s
  pytz 2026.6 237/0 1s              textdistance 4.6.3 168/0 9s       more-itertools 11.2.1 765/0 15s
  attrs 26.1.0 1376/1 16s           idna 3.20 6441/0 41s              pyparsing 3.3.3 2026/0 62s
  python-dateutil 4.0.0 5042/3 52s (the 3 use the system tz database, not the tzdata wheel)
  Not usable: sortedcontainers 2.4.0 (the sdist ships no tests); jmespath 1.1.0 (the sdist drops
  tests/__init__.py, so `from tests import ...` fails at collection).
"""

from __future__ import annotations

import configparser
import contextlib
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

from m2rl.envs.swe.factory.sources import LibrarySource
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# --color=no: a config's `--color=yes` would put escape codes before PASSED, which the log parser misses.
DEFAULT_PYTEST = ("python", "-m", "pytest", "-rA", "-p", "no:cacheprovider", "-q", "--color=no")
DEFAULT_TEST_REQUIREMENTS = ("pytest",)
# Declared "test" requirements that only lint, format, package or orchestrate: never imported by a test
# run, and some (ruff, pre-commit's pyyaml) are large platform wheels.
NOT_NEEDED_TO_TEST = frozenset(
    {
        "tox",
        "nox",
        "pre-commit",
        "ruff",
        "black",
        "flake8",
        "pylint",
        "twine",
        "sphinx",
        "codecov",
        "coveralls",
        "check-manifest",
    }
)
# A pytest plugin the repo's own pytest `addopts` needs (pytest stops at an unknown option), and the
# arguments that keep it from changing the run: coverage off, no worker processes.
ADDOPTS_PLUGINS = (
    ("--cov", "pytest-cov", ("--no-cov",)),
    ("-n", "pytest-xdist", ("-n", "0")),
    ("--numprocesses", "pytest-xdist", ("-n", "0")),
    ("--dist", "pytest-xdist", ("-n", "0")),
    ("--timeout", "pytest-timeout", ()),
    ("--benchmark", "pytest-benchmark", ()),
)


@dataclass(frozen=True)
class KnownLibrary:
    name: str  # canonical PyPI name (canonicalize_name)
    why: str  # what fails without this entry; an entry without a reason is not kept
    extra_test_requirements: tuple[str, ...] = ()  # PEP 508 strings added to the declared ones
    # Canonical names of declared requirements not to install (tools the suite does not import, or pins
    # that no longer install on Python 3.11); NOT_NEEDED_TO_TEST is dropped for every library.
    drop_test_requirements: tuple[str, ...] = ()
    pytest_args: tuple[str, ...] = ()  # extra pytest options, e.g. ("-o", "addopts=")
    deselect: tuple[str, ...] = ()  # test ids to skip: network, timing, flaky
    test_paths: tuple[str, ...] = ()  # replaces the found test paths when set
    env: tuple[tuple[str, str], ...] = ()  # environment variables the suite reads, as (name, value)


KNOWN: tuple[KnownLibrary, ...] = (
    KnownLibrary(
        "click",
        "test_echo_via_pager runs the `less` pager, which the image does not have",
        deselect=("tests/test_utils/test_echo_via_pager.py::test_echo_via_pager",),
    ),
    KnownLibrary(
        "docopt-ng",
        "tests/conftest.py implements pytest_collect_file(path) that pytest 9 removed",
        extra_test_requirements=("pytest<9",),
    ),
    KnownLibrary(
        "funcy",
        "the tests import `whatever`, which funcy does not declare",
        extra_test_requirements=("whatever",),
    ),
    KnownLibrary(
        "idna",
        "tests/test_idna_properties.py imports hypothesis, which idna does not declare",
        extra_test_requirements=("hypothesis",),
    ),
    KnownLibrary(
        "glom",
        "the CLI tests read YAML targets (the `yaml` extra, not a test extra)",
        extra_test_requirements=("PyYAML",),
    ),
    KnownLibrary(
        "markdown",
        "tests/test_legacy.py sets warnings.simplefilter('error') when imported, so "
        "pytest's warning about a later unittest TestSuite class stops collection",
        pytest_args=("--ignore", "tests/test_legacy.py"),
    ),
    KnownLibrary(
        "pyparsing",
        "tests/test_diagram.py needs the `diagrams` extra (railroad-diagrams, jinja2)",
        extra_test_requirements=("railroad-diagrams", "jinja2"),
    ),
    KnownLibrary(
        "python-dateutil",
        "its test requirements are only in requirements-dev.txt; tests/conftest.py "
        "marks tests `no_cover`, an error (filterwarnings=error) unless pytest-cov registers the mark",
        extra_test_requirements=("pytest-cov", "freezegun", "hypothesis", "attrs"),
    ),
    KnownLibrary(
        "textdistance",
        "tests/test_external.py compares against optional C libraries (Levenshtein, "
        "jellyfish, ...) that are not installed",
        deselect=("tests/test_external.py",),
    ),
    KnownLibrary(
        "toml",
        "two tests read the toml-test suite from a git submodule the sdist lacks",
        deselect=("tests/test_api.py::test_valid_tests", "tests/test_api.py::test_invalid_tests"),
    ),
    KnownLibrary(
        "wcwidth",
        "tests/conftest.py asserts the C extension is loaded unless WCWIDTH_PYTHON is set; "
        "the image runs the pure-Python sources",
        env=(("WCWIDTH_PYTHON", "1"),),
    ),
)

_BY_NAME = {k.name: k for k in KNOWN}


def lookup(name: str) -> KnownLibrary | None:
    return _BY_NAME.get(canonicalize_name(name))


def pytest_addopts(repo: Path) -> list[str]:
    """The `addopts` of every pytest configuration file in the repo root, split into arguments."""
    texts: list[str] = []
    for name, section in (
        ("pytest.ini", "pytest"),
        (".pytest.ini", "pytest"),
        ("tox.ini", "pytest"),
        ("setup.cfg", "tool:pytest"),
    ):
        parser = configparser.ConfigParser(interpolation=None)
        with contextlib.suppress(configparser.Error, OSError, UnicodeDecodeError):
            parser.read(repo / name, encoding="utf-8")
            texts.append(parser.get(section, "addopts", fallback=""))
    with contextlib.suppress(OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        pytest_cfg = (
            tomllib.loads((repo / "pyproject.toml").read_text(encoding="utf-8"))
            .get("tool", {})
            .get("pytest", {})
        )
        for table in (pytest_cfg.get("ini_options", {}), pytest_cfg):
            opts = table.get("addopts", "")
            texts.append(opts if isinstance(opts, str) else shlex.join(str(o) for o in opts))
    args: list[str] = []
    for text in texts:
        with contextlib.suppress(ValueError):
            args += shlex.split(text)
    return args


def addopts_plugins(repo: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(requirement, neutralising pytest args) for each plugin the repo's addopts rely on."""
    args = pytest_addopts(repo)
    found: dict[str, tuple[str, ...]] = {}
    for option, requirement, neutral in ADDOPTS_PLUGINS:
        # "--cov" also matches "--cov=pkg" and "--cov-report"; "-n" also "-n4" / "-nauto".
        if any(a.startswith(option) and (option.startswith("--") or not a.startswith("--")) for a in args):
            found.setdefault(requirement, neutral)
    return list(found.items())


# Named so that pytest does not collect them when a test module imports them.
def requirements_for(source: LibrarySource, known: KnownLibrary | None) -> tuple[str, ...]:
    """pytest, the declared test requirements and the entry's extras, minus the entry's drops; in order,
    without duplicates (pip intersects a bare "pytest" with a declared "pytest<9")."""
    dropped = NOT_NEEDED_TO_TEST | {
        canonicalize_name(n) for n in (known.drop_test_requirements if known else ())
    }
    declared = [
        r for r in source.declared_test_requirements if canonicalize_name(Requirement(r).name) not in dropped
    ]
    plugins = [requirement for requirement, _ in addopts_plugins(source.repo_dir)]
    extra = known.extra_test_requirements if known else ()
    return tuple(dict.fromkeys((*DEFAULT_TEST_REQUIREMENTS, *declared, *plugins, *extra)))


def pytest_command(source: LibrarySource, known: KnownLibrary | None) -> str:
    """The shell command, run from the repo root, whose `-rA` summary SWE-bench's pytest parser reads."""
    args = [*DEFAULT_PYTEST, *(a for _, neutral in addopts_plugins(source.repo_dir) for a in neutral)]
    args += known.pytest_args if known else ()
    for test_id in known.deselect if known else ():
        args += ["--deselect", test_id]
    args += list(known.test_paths if known and known.test_paths else source.test_paths)
    env = [f"{name}={value}" for name, value in (known.env if known else ())]
    return shlex.join(["env", *env, *args] if env else args)
