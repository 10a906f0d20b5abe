"""docs/new_env.md: its example is envs/examples/word_count.py verbatim, and the example env works."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env
from m2rl.envs.experts import action_text

ROOT = Path(__file__).resolve().parents[2]


def test_doc_includes_the_example_verbatim_and_it_is_short() -> None:
    doc = (ROOT / "docs" / "new_env.md").read_text()
    example = (ROOT / "envs" / "examples" / "word_count.py").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.DOTALL)
    assert blocks and blocks[0] == example
    assert len(example.splitlines()) <= 30


@pytest.mark.bwrap
def test_example_env_passes_check_env_and_grades() -> None:
    from m2rl.envs import register_env

    register_env("m2rl/WordCount-v0", "m2rl.envs.examples.word_count:make_word_count_env")
    env = gym.make("m2rl/WordCount-v0", split="test")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_env(env.unwrapped)
        assert not [str(w.message) for w in caught if "WARN" in str(w.message)]
        env.reset(seed=4)
        _, _, _, _, info = env.step(action_text([("bash", {"command": "wc -w < /work/text.txt"})]))
        count = info["tool_results"][0]["output"].strip()
        _, _, terminated, _, info = env.step(action_text([("submit", {"answer": count})]))
        assert terminated and info["verification"]["resolved"]
        assert count == env.unwrapped.task.answer
    finally:
        env.close()
