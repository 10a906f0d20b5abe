"""`m2rl/BFCL-v0`: BFCL's data as M2 tools, graded by BFCL's own AST, state and response checkers."""

from __future__ import annotations

import json
import random

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env
from m2rl.envs.bfcl import checker

try:
    checker.load()
except checker.BFCLNotInstalled as exc:  # bfcl-eval or one of the small packages its checkers import is missing
    pytest.skip(str(exc), allow_module_level=True)

import m2rl.envs  # noqa: F401  (registers the env ids)
from m2rl.envs.bfcl import convert
from m2rl.envs.bfcl.env import BFCLEnv
from m2rl.envs.bfcl.expert import bfcl_empty, bfcl_expert
from m2rl.envs.bfcl.tasks import CATEGORIES, NO_ANSWER, BFCLTaskSet, entries
from m2rl.envs.experts import action_text, run_script

# The replay of BFCL's own ground truth that BFCL's own checker rejects, or that M2's text format cannot write
# (docs/benchmark_envs.md lists why for each); every other entry of every category must pass.
KNOWN_BAD = {
    "simple_java": {36, 65,  # bool/int items of an ArrayList of `any`: BFCL's Java reader makes every such item text
                    64},  # the possible answer of a HashMap entry is a bare string, not a list of accepted values
    "live_simple": {106, 112},  # possible answer `[]` for an array of strings: BFCL's nested type check rejects it
    "live_multiple": {507, 964,  # a parameter the doc requires is optional in the answer, with no value given
                      862,  # the answer's parameter is not in the function doc
                      552, 595, 596, 731, 733, 735, 1038, 1041},  # a bool/int/null answer for a string-typed param
    "multi_turn_miss_func": {49},  # the answer calls `tail` in turn 1; BFCL holds it out until turn 3
}


@pytest.fixture(scope="module")
def env() -> BFCLEnv:
    env = gym.make("m2rl/BFCL-v0")
    yield env.unwrapped
    env.close()


def play(env: BFCLEnv, script, task_id: str) -> dict:
    _, info, _ = run_script(env, script, options={"task_id": task_id})
    return info


def test_registered_and_passes_check_env() -> None:
    for category in ("simple_python", "multi_turn_base"):
        env = gym.make("m2rl/BFCL-v0", category=category, split="test")
        try:
            check_env(env.unwrapped)
            _, info = env.reset(seed=3)
            assert info["task_id"].startswith(f"bfcl/{category}/") and info["split"] == "test"
        finally:
            env.close()


def test_unknown_or_unavailable_category_is_an_error_naming_the_choices() -> None:
    with pytest.raises(KeyError, match="web_search_base is not offered"):
        gym.make("m2rl/BFCL-v0", category="web_search_base")
    with pytest.raises(KeyError, match="simple_python"):
        gym.make("m2rl/BFCL-v0", category="simple")


def test_spec_conversion_golden() -> None:
    functions = entries("simple_python")[0]["function"]
    assert convert.tool_specs(functions) == [{"type": "function", "function": {
        "name": "calculate_triangle_area",
        "description": "Calculate the area of a triangle given its base and height. "
                       "Note that the provided function is in Python 3 syntax.",
        "parameters": {"type": "object", "properties": {
            "base": {"type": "integer", "description": "The base of the triangle."},
            "height": {"type": "integer", "description": "The height of the triangle."},
            "unit": {"type": "string", "description": "The unit of measure (defaults to 'units' if not specified)"}},
            "required": ["base", "height"]}}}]
    # dotted names as BFCL shows them to OpenAI-style models; its checker maps the expected names the same way
    names = [s["function"]["name"] for s in convert.tool_specs(entries("live_multiple")[0]["function"])]
    assert names == ["ChaFod", "ChaDri_change_drink"]


def test_ground_truth_strings_become_tool_calls() -> None:
    assert convert.executable_call("sort('final_report.pdf')", ["GorillaFileSystem"]) == (
        "sort", {"file_name": "final_report.pdf"})
    call = ("mv", {"source": "a.txt", "destination": "temp"})
    assert convert.executable_form([call]) == ["mv(source='a.txt',destination='temp')"]


