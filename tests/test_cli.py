from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from m2rl import doctor
from m2rl.cli import main


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
