from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest
from m2rl import doctor
from m2rl.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("m2rl 0.1.0")


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "m2rl"
    result = subprocess.run([str(script), "version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "m2rl 0.1.0" in result.stdout


def test_doctor_bad_config_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("env: [oops\n")
    assert main(["doctor", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m2rl: error: bad YAML in") and "Traceback" not in err


def test_doctor_unknown_component(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--require", "warp-drive"]) == 2
    assert "unknown component" in capsys.readouterr().err


def test_required_components_follow_the_config() -> None:
    assert "docker" in doctor.required_components({"env": {"sandbox": "docker"}})
    assert "bubblewrap" in doctor.required_components({"env": {"sandbox": "bwrap"}})
    needs = doctor.required_components({"env": {"id": "m2rl/Browser-v0"}, "policy": {"kind": "vllm"}, "device": "cuda"})
    assert {"chromium", "playwright", "vllm", "gpus", "triton"} <= needs


def test_doctor_fails_when_a_required_component_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(doctor.CHECKS, "gpus", lambda: doctor.CheckResult("gpus", False, "none here"))
    code = doctor.print_report(doctor.run_checks(["gpus"]), {"gpus"})
    assert code == 1
    assert "required component 'gpus' is not working" in capsys.readouterr().out


@pytest.mark.bwrap
def test_bwrap_check_really_isolates() -> None:
    result = doctor.check_bwrap()
    assert result.ok, result.detail
    assert "interfaces: lo" in result.detail


@pytest.mark.docker
def test_docker_check_runs_a_container() -> None:
    from m2rl.sandboxes.images import build_base

    build_base()  # cached by content hash: a no-op when the base image exists
    result = doctor.check_docker()
    assert result.ok, result.detail
    assert "ran" in result.detail


def test_gc_says_what_it_skipped_and_why(capsys: pytest.CaptureFixture[str]) -> None:
    import os
    import time

    from m2rl.sandboxes import bwrap_backend

    bwrap_backend.STATE_ROOT.mkdir(mode=0o755, exist_ok=True)
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid now names no live process
    owned = bwrap_backend.STATE_ROOT / f"{os.getpid()}-gctest1"
    orphan = bwrap_backend.STATE_ROOT / f"{dead.pid}-gctest2"
    young = bwrap_backend.STATE_ROOT / f"{dead.pid}-gctest3"
    try:
        for d in (owned, orphan, young):
            d.mkdir()
        old = time.time() - 3600
        for d in (owned, orphan):
            os.utime(d, (old, old))
        assert main(["sandboxes", "gc", "--dry-run"]) == 0  # dry run: other users' sandboxes stay untouched
        out = capsys.readouterr().out.splitlines()
    finally:
        for d in (owned, orphan, young):
            d.rmdir()
    assert f"state dir {orphan}" in out
    assert f"state dir {owned}" not in out and f"state dir {young}" not in out
    assert f"skipped 1 sandbox state dir(s) owned by live process {os.getpid()}" in out
    assert any(line.startswith("skipped ") and "younger than 60 s (a sandbox may be starting)" in line
               for line in out)


# ------------------------------------------------------------------ config keys named in help and docs

_OVERRIDE = re.compile(r"^\+{0,2}([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*)=(\S*)$")
_PLACEHOLDERS = {"key", "key.sub", "a.b.c", "a.b"}  # the syntax itself, not a key of the schema


def _overrides_in_command(words: list[str]) -> list[str]:
    """The key=value words after `m2rl train|doctor|config show` in a command line."""
    for start, word in enumerate(words):
        if word.endswith("m2rl") and words[start + 1:start + 2] in (["train"], ["doctor"], ["config"]):
            return [w for w in words[start + 2:] if _OVERRIDE.match(w)]
    return []


_ABOUT_OVERRIDES = re.compile(r"m2rl (train|doctor|config)|override", re.IGNORECASE)


def overrides_in_markdown(text: str) -> list[str]:
    """Override examples in a markdown text: key=value words of `m2rl train/doctor/config` command lines
    (in code blocks and inline code), and inline code spans made of key=value words only on a line that
    talks about those commands or overrides (elsewhere `network=True` is a Python argument)."""
    found: list[str] = []
    blocks = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.DOTALL)
    for block in blocks:
        for line in block.splitlines():
            found += _overrides_in_command(line.split())
    for line in re.sub(r"```.*?```", "", text, flags=re.DOTALL).splitlines():
        for span in re.findall(r"`([^`]+)`", line):
            words = span.split()
            if words and all(_OVERRIDE.match(w) for w in words):
                found += words if _ABOUT_OVERRIDES.search(line) else []
            else:
                found += _overrides_in_command(words)
    return [w for w in found if _OVERRIDE.match(w).group(1) not in _PLACEHOLDERS]  # type: ignore[union-attr]


def _help_texts() -> str:
    from m2rl.cli import build_parser

    parser = build_parser()
    texts = [parser.format_help()]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command in sub.choices.values():
        texts.append(command.format_help())
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                texts += [nested.format_help() for nested in action.choices.values()]
    return "\n".join(texts)


def test_override_examples_are_found() -> None:
    # the extractor itself: it must see these, or the test below checks nothing
    sample = ("Run `m2rl train steps=3 ++env.kinds=[add]` or `learner.loss.kind=grpo`, `key.sub=value`.\n"
              "```bash\n.venv/bin/m2rl doctor --require docker env.sandbox=docker\n"
              "python -c 'f(max_steps=3)'\n```\n"
              "Overrides: `resume=true name=RUN`.\nA Python argument: `network=True`.\n")
    assert overrides_in_markdown(sample) == ["env.sandbox=docker", "steps=3", "++env.kinds=[add]",
                                             "learner.loss.kind=grpo", "resume=true", "name=RUN"]


def test_every_key_named_in_help_and_docs_exists() -> None:
    from m2rl.config import load_config
    from m2rl.rl.trainer import TrainConfig

    examples = {"--help": re.findall(r"\S+=\S+", _help_texts())}
    for path in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        examples[str(path.relative_to(REPO))] = overrides_in_markdown(path.read_text(encoding="utf-8"))
    checked, bad = 0, []
    for where, words in examples.items():
        for word in words:
            word = word.strip(",.;)")
            match = _OVERRIDE.match(word)
            if match is None or match.group(1) in _PLACEHOLDERS:
                continue
            checked += 1
            try:
                load_config(TrainConfig, None, [word])  # the key exists and the value has its type
            except Exception as exc:  # noqa: BLE001  collect every bad example, then fail once
                bad.append(f"{where}: {word}: {exc}")
    assert checked >= 5, examples  # README and --help name several keys
    assert bad == []
