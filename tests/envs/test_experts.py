"""Acceptance: the scripted expert solves every sampled held-out task; the wrong policy scores 0."""

from __future__ import annotations

import gymnasium as gym
import m2rl.envs  # noqa: F401
import pytest
from m2rl.envs.experts import EXPERTS, WRONG, run_script

FAMILIES = {"shell": "m2rl/Shell-v0", "python": "m2rl/Python-v0"}


@pytest.mark.bwrap
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_expert_solves_held_out_tasks_and_wrong_policy_scores_zero(family: str) -> None:
    env = gym.make(FAMILIES[family], split="test")
    try:
        tasks = env.unwrapped.task_set.tasks("test", 10)  # two of every kind
        assert {t.split for t in tasks} == {"test"}
        for task in tasks:
            total, info, _ = run_script(env, EXPERTS[family], options={"task_id": task.id})
            assert info["verification"]["resolved"], (task.id, info["verification"])
            assert info["reward_breakdown"]["resolved"] == 1.0 and total > 1.0
            total_wrong, info_wrong, _ = run_script(env, WRONG[family], options={"task_id": task.id})
            assert info_wrong["verification"] == {
                **info_wrong["verification"],
                "resolved": False,
                "score": 0.0,
            }
            assert info_wrong["reward_breakdown"]["resolved"] == 0.0
            # Dense shaping (valid tool calls) is all a wrong policy can earn: never near a solved task.
            assert total_wrong <= 0.5 < total
    finally:
        env.close()


@pytest.mark.bwrap
def test_expert_reads_the_sandbox_not_the_answer() -> None:
    """If the tool's output is wrong, the python expert is wrong: it submits what the sandbox printed."""
    env = gym.make("m2rl/Python-v0", split="test")
    try:
        env.reset(options={"task_id": "python/arith/9"})

        def sabotaged(task):
            yield [("python", {"code": "print(-1)"})]
            outputs = yield [("python", {"code": "print(-1)"})]
            yield [("submit", {"answer": outputs[0].strip()})]

        _, info, steps = run_script(env, sabotaged, options={"task_id": "python/arith/9"})
        assert steps == 3 and not info["verification"]["resolved"]
    finally:
        env.close()


@pytest.mark.docker
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_expert_on_the_docker_backend(family: str) -> None:
    from m2rl.sandboxes.images import build_base

    image = build_base()  # cached by content hash; builds offline the first time
    env = gym.make(FAMILIES[family], backend="docker", image=image, split="test")
    try:
        for task in env.unwrapped.task_set.tasks("test", 5):
            _, info, _ = run_script(env, EXPERTS[family], options={"task_id": task.id})
            assert info["verification"]["resolved"], (task.id, info["verification"])
        _, info, _ = run_script(env, WRONG[family], options={"task_id": task.id})
        assert not info["verification"]["resolved"]
    finally:
        env.close()


@pytest.mark.bwrap
def test_mental_arith_expert_solves_arith_without_the_tool() -> None:
    from m2rl.envs.experts import python_mental_arith

    env = gym.make("m2rl/Python-v0", split="test", kinds=("arith",))
    try:
        for task in env.unwrapped.task_set.tasks("test", 5, kinds=("arith",)):
            _, info, steps = run_script(env, python_mental_arith, options={"task_id": task.id})
            assert steps == 1 and info["verification"]["resolved"], (task.id, info["verification"])
        with pytest.raises(ValueError, match="only does arith"):
            next(python_mental_arith(env.unwrapped.task_set.tasks("test", 1, kinds=("collatz",))[0]))
    finally:
        env.close()


def test_mixture_picks_one_stable_script_per_task_in_proportion() -> None:
    from m2rl.envs.experts import mixture
    from m2rl.envs.tasks.python_tasks import PythonTaskSet

    def first(task):
        yield [("python", {"code": "1"})]

    def second(task):
        yield [("submit", {"answer": "2"})]

    tasks = PythonTaskSet().tasks("train", 2000, kinds=("arith",))
    pick = mixture([(first, 0.3), (second, 0.7)])
    choices = [next(pick(t))[0][0] for t in tasks]
    assert choices == [next(pick(t))[0][0] for t in tasks]  # stable per task id
    share = choices.count("python") / len(choices)
    assert abs(share - 0.3) < 0.04  # binomial sd ~0.01
    assert {next(mixture([(first, 1.0), (second, 0.0)])(t))[0][0] for t in tasks[:50]} == {"python"}
    for bad in ([], [(first, 0.0)], [(first, -1.0), (second, 2.0)]):
        with pytest.raises(ValueError, match="non-negative weights"):
            mixture(bad)
