"""The warm-start builder: demonstration files keep their provenance, and a bad mix fails before any work."""

from __future__ import annotations

import json
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
