"""m2rl/SWE-v0 end to end on the shipped starter set: real library repositories in Docker images (rebuilt from
their recipes when missing), episodes driven by scripted actions, official grading in a fresh sandbox."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import gymnasium as gym
import m2rl.envs  # noqa: F401  (registers the ids)
import pytest
from gymnasium.utils.env_checker import check_env
from m2rl.envs.experts import action_text, run_script
from m2rl.envs.swe.expert import gold_patch_calls, gold_patch_script
from m2rl.envs.swe.instances import load_instances
from m2rl.rewards.grading import split_patch

STARTER = Path(__file__).resolve().parents[3] / "tasks" / "swe-starter"
pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]


@pytest.fixture(scope="module")
def env():
    env = gym.make("m2rl/SWE-v0", instances=str(STARTER), sandbox="docker", split="train")
    yield env
    env.close()


def first_instance(split: str = "train"):
    return load_instances(STARTER, split=split)[0]


def test_check_env_passes():
    env = gym.make("m2rl/SWE-v0", instances=str(STARTER), sandbox="docker", max_steps=2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gymnasium warns that text spaces are not numpy arrays
            check_env(env.unwrapped, skip_render_check=True)
    finally:
        env.close()


def test_gold_patch_through_the_editor_resolves(env):
    inst = first_instance()
    _, info, steps = run_script(env, gold_patch_script(env), options={"task_id": inst.instance_id})
    assert info["verification"]["resolved"] is True, info["verification"]
    assert info["reward_breakdown"]["resolved"] > 0 and steps == 2
    assert "RESOLVED_FULL" in info["verification"]["details"]


def test_empty_patch_does_not_resolve(env):
    inst = first_instance()
    env.reset(options={"task_id": inst.instance_id})
    _, _, terminated, _, info = env.step(action_text([("submit", {"answer": "done"})]))
    assert terminated and info["verification"]["resolved"] is False
    assert info["reward_breakdown"]["resolved"] == 0.0


def test_editing_the_tests_instead_of_the_code_does_not_resolve(env):
    """Deleting the failing tests makes the agent's own test run pass, but the grader restores the tests,
    and the edit is a test_tampering detection."""
    inst = first_instance()
    env.reset(options={"task_id": inst.instance_id})
    test_file = inst.FAIL_TO_PASS[0].split("::")[0]
    _, _, _, _, info = env.step(action_text([("str_replace_editor", {
        "command": "create", "path": f"/testbed/{test_file}.new", "file_text": "def test_ok():\n    pass\n"}),
        ("bash", {"command": f"mv {test_file}.new {test_file}"})]))
    assert info["detectors"].get("test_tampering"), info["detectors"]
    _, _, terminated, _, info = env.step(action_text([("submit", {"answer": "done"})]))
    assert terminated and info["verification"]["resolved"] is False
    assert "dropped test edits" in info["verification"]["details"]


def test_warm_reset_restores_the_repository_in_the_same_container(env):
    inst = first_instance()
    env.reset(options={"task_id": inst.instance_id})
    sandbox = env.unwrapped.sandbox
    env.step(action_text([("bash", {"command": "echo junk > junk.txt && rm -rf .git/hooks"})]))
    env.reset(options={"task_id": inst.instance_id})
    assert env.unwrapped.sandbox is sandbox  # no new container
    reply = run_in(env, "ls junk.txt 2>&1; git status --short | wc -l")
    assert "No such file" in reply and reply.split()[-1] == "0", reply


def test_the_fix_cannot_be_mined_from_git(env):
    """One commit and one ref, no remotes, and no object holding the fixed file: the object database has
    nothing the base tree does not need."""
    inst = first_instance()
    env.reset(options={"task_id": inst.instance_id})
    command = "git log --all --oneline | wc -l; git remote | wc -l; git for-each-ref | wc -l"
    assert run_in(env, command).split()[:3] == ["1", "0", "1"]
    env.step(action_text(gold_patch_calls(inst.patch)))  # the fixed file, written by the editor
    path = split_patch(inst.patch)[0].new_path
    reply = run_in(env, f"git cat-file -e $(git hash-object {path}) 2>/dev/null && echo present || echo absent")
    assert reply.strip() == "absent"


def run_in(env, command: str) -> str:
    _, _, _, _, info = env.step(action_text([("bash", {"command": command})]))
    return info["responses"][0]


def test_running_the_tests_reports_results_and_fixing_pays_test_progress(env):
    inst = first_instance()
    env.reset(options={"task_id": inst.instance_id})
    target = inst.FAIL_TO_PASS[0]
    _, _, _, _, info = env.step(action_text([("bash", {"command": f"python -m pytest -q {target.split('::')[0]}"})]))
    assert target in info["tests"]["failed"]
    assert info["reward_breakdown"]["test_progress"] == 0.0
    _, _, _, _, info = env.step(action_text(gold_patch_calls(inst.patch)))
    assert info["reward_breakdown"]["relevant_file"] > 0  # the fix's file, edited for the first time
    assert all(e["syntax_ok"] is True for e in info["edits"])
    _, _, _, _, info = env.step(action_text([("bash", {"command": f"python -m pytest -q {target.split('::')[0]}"})]))
    assert target in info["tests"]["passed"]
    assert info["reward_breakdown"]["test_progress"] > 0


def test_a_syntax_error_left_by_a_command_is_scored(env):
    inst = first_instance()
    env.reset(options={"task_id": inst.instance_id})
    path = split_patch(inst.patch)[0].new_path
    _, _, _, _, info = env.step(action_text([("bash", {"command": f"echo 'def broken(:' >> {path}"})]))
    assert {"path": f"/testbed/{path}", "syntax_ok": False} in info["edits"]
    assert info["reward_breakdown"]["syntax_error"] < 0


def test_starter_set_is_split_by_library():
    instances = load_instances(STARTER)
    by_split: dict[str, set[str]] = {}
    for inst in instances:
        by_split.setdefault(inst.split, set()).add(inst.repo)
    assert set(by_split) == {"train", "test"} and not by_split["train"] & by_split["test"]
    assert len(instances) >= 24
    recipes = json.loads((STARTER / "images.json").read_text())
    assert sorted(i for r in recipes.values() for i in r["instances"]) == sorted(i.instance_id for i in instances)


@pytest.mark.slow
def test_training_on_swe_runs_grades_and_updates(tmp_path: Path):
    """configs/swe.yaml end to end, shortened to one step (about 2 minutes on 2 CPU cores): episodes in the
    repository images, every one graded, a learner update, an evaluation on the held-out library."""
    from m2rl.cli import main

    argv = ["train", "--config", "configs/swe.yaml", "steps=1", "eval.every=1", f"run_root={tmp_path}", "name=swe"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "swe" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "learner/loss" in r]
    assert len(train) == 1 and train[0]["rollout/failed_episodes"] == 0 and train[0]["learner/loss_tokens"] > 0
    assert [r["eval/failed_episodes"] for r in rows if "eval/success_rate" in r] == [0.0, 0.0]


def test_an_official_image_in_the_engine_is_used(tmp_path: Path):
    """An image named like SWE-bench's (`sweb.eval.x86_64.<id>`, repository at /testbed) is adapted to the
    sandbox layout once and used instead of the instance's own image; the gold patch still resolves."""
    import dataclasses

    from m2rl.envs.swe.images import official_image, resolve_image
    from m2rl.envs.swe.instances import official_image_name, write_instances
    from m2rl.sandboxes.docker_backend import docker_client

    inst = first_instance()
    env = gym.make("m2rl/SWE-v0", instances=str(STARTER), ids=[inst.instance_id])
    ours = env.unwrapped.image_of(inst)  # built from the recipe if missing
    env.close()
    client = docker_client()
    official = f"{official_image_name(inst.instance_id)}:latest"
    # An official-style image: the repository in /testbed itself, no seed directory.
    container = client.containers.create(ours, command=["sleep", "infinity"], user="0")
    try:
        container.start()
        code, out = container.exec_run(["bash", "-c", "cp -a /opt/m2rl/seed/testbed/. /testbed/ && rm -rf /opt/m2rl/seed"])
        assert code == 0, out
        container.commit(repository=official.split(":")[0], tag="latest")
    finally:
        container.remove(force=True)
    try:
        assert official_image(inst.instance_id) == official
        orphan = dataclasses.replace(inst, image="m2rl-no-such-image:0")  # only the official image can serve it
        adapted = resolve_image(orphan)
        assert adapted.startswith("m2rl-swe-official:")
        write_instances(tmp_path / "instances.jsonl", [orphan])
        env = gym.make("m2rl/SWE-v0", instances=str(tmp_path / "instances.jsonl"))
        try:
            _, info, _ = run_script(env, gold_patch_script(env), options={"task_id": inst.instance_id})
            assert env.unwrapped.image_of(orphan) == adapted
            assert info["verification"]["resolved"] is True, info["verification"]
        finally:
            env.close()
    finally:
        for tag in (official, *(t.tags[0] for t in client.images.list("m2rl-swe-official"))):
            client.images.remove(tag, force=True)
