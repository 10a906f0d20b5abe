"""envs/examples/json_fixer.py, the guide's checker-graded example: a real Gymnasium env whose checker passes
the scripted expert's file and fails every other one, and which stays a few dozen lines."""

from __future__ import annotations

import json
import re
import shlex
import warnings
from pathlib import Path

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env
from m2rl.envs.examples.json_fixer import JsonFixerTasks, json_fixer_expert
from m2rl.envs.experts import action_text, run_script, shell_wrong

ROOT = Path(__file__).resolve().parents[2]
ENV_ID = "m2rl.envs.examples.json_fixer:m2rl/JsonFixer-v0"  # the module:ID form the guide uses
OUTCOME_ONLY = {"components": {"resolved": 1.0}}  # reward = the checker's verdict, no dense terms


def test_the_example_is_a_few_dozen_lines_as_the_guide_says() -> None:
    lines = (ROOT / "envs" / "examples" / "json_fixer.py").read_text().splitlines()
    assert len(lines) <= 60
    assert len([line for line in lines if line.strip()]) <= 50
    guide = (ROOT / "docs" / "new_env.md").read_text()
    assert re.findall(r"`envs/examples/json_fixer.py` \((\d+) lines", guide) == [str(len(lines))]


def test_tasks_are_broken_json_with_a_checker_and_regenerate_from_their_id() -> None:
    tasks = JsonFixerTasks()
    for task in tasks.tasks("test", 5) + tasks.tasks("train", 5):
        with pytest.raises(json.JSONDecodeError):
            json.loads(task.files["/work/config.json"])
        assert task.answer is None and task.checker is not None
        key = task.meta["key"]
        assert f'"{key}"' in task.prompt and key not in task.files["/work/config.json"]
        assert tasks.get(task.id) == task


@pytest.mark.bwrap
def test_check_env_passes() -> None:
    env = gym.make(ENV_ID, split="test")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_env(env.unwrapped)
        assert not [str(w.message) for w in caught if "WARN" in str(w.message)]
    finally:
        env.close()


@pytest.mark.bwrap
@pytest.mark.parametrize("split", ["train", "test"])
def test_the_expert_scores_1_and_a_wrong_policy_0(split: str) -> None:
    env = gym.make(ENV_ID, split=split, max_steps=6, reward_spec=OUTCOME_ONLY)
    try:
        for seed in range(3):
            reward, info, steps = run_script(env, json_fixer_expert, seed=seed)
            assert (reward, steps) == (1.0, 4), info["verification"]
            assert info["verification"]["details"] == "correct"
            reward, info, _ = run_script(env, shell_wrong, seed=seed)
            assert reward == 0.0 and "JSONDecodeError" in info["verification"]["details"]
    finally:
        env.close()


@pytest.mark.bwrap
def test_valid_json_that_drops_a_key_or_misses_the_value_fails() -> None:
    # The checker compares the whole object: parsing is not enough.
    env = gym.make(ENV_ID, split="test", max_steps=4, reward_spec=OUTCOME_ONLY)
    try:
        env.reset(seed=1)
        task = env.unwrapped.task
        wrong = {"fix_syntax_only": "{}",
                 "wrong_value": json.dumps({task.meta["key"]: task.meta["value"] + 1})}
        for name, text in wrong.items():
            env.reset(seed=1)
            edit = {"command": "create", "path": "/work/new.json", "file_text": text}
            env.step(action_text([("str_replace_editor", edit),
                                  ("bash", {"command": "mv /work/new.json /work/config.json"})]))
            _, reward, terminated, _, info = env.step(action_text([("submit", {"answer": "done"})]))
            assert terminated and reward == 0.0, name
            assert info["verification"]["details"].startswith("config.json holds"), name
    finally:
        env.close()


@pytest.mark.slow
@pytest.mark.bwrap
def test_the_guides_train_command_trains(tmp_path: Path) -> None:
    # The guide's `m2rl train env.id=module:ID ...` command, run as written (about 30 s on 2 CPU cores).
    from m2rl.cli import main

    guide = (ROOT / "docs" / "new_env.md").read_text().replace("\\\n", " ")
    line = next(line for line in guide.splitlines() if line.startswith("m2rl train env.id="))
    argv = shlex.split(line)[1:]
    assert main([*argv, f"run_root={tmp_path}"]) == 0
    summary = json.loads((tmp_path / "json-fixer" / "summary.json").read_text())
    assert summary["steps"] == 2 and (tmp_path / "json-fixer" / "final" / "config.json").exists()
