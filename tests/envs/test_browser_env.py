"""`m2rl/Browser-v0` end to end: real Chromium, the generated site, scripted expert and wrong policies."""

from __future__ import annotations

import time

import gymnasium as gym
import m2rl.envs  # noqa: F401  (registers the env ids)
import pytest
from gymnasium.utils.env_checker import check_env
from m2rl.envs.browser_env import BrowserEnv
from m2rl.envs.experts_web import action_text, browser_expert, browser_wrong, run_script
from m2rl.envs.tasks.browser_tasks import BrowserTaskSet
from m2rl.envs.tools.processes import live_descendants

pytestmark = pytest.mark.browser


def test_registered_and_passes_gymnasium_check_env(no_leaks: None) -> None:
    env = gym.make("m2rl/Browser-v0")
    try:
        assert isinstance(env.unwrapped, BrowserEnv)
        check_env(env.unwrapped)
    finally:
        env.close()


def test_expert_solves_held_out_tasks_and_wrong_policy_scores_zero(no_leaks: None, tmp_path) -> None:
    env = gym.make("m2rl/Browser-v0", split="test")
    tasks = BrowserTaskSet().tasks("test", 5)  # one held-out task of each kind
    assert {t.kind for t in tasks} == set(BrowserTaskSet.kinds) and {t.split for t in tasks} == {"test"}
    try:
        for task in tasks:
            _, info, steps = run_script(env, browser_expert, options={"task": task})
            assert info["verification"]["resolved"] is True, (task.id, info["verification"])
            assert info["verification"]["score"] == 1.0 and steps >= 3
            _, info, _ = run_script(env, browser_wrong, options={"task": task})
            assert info["verification"] == {
                "resolved": False,
                "score": 0.0,
                "details": info["verification"]["details"],
            }
    finally:
        env.close()


def test_policy_mistakes_become_observations_never_exceptions(no_leaks: None, tmp_path) -> None:
    env = BrowserEnv(split="test")
    try:
        obs, info = env.reset(seed=3)
        assert '"name": "browser"' in obs and '"name": "submit"' in obs
        assert {s["function"]["name"] for s in env.tools_spec()} == {"browser", "submit"}
        cases = [
            ([("browser", {"action": "open", "url": "http://example.com/"})], "Blocked", "tool"),
            ([("browser", {"action": "open", "url": "/no/such/page"})], "Status: 404", None),
            ([("browser", {"action": "click", "target": "No such link"})], "no link with text", "tool"),
            ([("browser", {"action": "dance"})], "must be one of", "schema"),
            ([("browser", {"url": "/"})], "missing required parameter 'action'", "schema"),
            ([("teleport", {"to": "/"})], "unknown tool 'teleport'", "unknown_tool"),
        ]
        for calls, expected, kind in cases:
            obs, _, terminated, truncated, info = env.step(action_text(calls))
            assert expected in obs, (calls, obs[-400:])
            assert not terminated and not truncated
            if kind is not None:
                assert kind in [e["kind"] for e in info["errors"]]
        obs, *_ = env.step('<minimax:tool_call><invoke name="browser">broken')
        obs, _, terminated, _, info = env.step(action_text([("browser", {"action": "screenshot"})]))
        assert info["tool_results"][0]["ok"] and ".png" in info["tool_results"][0]["output"]
        assert env.session is not None and list((env.episode_root).rglob("screenshot_000.png"))
    finally:
        env.close()
    assert env.host is None and env.session is None


def test_chromium_is_shared_across_episodes_and_each_episode_gets_a_fresh_site(no_leaks: None) -> None:
    env = BrowserEnv()
    try:
        env.reset(seed=1)
        host, first_origin = env.host, env.session.server.origin  # type: ignore[union-attr]
        env.reset(seed=2)
        assert env.host is host and env.session.server.origin != first_origin  # type: ignore[union-attr]
        assert env.task is not None
    finally:
        env.close()


def test_a_crashed_chromium_is_an_error_observation_and_the_next_reset_relaunches(no_leaks: None) -> None:
    import os
    import signal

    env = BrowserEnv()
    try:
        env.reset(seed=1)
        browsers = [p for p, cmd in live_descendants().items() if "chromium" in cmd and "--type=" not in cmd]
        assert browsers
        for pid in browsers:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        obs, _, terminated, truncated, info = env.step(action_text([("browser", {"action": "open", "url": "/"})]))
        assert "failed" in obs and not terminated and not truncated
        assert [e["kind"] for e in info["errors"]] == ["tool"]
        env.reset(seed=2)
        obs, *_ = env.step(action_text([("browser", {"action": "open", "url": "/staff"})]))
        assert "Staff directory" in obs
    finally:
        env.close()