def test_ast_checker_on_right_and_wrong_calls(env: BFCLEnv) -> None:
    task_id = "bfcl/simple_python/0"  # calculate_triangle_area(base=10, height=5[, unit='units'])
    for calls, resolved in [
        ([("calculate_triangle_area", {"base": 10, "height": 5})], True),
        ([("calculate_triangle_area", {"base": 10, "height": 5, "unit": "units"})], True),
        ([("calculate_triangle_area", {"base": 10, "height": 6})], False),  # wrong value
        ([("calculate_triangle_area", {"base": 10})], False),  # missing required: BFCL's checker says so
        ([("calculate_triangle_area", {"base": 10, "height": 5})] * 2, False),  # wrong count
        ([], False),  # no call
    ]:
        env.reset(options={"task_id": task_id})
        _, _, terminated, _, info = env.step(action_text(calls))
        assert terminated and info["verification"]["resolved"] is resolved, (calls, info["verification"])
    assert "simple_function_checker" in info["verification"]["details"] or "wrong_count" in info["verification"]["details"]


def test_malformed_call_is_an_observation_not_a_crash(env: BFCLEnv) -> None:
    env.reset(options={"task_id": "bfcl/multi_turn_base/0"})
    bad = "x\n</think>\n\n<minimax:tool_call>\n<invoke name=\"no_such_tool\">\n</invoke>\n</minimax:tool_call>[e~["
    obs, _, terminated, truncated, info = env.step(bad)
    assert not terminated and not truncated and "no_such_tool" in obs and info["errors"]
    unclosed = "x\n</think>\n\n<minimax:tool_call>\n<invoke name=\"ls\">"
    obs, _, terminated, _, info = env.step(unclosed)
    assert not terminated and info["errors"] and obs.startswith("[e~[")
    env.reset(options={"task_id": "bfcl/simple_python/0"})  # single turn: the reply is graded as no valid call
    obs, _, terminated, _, info = env.step(bad)
    assert terminated and not info["verification"]["resolved"] and "no_such_tool" in obs


def test_multi_turn_state_carries_across_turns(env: BFCLEnv) -> None:
    obs, _ = env.reset(options={"task_id": "bfcl/multi_turn_base/0"})
    obs, *_ = env.step(action_text([("cd", {"folder": "document"}), ("mkdir", {"dir_name": "temp"})]))
    assert "document" in obs and "<response>" in obs
    obs, _, terminated, _, _ = env.step(action_text([]))  # no call: the turn ends, the next user message comes
    assert not terminated and obs.startswith("\n]~b]user\nPerform a detailed search using grep")
    obs, *_ = env.step(action_text([("ls", {})]))  # still inside document/, with temp/ made in turn 0
    assert "temp" in obs and "current_directory_content" in obs


def test_miss_func_turn_adds_the_held_out_functions(env: BFCLEnv) -> None:
    task = BFCLTaskSet().generate("multi_turn_miss_func", 0)
    held_out = {f["name"] for fs in task.meta["entry"]["missed_function"].values() for f in fs}
    env.reset(options={"task": task})
    assert not held_out & set(env._tools)
    script, obs = bfcl_expert(task), ""
    calls = next(script)
    while True:
        obs, _, terminated, _, info = env.step(action_text(calls))
        if terminated:
            break
        if "I have updated some more functions" in obs:
            assert held_out <= set(env._tools)
        calls = script.send([])
    assert info["verification"]["resolved"]


def sample_ids(category: str, n: int) -> list[int]:
    ids = [i for i in range(len(entries(category))) if i not in KNOWN_BAD.get(category, set())]
    return sorted(random.Random(0).sample(ids, min(n, len(ids))))


@pytest.mark.parametrize("category", CATEGORIES)
def test_replay_resolves_and_empty_scores_per_bfcl_rules(env: BFCLEnv, category: str) -> None:
    """A seeded sample here (the full sweep over every entry is scripts in docs/benchmark_envs.md)."""
    for index in sample_ids(category, 12):
        task_id = f"bfcl/{category}/{index}"
        assert play(env, bfcl_expert, task_id)["verification"]["resolved"], task_id
        empty = play(env, bfcl_empty, task_id)["verification"]
        assert empty["resolved"] is ("irrelevance" in category), (task_id, empty)


