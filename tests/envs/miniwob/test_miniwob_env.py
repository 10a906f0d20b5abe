"""`m2rl/MiniWoB-v0` end to end: the miniwob wheel's real pages in the project's Chromium, graded by the pages.

Every reward below is checked against what the page itself holds (core.js's WOB_* globals, read straight from
the page), so the env can neither invent nor alter a page's verdict.
"""

from __future__ import annotations

import importlib.util
import json

import gymnasium as gym
import m2rl.envs  # noqa: F401  (registers the env ids)
import pytest
from gymnasium.utils.env_checker import check_env
from m2rl.envs.chat_env import ChatEnv
from m2rl.envs.experts import action_text, run_script
from m2rl.envs.miniwob.env import DEFAULT_TASKS, MiniWoBEnv, MiniWoBTaskSet
from m2rl.envs.miniwob.experts import SOLVERS, find, miniwob_expert, miniwob_random, parse_page

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(importlib.util.find_spec("miniwob") is None,
                       reason="the miniwob package is missing (pip install --no-deps miniwob==1.1.0)"),
]


def page_globals(env: gym.Env) -> dict:
    """The page's own verdict, read from its globals without the env's code."""
    session = env.unwrapped.session
    return session.tool.call(session.tool.page.evaluate(
        "() => ({done: WOB_DONE_GLOBAL, raw: WOB_RAW_REWARD_GLOBAL, reward: WOB_REWARD_GLOBAL})"), "read")


@pytest.fixture
def env(no_leaks: None):
    env = gym.make("m2rl/MiniWoB-v0", split="test")
    yield env
    env.close()


def test_registered_and_passes_gymnasium_check_env(no_leaks: None) -> None:
    env = gym.make("m2rl/MiniWoB-v0", tasks="click-button,enter-text")
    try:
        assert isinstance(env.unwrapped, MiniWoBEnv) and env.unwrapped.task_set.kinds == ("click-button", "enter-text")
        check_env(env.unwrapped)
        obs, info = env.reset(seed=0)
        assert info["screenshot_png"][:8] == b"\x89PNG\r\n\x1a\n" and info["utterance"] in obs
        assert {s["function"]["name"] for s in env.unwrapped.tools_spec()} == {"click", "type", "press", "select"}
    finally:
        env.close()


def test_unknown_task_is_refused_with_the_list(no_leaks: None) -> None:
    with pytest.raises(ValueError, match="unknown MiniWoB task"):
        MiniWoBEnv(tasks="click-buttons")


def test_same_seed_same_page_and_the_seed_matters(env) -> None:
    env.reset(options={"task_id": "miniwob/click-checkboxes/5"})
    first = env.unwrapped.task.prompt
    env.reset(options={"task_id": "miniwob/click-checkboxes/5"})
    assert env.unwrapped.task.prompt == first
    env.reset(options={"task_id": "miniwob/click-checkboxes/6"})
    assert env.unwrapped.task.prompt != first


def test_solvers_get_the_pages_full_reward_on_every_default_task(env) -> None:
    assert len(SOLVERS) >= 10 and set(DEFAULT_TASKS) <= set(SOLVERS)
    for task in MiniWoBTaskSet(DEFAULT_TASKS).tasks("test", 2 * len(DEFAULT_TASKS)):  # two seeds per page
        total, info, _ = run_script(env, miniwob_expert, options={"task": task})
        assert info["verification"]["resolved"] is True, (task.id, info["verification"])
        assert total == 1.0 == page_globals(env)["raw"], task.id
        assert page_globals(env)["done"] is True


def test_the_pages_reward_is_taken_as_is(env) -> None:
    """A wrong button: the page pays -1, and so does the env; the time-scaled reward is the other option."""
    env.reset(options={"task_id": "miniwob/click-button/3"})
    page = parse_page(env.unwrapped.task.prompt)
    wanted = env.unwrapped.session.utterance.split('"')[1]
    wrong = next(line for line in page if line.tag == "BUTTON" and line.text != wanted)
    _, reward, terminated, _, info = env.step(action_text([("click", {"ref": wrong.ref})]))
    assert terminated and reward == -1.0 == page_globals(env)["raw"]
    assert info["verification"]["score"] == -1.0 and info["verification"]["resolved"] is False

    scaled = gym.make("m2rl/MiniWoB-v0", reward="env", screenshots=False)
    try:
        total, info, _ = run_script(scaled, miniwob_expert, options={"task_id": "miniwob/click-button/3"})
        assert 0.0 < total <= 1.0 and total == page_globals(scaled)["reward"]
    finally:
        scaled.close()


def test_random_clicker_gets_what_the_page_says(env) -> None:
    rewards = []
    for task in MiniWoBTaskSet(("click-button", "click-link", "click-tab", "click-dialog")).tasks("test", 8):
        total, info, _ = run_script(env, miniwob_random, options={"task": task})
        page = page_globals(env)
        assert total == (page["raw"] if page["done"] else 0.0), (task.id, page)
        assert info["verification"]["score"] == total
        rewards.append(total)
    assert set(rewards) <= {-1.0, 0.0, 1.0} and -1.0 in rewards  # a random click usually hits a wrong target


def test_mistakes_are_observations_not_crashes(env) -> None:
    env.reset(options={"task_id": "miniwob/choose-list/2"})
    page = parse_page(env.unwrapped.task.prompt)
    button = find(page, "BUTTON").ref
    cases = [
        ("no tool call here <minimax:tool_call><invoke name=", "Error"),
        (action_text([("click", {"ref": 9999})]), "there is no element [9999]"),
        (action_text([("click", {"ref": "submit"})]), "Error"),
        (action_text([("select", {"ref": button, "option": "x"})]), "not a SELECT"),
        (action_text([("press", {"key": "NoSuchKey"})]), "Error: press"),
        (action_text([("teleport", {"to": 1})]), "unknown tool 'teleport'"),
    ]
    for action, expected in cases:
        obs, reward, terminated, truncated, info = env.step(action)
        assert expected in obs, (expected, obs[-600:])
        assert reward == 0.0 and not terminated and not truncated and info["errors"]
    assert page_globals(env)["done"] is False  # none of it reached the page's verdict
    option = env.unwrapped.session.utterance.split("Select ")[1].split(" from the list")[0]
    obs, reward, terminated, _, _ = env.step(action_text([("select", {"ref": find(page, "SELECT").ref,
                                                                       "option": option})]))
    assert f'SELECT #options value="{option}"' in obs and not terminated  # the listing shows the choice


def test_chat_mode_plays_an_episode(no_leaks: None) -> None:
    env = ChatEnv(gym.make("m2rl/MiniWoB-v0", tasks="click-button", screenshots=False))
    try:
        obs, _ = env.reset(seed=1)
        assert [m["role"] for m in obs["messages"]] == ["system", "user"]
        assert {t["function"]["name"] for t in obs["tools"]} == {"click", "type", "press", "select"}
        user = obs["messages"][1]["content"]
        wanted = user.split('"')[1]
        ref = next(line.ref for line in parse_page(user) if line.tag == "BUTTON" and line.text == wanted)
        message = {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "click", "arguments": json.dumps({"ref": ref})}}]}
        obs, reward, terminated, _, info = env.step(message)
        assert terminated and reward == 1.0 and info["verification"]["resolved"] is True
        assert obs["messages"][0]["role"] == "tool" and "The page ended the episode" in obs["messages"][0]["content"]
    finally:
        env.close()
