"""SWETaskSet and the gold-patch expert without Docker: task enumeration, splits, the rewards' view of a task,
and the editor replacements a patch becomes."""

from __future__ import annotations

import random

import pytest
from m2rl.envs.swe.expert import Replacement, gold_patch_calls, replacements
from m2rl.envs.swe.instances import SWEInstance
from m2rl.envs.swe.task_set import SWETaskSet

PATCH = """diff --git a/pkg/calc.py b/pkg/calc.py
--- a/pkg/calc.py
+++ b/pkg/calc.py
@@ -1,4 +1,4 @@
 def add(a, b):
-    return a - b
+    return a + b
 
 
@@ -10,3 +10,3 @@ def mul(a, b):
 def div(a, b):
-    return a // b
+    return a / b
diff --git a/pkg/new.py b/pkg/new.py
new file mode 100644
--- /dev/null
+++ b/pkg/new.py
@@ -0,0 +1,2 @@
+X = 1
+Y = 2
"""
TEST_PATCH = """diff --git a/tests/test_calc.py b/tests/test_calc.py
--- a/tests/test_calc.py
+++ b/tests/test_calc.py
@@ -1,2 +1,3 @@
 from pkg.calc import add
+from pkg.calc import div
 
"""


def instance(iid: str, repo: str, split: str, **kw) -> SWEInstance:
    fields = {"instance_id": iid, "repo": repo, "base_commit": "a" * 40, "patch": PATCH, "test_patch": "",
              "problem_statement": f"problem of {iid}", "FAIL_TO_PASS": ("tests/test_calc.py::test_add",),
              "PASS_TO_PASS": ("tests/test_calc.py::test_sub",), "split": split}
    return SWEInstance(**{**fields, **kw})


@pytest.fixture
def task_set() -> SWETaskSet:
    return SWETaskSet([
        instance("lib-a__1", "f/lib-a", "train"),
        instance("lib-a__2", "f/lib-a", "train", test_patch=TEST_PATCH),
        instance("lib-b__1", "f/lib-b", "test"),
    ])


def test_tasks_follow_the_instances_splits_and_repos(task_set):
    assert task_set.kinds == ("f/lib-a", "f/lib-b")
    assert [t.id for t in task_set.tasks("train", 10)] == ["lib-a__1", "lib-a__2"]
    assert [t.id for t in task_set.tasks("test", 10)] == ["lib-b__1"]
    assert [t.id for t in task_set.tasks("train", 10, kinds=("f/lib-b",))] == []
    task = task_set.get("lib-a__2")
    assert (task.id, task.kind, task.split) == ("lib-a__2", "f/lib-a", "train")
    assert "problem of lib-a__2" in task.prompt and "/testbed" in task.prompt
    assert task_set.get(task.id) == task


def test_sampling_is_deterministic_in_the_rng(task_set):
    draws = [task_set.sample("train", random.Random(7)).id for _ in range(3)]
    assert len(set(draws)) == 1 and draws[0].startswith("lib-a")
    assert task_set.sample("test", random.Random(0)).id == "lib-b__1"


def test_unknown_ids_repos_and_empty_splits_are_clear_errors(task_set):
    with pytest.raises(KeyError, match="unknown SWE instance 'nope'"):
        task_set.get("nope")
    with pytest.raises(ValueError, match="unknown repositories"):
        task_set.tasks("train", 1, kinds=("x/y",))
    only_train = SWETaskSet([instance("a", "f/a", "train")])
    with pytest.raises(ValueError, match="no SWE instance in split 'test'"):
        only_train.sample("test", random.Random(0))
    with pytest.raises(ValueError, match="at least one instance"):
        SWETaskSet([])


def test_reward_task_names_the_targets_the_fix_files_and_the_test_files(task_set):
    reward_task = task_set.reward_task(task_set.get("lib-a__2"))
    assert reward_task.target_tests == ("tests/test_calc.py::test_add",)
    assert reward_task.reference_files == ("pkg/calc.py", "pkg/new.py")
    assert reward_task.test_paths == ("tests/test_calc.py",)


def test_grading_without_a_sandbox_is_refused(task_set):
    with pytest.raises(ValueError, match="not set up"):
        task_set.grade(task_set.get("lib-a__1"), None, "done")


def test_patch_becomes_editor_replacements():
    assert replacements(PATCH) == [
        Replacement("pkg/calc.py", "def add(a, b):\n    return a - b\n\n\n", "def add(a, b):\n    return a + b\n\n\n"),
        Replacement("pkg/calc.py", "def div(a, b):\n    return a // b\n", "def div(a, b):\n    return a / b\n"),
        Replacement("pkg/new.py", "", "X = 1\nY = 2\n"),
    ]
    calls = gold_patch_calls(PATCH)
    assert calls[0] == ("str_replace_editor", {"command": "str_replace", "path": "/testbed/pkg/calc.py",
                                               "old_str": "def add(a, b):\n    return a - b\n\n\n",
                                               "new_str": "def add(a, b):\n    return a + b\n\n\n"})
    assert calls[2] == ("str_replace_editor", {"command": "create", "path": "/testbed/pkg/new.py",
                                               "file_text": "X = 1\nY = 2\n"})


class RecordingSandbox:
    """Test double for a grading sandbox: records resets and closes."""

    def __init__(self, image: str) -> None:
        self.image, self.resets, self.closed = image, 0, False

    def reset(self) -> None:
        self.resets += 1

    def close(self) -> None:
        self.closed = True


def test_warm_graders_are_capped_least_recently_used_first(monkeypatch):
    from m2rl.envs.swe.env import MAX_WARM_GRADERS, SWEEnv

    instances = [instance(f"lib-{i}__1", f"f/lib-{i}", "train") for i in range(MAX_WARM_GRADERS + 2)]
    env = SWEEnv(SWETaskSet(instances), backend="docker")
    started: list[RecordingSandbox] = []
    monkeypatch.setattr(env, "image_of", lambda inst: f"image-of-{inst.repo}")
    monkeypatch.setattr(env, "_start_sandbox", lambda image: started.append(RecordingSandbox(image)) or started[-1])
    first = env._grader_for(instances[0])
    assert env._grader_for(instances[0]) is first and first.resets == 1  # reused, reset before each grade
    for inst in instances[1:]:
        env._grader_for(inst)
    assert len(env._graders) == MAX_WARM_GRADERS
    assert [s.closed for s in started] == [True, True] + [False] * MAX_WARM_GRADERS
    env.close()
    assert all(s.closed for s in started)


def test_prune_drops_instances_from_the_set_and_its_recipes(tmp_path):
    import json

    from m2rl.envs.swe.factory.cli import prune
    from m2rl.envs.swe.instances import load_instances, write_instances

    write_instances(tmp_path / "instances.jsonl", [instance("a__1", "f/a", "train"), instance("a__2", "f/a", "train"),
                                                   instance("b__1", "f/b", "test")])
    (tmp_path / "images.json").write_text(json.dumps({"img-a": {"instances": ["a__1", "a__2"]},
                                                      "img-b": {"instances": ["b__1"]}}))
    assert prune(tmp_path, {"a__2", "b__1"}) == 1
    assert [i.instance_id for i in load_instances(tmp_path)] == ["a__1"]
    assert json.loads((tmp_path / "images.json").read_text()) == {"img-a": {"instances": ["a__1"]}}
