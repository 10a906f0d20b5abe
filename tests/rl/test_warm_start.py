"""The warm-start builder: demonstration files keep their provenance, and a bad mix fails before any work."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from m2rl.model import M2Tokenizer
from m2rl.rl.warm_start import Demo, collect, load_demos, save_demos, train


def test_demos_file_round_trips_with_its_tool_fraction(tmp_path: Path) -> None:
    demos = [Demo([1, 2, 3, 4], [0, 0, 1, 1]), Demo([5, 6, 7], [0, 1, 1])]
    save_demos(demos, tmp_path / "demos.pt", tool_fraction=0.25)
    loaded, fraction = load_demos(tmp_path / "demos.pt")
    assert fraction == 0.25
    assert [(d.ids, d.loss_mask) for d in loaded] == [(d.ids, d.loss_mask) for d in demos]


def test_train_records_the_tool_fraction_in_warm_start_json(tmp_path: Path) -> None:
    eos = M2Tokenizer.tiny().eos_id
    demos = [Demo([3, 4, 5, eos], [0, 1, 1, 1]), Demo([6, 7, eos], [0, 1, 1])]
    info = train(demos, tmp_path / "ckpt", steps=2, batch_size=2, lr=1e-3, seed=0, tool_fraction=0.5)
    written = json.loads((tmp_path / "ckpt" / "warm_start.json").read_text())
    assert written == info and written["tool_fraction"] == 0.5 and written["steps"] == 2
    assert (tmp_path / "ckpt" / "model.safetensors").exists()


@pytest.mark.parametrize("fraction", [-0.1, 1.5])
def test_collect_rejects_a_bad_tool_fraction_before_starting_envs(fraction: float) -> None:
    with pytest.raises(ValueError, match="tool_fraction must be in"):
        collect(4, tool_fraction=fraction)


# ------------------------------------------------------------------ `m2rl warm-start` and its alias

ROOT = Path(__file__).resolve().parents[2]
RECORDED = ROOT / "model" / "assets" / "tiny-python-sft" / "warm_start.json"


def test_the_commands_the_asset_records_parse_as_m2rl_warm_start() -> None:
    from m2rl.cli import build_parser
    from m2rl.rl.warm_start import cmd_warm_start

    commands = json.loads(RECORDED.read_text())["commands"]
    assert len(commands) == 2
    parsed = []
    for command in commands:
        words = shlex.split(command)
        assert words[:3] == ["python", "-m", "m2rl.rl.warm_start"]  # the alias's spelling
        args = build_parser().parse_args(["warm-start", *words[3:]])
        assert args.func is cmd_warm_start
        parsed.append(args)
    collect_args, train_args = parsed
    assert collect_args.warm_start_command == "collect" and collect_args.demos == 8192
    assert collect_args.tool_fraction == 0.5
    assert (train_args.warm_start_command, train_args.demos_file, train_args.device) == (
        "train", Path("demos.pt"), "cuda")


def test_m2rl_warm_start_train_writes_a_checkpoint(tmp_path: Path) -> None:
    from m2rl.cli import main

    eos = M2Tokenizer.tiny().eos_id
    save_demos([Demo([3, 4, 5, eos], [0, 1, 1, 1]), Demo([6, 7, eos], [0, 1, 1])], tmp_path / "d.pt", 0.5)
    argv = ["warm-start", "train", "--demos-file", str(tmp_path / "d.pt"), "--steps", "2",
            "--batch-size", "2", "--out", str(tmp_path / "ckpt")]
    assert main(argv) == 0
    assert json.loads((tmp_path / "ckpt" / "warm_start.json").read_text())["tool_fraction"] == 0.5


def test_python_m_alias_is_the_same_command(capsys: pytest.CaptureFixture[str]) -> None:
    from m2rl.rl.warm_start import main

    assert main(["train"]) == 2  # through m2rl's parser and error handling: one line, exit 2
    assert capsys.readouterr().err == (
        "m2rl: error: warm-start train needs --demos-file (from `m2rl warm-start collect --out FILE`)\n")
    done = subprocess.run([sys.executable, "-m", "m2rl.rl.warm_start", "--help"], capture_output=True,
                          text=True, check=False, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and "usage: m2rl warm-start" in done.stdout
