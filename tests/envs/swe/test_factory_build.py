"""The task factory end to end on a real PyPI library: build, reproduce from the seed, export through the
swebench package's own test-spec functions, and validate through the env's grading (gold resolves, the empty
patch does not)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from m2rl.envs.swe.factory.build import FactoryConfig, build_tasks, split_of_library
from m2rl.envs.swe.factory.cli import validate_instances
from m2rl.envs.swe.instances import load_instances
from m2rl.envs.swe.mutations import is_test_file
from m2rl.rewards.grading import split_patch
from swebench.harness.constants import END_TEST_OUTPUT, START_TEST_OUTPUT
from swebench.harness.utils import make_test_spec

LIBRARY = "tinydb==4.9.0"
pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("docker_ready")]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import httpx

    out = tmp_path_factory.mktemp("tasks")
    try:
        report = build_tasks(FactoryConfig(libraries=(LIBRARY,), out=out / "a", seed=3, max_per_library=3))
    except httpx.TransportError as exc:
        pytest.skip(f"PyPI is not reachable from here: {exc}")
    assert report.instances == 3, report
    return out


def test_a_build_is_reproducible_from_its_seed(built: Path):
    build_tasks(FactoryConfig(libraries=(LIBRARY,), out=built / "b", seed=3, max_per_library=3))
    assert (built / "a" / "instances.jsonl").read_bytes() == (built / "b" / "instances.jsonl").read_bytes()


def test_instances_are_well_formed_and_pass_swebench_test_specs(built: Path):
    instances = load_instances(built / "a")
    for inst in instances:
        assert inst.FAIL_TO_PASS and inst.PASS_TO_PASS and not set(inst.FAIL_TO_PASS) & set(inst.PASS_TO_PASS)
        changed = [p for d in split_patch(inst.patch) for p in d.paths]
        assert changed and not any(is_test_file(p) for p in changed)  # the bug is in the code, not the tests
        spec = make_test_spec(inst.to_record())
        assert spec.instance_id == inst.instance_id and spec.FAIL_TO_PASS == list(inst.FAIL_TO_PASS)
        assert START_TEST_OUTPUT in spec.eval_script and END_TEST_OUTPUT in spec.eval_script
        for path in changed:  # the statement never names the file it would have to be fixed in
            for name in (path, path.rsplit("/", 1)[-1]):  # as a whole name: test_utils.py is not utils.py
                assert not re.search(rf"(?<![\w/-]){re.escape(name)}(?!\w)", inst.problem_statement), name
    recipes = json.loads((built / "a" / "images.json").read_text())
    assert [r["instances"] for r in recipes.values()] == [[i.instance_id for i in instances]]


def test_gold_resolves_and_the_empty_patch_does_not(built: Path):
    checks = validate_instances(built / "a", runs=1, workers=1)
    assert [(c.gold, c.empty, c.error) for c in checks] == [([True], [False], "")] * 3


def test_held_out_libraries_are_a_whole_split():
    names = ["alpha", "beta", "gamma", "delta", "epsilon"]
    splits = {n: split_of_library(n, seed=0, test_libraries=[], all_names=names) for n in names}
    assert "test" in splits.values() and "train" in splits.values()
    assert splits == {n: split_of_library(n, seed=0, test_libraries=[], all_names=names) for n in names}
    assert split_of_library("beta", 0, ["beta"], names) == "test"
    assert split_of_library("alpha", 0, ["beta"], names) == "train"