def test_known_bad_entries_fail_for_the_stated_reason(env: BFCLEnv) -> None:
    assert "missing_required" in play(env, bfcl_expert, "bfcl/live_multiple/507")["verification"]["details"]
    assert "Expected one of [True]" in play(env, bfcl_expert, "bfcl/live_multiple/552")["verification"]["details"]
    assert "execution_response_mismatch" in play(env, bfcl_expert, "bfcl/multi_turn_miss_func/49")["verification"]["details"]


def test_episodes_forget_their_backend_instances(env: BFCLEnv) -> None:
    play(env, bfcl_expert, "bfcl/multi_turn_base/1")
    play(env, bfcl_expert, "bfcl/multi_turn_base/2")
    env.reset(options={"task_id": "bfcl/simple_python/0"})
    leftovers = [n for n in vars(checker.load().multi_turn_utils) if n.startswith("m2rl_policy")]
    assert leftovers == []


def test_chat_mode_episode() -> None:
    from m2rl.envs.chat_env import ChatEnv

    chat = ChatEnv(gym.make("m2rl/BFCL-v0", category="multi_turn_base"))
    try:
        obs, _ = chat.reset(options={"task_id": "bfcl/multi_turn_base/0"})
        assert obs["messages"][-1]["role"] == "user" and any(t["function"]["name"] == "cd" for t in obs["tools"])
        task = chat.unwrapped.task
        script = bfcl_expert(task)
        calls, step = next(script), 0
        while True:
            message = {"role": "assistant", "content": "" if calls else "Done.",
                       "tool_calls": [{"id": f"c{step}_{i}", "type": "function",
                                       "function": {"name": n, "arguments": json.dumps(a)}}
                                      for i, (n, a) in enumerate(calls)]}
            obs, reward, terminated, truncated, info = chat.step(message)
            step += 1
            if terminated or truncated:
                break
            roles = {m["role"] for m in obs["messages"]}
            assert roles == ({"tool"} if calls else {"user"})
            calls = script.send([m["content"] for m in obs["messages"]])
        assert info["verification"]["resolved"] and reward > 0
    finally:
        chat.close()


def test_no_answer_categories_have_no_possible_answers() -> None:
    for category in NO_ANSWER:
        assert BFCLTaskSet().generate(category, 0).meta["answer"] is None


def test_category_option_at_reset_and_seeded_sampling(env: BFCLEnv) -> None:
    _, info = env.reset(seed=7, options={"category": "live_parallel"})
    assert info["task_id"].startswith("bfcl/live_parallel/")
    again = env.reset(seed=7, options={"category": "live_parallel"})[1]["task_id"]
    assert again == info["task_id"]  # the same seed gives the same entry
    ids = {env.reset(seed=s)[1]["task_id"].split("/")[1] for s in range(40)}
    assert len(ids) > 8  # training draws across the categories


def test_relevance_rule_counts_invokes_not_unparseable_blocks(env: BFCLEnv) -> None:
    made_up = "x\n</think>\n\n<minimax:tool_call>\n<invoke name=\"no_such_tool\">\n</invoke>\n</minimax:tool_call>[e~["
    unclosed = "x\n</think>\n\n<minimax:tool_call>\nnot an invoke"
    for text, abstained in [(made_up, False), (unclosed, True), (action_text([]), True)]:
        for category in ("irrelevance", "live_relevance"):
            env.reset(options={"task_id": f"bfcl/{category}/0"})
            info = env.step(text)[4]
            assert info["verification"]["resolved"] is (abstained == (category == "irrelevance")), (category, text)


def test_parameter_names_never_run_as_code(env: BFCLEnv, tmp_path) -> None:
    """BFCL evals call strings; a parameter name the policy wrote must not become code."""
    marker = tmp_path / "pwned"
    key = f'folder="x",y=open("{marker}","w").write("1"),z'
    text = ("x\n</think>\n\n<minimax:tool_call>\n<invoke name=\"cd\">\n"
            f"<parameter name=\"{key}\">a</parameter>\n</invoke>\n</minimax:tool_call>[e~[")
    env.reset(options={"task_id": "bfcl/multi_turn_base/0"})
    obs, _, terminated, _, _ = env.step(text)
    assert not marker.exists() and not terminated and "identifiers" in obs
