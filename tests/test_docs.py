"""Every code block of README.md and docs/*.md works as written.

- python blocks parse, and each of their imports resolves; blocks without a `<!-- no-run: REASON -->` line
  right above them are also executed (from the repository root, each in a fresh namespace);
- a block with `<!-- file: PATH -->` above it is that file verbatim (the doc cannot drift from the code);
- each `m2rl ...` line of a bash block parses with the real CLI parser; `m2rl tasks list|show|sample` lines
  run, and the key=value overrides of `m2rl train` lines load as a configuration it would accept (env.id
  resolves, model.init exists, ...);
- each repository path a block or an inline code span names exists;
- the CLI's command modules all import, and the README's command table lists exactly the CLI's commands.
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!-- (no-run|file): (.+?) -->$")
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    doc: str  # path relative to the repository
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    no_run: str | None  # the reason given by <!-- no-run: REASON -->
    file: str | None  # <!-- file: PATH -->: the block is that file verbatim

    @property
    def name(self) -> str:
        return f"{self.doc}:{self.line}"


def blocks_of(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").split("\n")
    found: list[Block] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before.strip())
        kind, value = (marker.group(1), marker.group(2)) if marker else (None, None)
        code = "\n".join(lines[i + 1:end]) + "\n"
        found.append(Block(str(path.relative_to(ROOT)), i + 1, fence.group(1), code,
                           value if kind == "no-run" else None, value if kind == "file" else None))
        i = end + 1
    return found


BLOCKS = [block for doc in DOCS for block in blocks_of(doc)]
PYTHON = [block for block in BLOCKS if block.lang == "python"]
BASH = [block for block in BLOCKS if block.lang in ("bash", "sh", "shell")]


def test_the_blocks_are_found_and_marked() -> None:
    # The extractor itself: if it found nothing, every test below would pass vacuously.
    assert len(PYTHON) >= 6 and len(BASH) >= 3
    assert [b.name for b in BLOCKS if not b.lang] == []  # every fence names its language
    assert all(block.no_run.strip() for block in PYTHON if block.no_run is not None)  # a reason, always
    assert sum(block.no_run is None for block in PYTHON) >= 4  # most blocks run


# ------------------------------------------------------------------ python blocks


def _imports(tree: ast.AST) -> list[tuple[str, str | None]]:
    """(module, name) of every import; name None for `import module`."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.module, alias.name) for alias in node.names]
    return found


@pytest.mark.parametrize("block", PYTHON, ids=lambda block: block.name)
def test_python_block_parses_and_its_imports_resolve(block: Block) -> None:
    tree = ast.parse(block.code, filename=block.name)
    for module_name, name in _imports(tree):
        module = importlib.import_module(module_name)
        if name is not None and not hasattr(module, name):
            importlib.import_module(f"{module_name}.{name}")  # a submodule; raises if there is none


@pytest.mark.parametrize("block", [b for b in PYTHON if b.no_run is None], ids=lambda block: block.name)
def test_python_block_runs(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    if "gym.make" in block.code and shutil.which("bwrap") is None:
        pytest.skip("the block starts a bwrap sandbox: apt-get install bubblewrap")
    monkeypatch.chdir(ROOT)  # the docs' paths are relative to the repository root
    exec(compile(block.code, block.name, "exec"), {"__name__": "__doc_block__"})  # noqa: S102  (our own docs)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.file], ids=lambda block: block.name)
def test_file_block_is_the_file_verbatim(block: Block) -> None:
    assert block.file is not None
    assert block.code == (ROOT / block.file).read_text(encoding="utf-8")


# ------------------------------------------------------------------ bash blocks: m2rl commands


def m2rl_commands() -> list[tuple[str, list[str]]]:
    """(where, the arguments after `m2rl`) of every m2rl command line in a bash block."""
    found = []
    for block in BASH:
        for line in block.code.replace("\\\n", " ").splitlines():  # continuation lines joined
            words = shlex.split(line, comments=True)
            for start, word in enumerate(words):
                if word == "m2rl" or word.endswith("/m2rl"):
                    found.append((f"{block.name} {shlex.join(words[start:])}", words[start + 1:]))
                    break
    return found


COMMANDS = m2rl_commands()


def test_m2rl_commands_are_found() -> None:
    assert len(COMMANDS) >= 3, COMMANDS


@pytest.mark.parametrize("argv", [argv for _, argv in COMMANDS], ids=[where for where, _ in COMMANDS])
def test_m2rl_command_parses_and_its_overrides_load(argv: list[str]) -> None:
    from m2rl.cli import DEFAULT_CONFIG, build_parser
    from m2rl.config import load_config
    from m2rl.rl.preflight import config_problems
    from m2rl.rl.trainer import TrainConfig

    args = build_parser().parse_args(argv)  # an unknown command or flag exits 2 here
    if argv[0] == "tasks" and argv[1] in ("list", "show", "sample"):
        # cheap and side-effect free: run it (a wrong task id or env id fails); build/validate/images run
        # containers for minutes and are only parsed here (tests/envs/swe runs them)
        from m2rl.cli import main

        assert main(argv) == 0
        return
    if argv[0] != "train":
        return
    config = load_config(TrainConfig, getattr(args, "config", None) or DEFAULT_CONFIG, args.overrides)
    problems = config_problems(config, run_directory=False)
    if config.model.init and config.model.init.startswith("runs/"):
        # a run the doc's preceding step writes (a warm start): it cannot exist before the doc is followed
        problems = [p for p in problems if not p.startswith("model.init")]
    if shutil.which("bwrap") is None:
        problems = [p for p in problems if "bwrap is not installed" not in p]
    # the machine's state, not the doc's: scripts/setup.sh starts dockerd where it can
    problems = [p for p in problems if "Docker engine is not reachable" not in p]
    problems = [p for p in problems if "needs a CUDA GPU" not in p]  # a GPU command on a CPU machine
    assert problems == []


# ------------------------------------------------------------------ paths the docs name

_PATH = re.compile(r"^(\.\./)?[\w.-]+(/[\w.-]+)*/?$")
_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".sh", ".json", ".jinja", ".toml", ".txt")
_TOP = {p.name for p in ROOT.iterdir()} - {"runs"}  # runs/ holds what the commands write, not the repo


def paths_named(text: str) -> list[str]:
    """Repository paths in code spans and blocks: words that start with a top-level folder or file of the
    repository, or end in a source suffix (`m2rl/envs/x.py` counts: the repository root *is* `m2rl`)."""
    words = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL))
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.DOTALL):
        words += block.split()
    found = []
    for word in words:
        word = word.strip("'\",;:()")
        if "=" in word:
            word = word.split("=", 1)[1]  # model.init=model/assets/... names a path too
        if not _PATH.match(word) or word.startswith("../") or "://" in word:
            continue  # ../ is outside the repository (../shared is the workspace's, not the clone's)
        if "/" in word and (word.split("/")[0] in _TOP or word.endswith(_SUFFIXES)):
            found.append(word)
    return found


def test_paths_are_found() -> None:
    assert paths_named("see `envs/examples/word_count.py` and\n```bash\nbash scripts/main.sh\n```\n") == [
        "envs/examples/word_count.py", "scripts/main.sh"]
    named = paths_named("`m2rl/envs/experts.py`, `m2rl/Shell-v0`, `runs/x/`, `a.b=1`")
    assert named == ["m2rl/envs/experts.py"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: path.name)
def test_every_path_named_exists(doc: Path) -> None:
    missing = [path for path in paths_named(doc.read_text(encoding="utf-8")) if not (ROOT / path).exists()]
    assert missing == []


# ------------------------------------------------------------------ the CLI and the README


def test_every_command_module_imports_and_registers() -> None:
    from m2rl.cli import COMMAND_MODULES

    for name in COMMAND_MODULES:
        assert callable(importlib.import_module(name).register), name  # a missing module raises here


def _cli_commands() -> set[str]:
    import argparse

    from m2rl.cli import build_parser

    parser = build_parser()
    sub = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return set(sub.choices)


def test_the_readme_table_lists_every_command() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `m2rl ([a-z-]+)", readme, flags=re.MULTILINE))
    assert listed == _cli_commands()


def test_the_agent_exports_resolve() -> None:
    import m2rl.agent

    assert sorted(m2rl.agent.__all__) == sorted(m2rl.agent._EXPORTS)
    for name in m2rl.agent.__all__:
        assert getattr(m2rl.agent, name).__name__ == name
    from m2rl.agent import OpenAIPolicy  # the README's import

    assert OpenAIPolicy.__module__ == "m2rl.agent.openai_policy"


def test_the_config_docstring_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    import m2rl.config
    from m2rl.rl.trainer import TrainConfig

    lines = (m2rl.config.__doc__ or "").splitlines()
    example = next(line.strip() for line in lines if "load_config(" in line)
    monkeypatch.chdir(ROOT)
    namespace = {"load_config": m2rl.config.load_config, "TrainConfig": TrainConfig}
    exec(example, namespace)  # noqa: S102  (our own docstring)
    assert isinstance(namespace["cfg"], TrainConfig)


def test_no_run_blocks_are_few() -> None:
    # Blocks that are not executed still parse and import (above); most must run, or the docs go stale.
    skipped = {block.name: block.no_run for block in PYTHON if block.no_run is not None}
    assert len(skipped) <= len(PYTHON) // 2, skipped
