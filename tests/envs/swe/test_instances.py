"""envs/swe/instances.py against the real swebench harness: official-style rows load from every on-disk
format, the records they write back build a swebench TestSpec whose script runs and grades, and each bad
input says where it is."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from m2rl.envs.swe.instances import (
    DEFAULT_TEST_CMD,
    InstanceError,
    SWEInstance,
    dataset_name,
    eval_script,
    load_instances,
    official_image_name,
    test_files,
    write_instances,
)
from swebench.harness.constants import END_TEST_OUTPUT, START_TEST_OUTPUT, TEST_EXIT_CODE, TEST_EXIT_CODE_VAR
from swebench.harness.grading import get_eval_report, get_logs_eval
from swebench.harness.utils import make_test_spec
from swebench.task.checks import expected_image

F2P_IDS = [
    "astropy/modeling/tests/test_separable.py::test_separable[compound_model6-result6]",
    "astropy/modeling/tests/test_separable.py::test_separable[compound_model9-result9]",
]
P2P_IDS = [
    "astropy/modeling/tests/test_separable.py::test_coord_matrix",
    "astropy/modeling/tests/test_separable.py::test_cdot",
    "astropy/modeling/tests/test_models.py::test_custom_separability_matrix",
]
# Shaped like a SWE-bench_Verified row: test lists as JSON strings, Verified's extra "difficulty" column.
ASTROPY_ROW = {
    "repo": "astropy/astropy",
    "instance_id": "astropy__astropy-12907",
    "base_commit": "d16bfe05a744909de4b27f5875fe0d4ed41ce607",
    "patch": (
        "diff --git a/astropy/modeling/separable.py b/astropy/modeling/separable.py\n"
        "--- a/astropy/modeling/separable.py\n+++ b/astropy/modeling/separable.py\n"
        "@@ -242,7 +242,7 @@ def _cstack(left, right):\n"
        "         cright = _coord_matrix(right, 'right', noutp)\n     else:\n"
        "         cright = np.zeros((noutp, right.shape[1]))\n"
        "-        cright[-right.shape[0]:, -right.shape[1]:] = 1\n"
        "+        cright[-right.shape[0]:, -right.shape[1]:] = right\n \n"
        "     return np.hstack([cleft, cright])\n"
    ),
    "test_patch": (
        "diff --git a/astropy/modeling/tests/test_separable.py b/astropy/modeling/tests/test_separable.py\n"
        "--- a/astropy/modeling/tests/test_separable.py\n+++ b/astropy/modeling/tests/test_separable.py\n"
        "@@ -28,6 +28,7 @@\n p1 = models.Polynomial1D(1, name='p1')\n \n \n"
        "+cm_4d_expected = (np.array([False, False, True, True]),)\n \n compound_models = {\n"
    ),
    "problem_statement": "Modeling's `separability_matrix` does not compute separability correctly for "
    "nested CompoundModels\n",
    "hints_text": "",
    "created_at": "2022-03-03T15:14:54Z",
    "version": "4.3",
    "FAIL_TO_PASS": json.dumps(F2P_IDS),
    "PASS_TO_PASS": json.dumps(P2P_IDS),
    "environment_setup_commit": "298ccb478e6bf092953bca67a3d29dc6c35f6752",
    "difficulty": "15 min - 1 hour",
}
# One of our factory's rows: lists as lists, its own image and split, a test patch creating a file.
FACTORY_ROW = {
    "repo": "m2rl-factory/tinycsv",
    "instance_id": "m2rl-factory__tinycsv-7",
    "base_commit": "0123456789abcdef0123456789abcdef01234567",
    "patch": "diff --git a/tinycsv/core.py b/tinycsv/core.py\n--- a/tinycsv/core.py\n+++ b/tinycsv/core.py\n"
    "@@ -1 +1 @@\n-SEP = ';'\n+SEP = ','\n",
    "test_patch": "diff --git a/tests/test_sep.py b/tests/test_sep.py\nnew file mode 100644\n--- /dev/null\n"
    "+++ b/tests/test_sep.py\n@@ -0,0 +1,2 @@\n"
    "+def test_sep():\n+    assert __import__('tinycsv.core').core.SEP == ','\n"
    "diff --git a/tests/data/rows.csv b/tests/data/rows.csv\nnew file mode 100644\n--- /dev/null\n"
    "+++ b/tests/data/rows.csv\n@@ -0,0 +1 @@\n+a,b\n",
    "problem_statement": "The default separator should be a comma.",
    "FAIL_TO_PASS": ["tests/test_sep.py::test_sep"],
    "PASS_TO_PASS": [],
    "image": "m2rl-factory/tinycsv:7",
    "split": "test",
}
DJANGO_ROW = {
    **ASTROPY_ROW,
    "repo": "django/django",
    "instance_id": "django__django-11099",
    "FAIL_TO_PASS": '["test_unicode_validator (auth_tests.test_validators.UsernameValidatorsTests)"]',
    "PASS_TO_PASS": "[]",
    "test_patch": "",
}
ROWS = [ASTROPY_ROW, FACTORY_ROW, DJANGO_ROW]


def instances() -> list[SWEInstance]:
    return [SWEInstance.from_record(row, f"ROWS[{i}]") for i, row in enumerate(ROWS)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- records


def test_official_row_becomes_a_typed_instance():
    inst = SWEInstance.from_record(ASTROPY_ROW, "row")
    assert inst.FAIL_TO_PASS == tuple(F2P_IDS) and inst.PASS_TO_PASS == tuple(P2P_IDS)
    assert inst.meta == {"difficulty": "15 min - 1 hour"}
    # swebench's own choice for the repo, when the row names none
    assert inst.log_parser == "parse_log_pytest_v2" and inst.eval_type == "pass_and_fail"
    assert (inst.split, inst.image, inst.test_cmd) == ("train", "", "")
    assert SWEInstance.from_record(DJANGO_ROW, "row").log_parser == "parse_log_django"
    bare = {k: v for k, v in ASTROPY_ROW.items() if k not in ("hints_text", "created_at", "version",
                                                               "environment_setup_commit")}
    assert SWEInstance.from_record({**bare, "version": 4.3, "hints_text": None}, "row").version == "4.3"


def test_record_round_trips_and_uses_the_official_string_lists():
    for inst in instances():
        record = inst.to_record()
        assert json.loads(record["FAIL_TO_PASS"]) == list(inst.FAIL_TO_PASS)
        assert json.loads(record["PASS_TO_PASS"]) == list(inst.PASS_TO_PASS)
        assert record["eval_script"] == eval_script(inst)
        again = SWEInstance.from_record(json.loads(json.dumps(record)), "rt")
        assert again == inst and "eval_script" not in again.meta  # our derived script is not frozen into meta
    assert list(instances()[0].to_record())[:12] == [
        "repo", "instance_id", "base_commit", "patch", "test_patch", "problem_statement", "hints_text",
        "created_at", "version", "FAIL_TO_PASS", "PASS_TO_PASS", "environment_setup_commit"]


def test_a_shipped_eval_script_is_kept_verbatim(tmp_path):
    official = ("#!/bin/bash\nset -uxo pipefail\ncd /testbed\n: '>>>>> Start Test Output'\n"
                "./tests/runtests.py --settings=test_sqlite auth_tests.test_validators\n"
                ": '>>>>> End Test Output'\n")
    inst = SWEInstance.from_record({**DJANGO_ROW, "eval_script": official}, "row")
    assert inst.script == official and inst.to_record()["eval_script"] == official
    assert load_instances(write_instances(tmp_path / "x.jsonl", [inst])) == [inst]


def test_direct_construction_is_validated_too():
    inst = SWEInstance.from_record(ASTROPY_ROW, "row")
    assert dataclasses.replace(inst, PASS_TO_PASS=["a.py::b"]).PASS_TO_PASS == ("a.py::b",)
    with pytest.raises(InstanceError, match=r"field 'FAIL_TO_PASS': must be a list of test ids, got str"):
        dataclasses.replace(inst, FAIL_TO_PASS="a.py::b")  # not five one-letter ids
    with pytest.raises(InstanceError, match=r"field 'meta': holds keys that are fields of SWEInstance"):
        dataclasses.replace(inst, meta={"repo": "x/y"})


# --------------------------------------------------------------------------- formats


def _save_json(path: Path, rows: list[dict]) -> Path:
    path = path / "rows.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def _save_jsonl(path: Path, rows: list[dict]) -> Path:
    return write_jsonl(path / "rows.jsonl", rows)


def _save_parquet(path: Path, rows: list[dict]) -> Path:
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    pq.write_table(pa.Table.from_pylist(rows), path / "rows.parquet")
    return path / "rows.parquet"


def _save_dir(path: Path, rows: list[dict]) -> Path:
    write_jsonl(path / "instances.jsonl", rows)
    return path


def _save_to_disk(path: Path, rows: list[dict]) -> Path:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(path / "ds"))
    return path / "ds"


@pytest.mark.parametrize("save", [_save_json, _save_jsonl, _save_parquet, _save_dir, _save_to_disk])
def test_every_format_loads_the_same_instances(tmp_path, save):
    expected = instances()
    # to_record rows have one type per column, as parquet and datasets need
    assert load_instances(save(tmp_path, [i.to_record() for i in expected])) == expected


def test_official_rows_load_from_json_and_write_instances_round_trips(tmp_path):
    path = tmp_path / "official.json"
    path.write_text(json.dumps(ROWS))
    loaded = load_instances(path)
    assert loaded == instances()
    assert load_instances(write_instances(tmp_path / "out" / "i.jsonl", loaded)) == loaded


def test_parquet_with_list_columns(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [{**r.to_record(), "FAIL_TO_PASS": list(r.FAIL_TO_PASS), "PASS_TO_PASS": list(r.PASS_TO_PASS)}
            for r in instances()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "lists.parquet")
    assert load_instances(tmp_path / "lists.parquet") == instances()


def test_dataset_dict_split_names_become_the_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{k: v for k, v in i.to_record().items() if k != "split"} for i in instances()]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                          "test": datasets.Dataset.from_list(rows[1:])}).save_to_disk(str(tmp_path / "dd"))
    loaded = {i.instance_id: i.split for i in load_instances(tmp_path / "dd")}
    assert loaded == {"astropy__astropy-12907": "train", "m2rl-factory__tinycsv-7": "test",
                      "django__django-11099": "test"}


# --------------------------------------------------------------------------- filters


@pytest.fixture
def source(tmp_path: Path) -> Path:
    extra = [{**ASTROPY_ROW, "instance_id": f"astropy__astropy-{n}"} for n in range(100, 106)]
    return write_jsonl(tmp_path / "rows.jsonl", [*ROWS, *extra])


def ids_of(found: list[SWEInstance]) -> list[str]:
    return [i.instance_id for i in found]


def test_filters(source):
    everything = ids_of(load_instances(source))
    assert len(everything) == 9
    assert ids_of(load_instances(source, repos=["django/django", "m2rl-factory/tinycsv"])) == [
        "m2rl-factory__tinycsv-7", "django__django-11099"]
    assert ids_of(load_instances(source, ids=["django__django-11099", "astropy__astropy-12907"])) == [
        "astropy__astropy-12907", "django__django-11099"]  # file order, not the order asked
    assert ids_of(load_instances(source, split="test")) == ["m2rl-factory__tinycsv-7"]
    astropy_first3 = everything[:1] + everything[3:5]
    assert ids_of(load_instances(source, repos=["astropy/astropy"], count=3)) == astropy_first3
    shuffled = everything[:]
    random.Random(7).shuffle(shuffled)
    assert shuffled[:4] != everything[:4]  # else the next line would not show the shuffle happened
    assert ids_of(load_instances(source, shuffle_seed=7, count=4)) == shuffled[:4]
    assert load_instances(source, shuffle_seed=7) == load_instances(source, shuffle_seed=7)


def test_filters_refuse_to_quietly_shrink_the_run(source):
    with pytest.raises(InstanceError, match=r"unknown instance ids.*'nope__nope-1'"):
        load_instances(source, ids=["astropy__astropy-12907", "nope__nope-1"])
    with pytest.raises(InstanceError, match=r"no instances of repos \['astropy/astropi'\]"):
        load_instances(source, repos=["astropy/astropi"])
    with pytest.raises(InstanceError, match="no instances in split 'dev'"):
        load_instances(source, split="dev")
    with pytest.raises(InstanceError, match="count must be at least 1"):
        load_instances(source, count=0)


# --------------------------------------------------------------------------- errors name where


def error_of(source: Path) -> str:
    with pytest.raises(InstanceError) as info:
        load_instances(source)
    return str(info.value)


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ASTROPY_ROW) + "\n\n{not json\n")
    assert error_of(path).startswith(f"{path}:3: invalid JSON")
    path.write_text(json.dumps(ASTROPY_ROW) + "\n[1, 2]\n")
    assert error_of(path) == f"{path}:2: a record must be a JSON object, got list"


@pytest.mark.parametrize("change, field, reason", [
    ({"base_commit": None}, "base_commit", "missing required key"),
    ({"FAIL_TO_PASS": "[\"a\", "}, "FAIL_TO_PASS", "not a JSON list"),
    ({"FAIL_TO_PASS": '{"a": 1}'}, "FAIL_TO_PASS", "must be a list of test ids, got dict"),
    ({"PASS_TO_PASS": ["ok", 3]}, "PASS_TO_PASS", "test ids must be non-empty strings"),
    ({"FAIL_TO_PASS": "[]"}, "FAIL_TO_PASS", "is empty"),
    ({"problem_statement": ["x"]}, "problem_statement", "must be a string, got list"),
    ({"repo": "astropy"}, "repo", "must be 'owner/name'"),
    ({"log_parser": "parse_log_nose"}, "log_parser", "not a swebench parser"),
    ({"eval_type": "pass_only"}, "eval_type", "is not one of"),
    ({"split": ""}, "split", "is empty"),
])
def test_bad_field_names_file_line_instance_and_field(tmp_path, change, field, reason):
    path = write_jsonl(tmp_path / "rows.jsonl", [FACTORY_ROW, {**ASTROPY_ROW, **change}])
    message = error_of(path)
    assert message.startswith(f"{path}:2, instance 'astropy__astropy-12907', field '{field}': ")
    assert reason in message


def test_file_level_errors(tmp_path):
    dup = write_jsonl(tmp_path / "dup.jsonl", [ASTROPY_ROW, FACTORY_ROW, ASTROPY_ROW])
    assert error_of(dup) == (f"{dup}:3, instance 'astropy__astropy-12907': duplicate instance_id, "
                             f"first seen at {dup}:1")
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"instances": ROWS}))
    assert error_of(obj) == f"{obj}: must hold a JSON list of records, got dict"
    broken = tmp_path / "broken.json"
    broken.write_text("[\n" + json.dumps(ASTROPY_ROW) + ",\n}")
    assert error_of(broken).startswith(f"{broken}:3: invalid JSON")
    csv = tmp_path / "rows.csv"
    csv.write_text("a,b\n")
    with pytest.raises(InstanceError, match=r"unsupported file type '\.csv'"):
        load_instances(csv)
    with pytest.raises(InstanceError, match="neither instances.jsonl nor a datasets.save_to_disk"):
        load_instances(tmp_path)
    with pytest.raises(InstanceError, match="no such file or directory, and not a dataset name"):
        load_instances(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- named benchmarks


def test_dataset_names_and_aliases():
    for name in ("lite", "SWE-bench_Lite", "swe-bench-lite", "princeton-nlp/SWE-bench_Lite",
                 "SWE-bench/SWE-bench_Lite"):
        assert dataset_name(name) == "SWE-bench_Lite"
    for name in ("verified", "SWE-bench_Verified", "princeton-nlp/SWE-bench_Verified"):
        assert dataset_name(name) == "SWE-bench_Verified"
    assert dataset_name("SWE-bench") == dataset_name("princeton-nlp/SWE-bench") == "SWE-bench"
    assert dataset_name("someone/SWE-bench_Lite") is None and dataset_name("rows.jsonl") is None


@pytest.fixture
def no_copies(tmp_path, monkeypatch) -> Path:
    empty = tmp_path / "empty"
    empty.mkdir()
    for var in ("HOME", "HF_HOME", "M2RL_SWE_DATA"):
        monkeypatch.setenv(var, str(empty))
    for var in ("HF_DATASETS_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return empty


def test_absent_named_dataset_says_where_it_looked_and_how_to_place_one(no_copies):
    with pytest.raises(InstanceError) as info:
        load_instances("verified")
    message = str(info.value)
    assert message.startswith("SWE-bench_Verified: no local copy of SWE-bench_Verified")
    assert str(no_copies / "SWE-bench_Verified") in message  # $M2RL_SWE_DATA
    assert str(no_copies / ".cache" / "m2rl" / "swe-datasets" / "SWE-bench_Verified.jsonl") in message
    assert f"Hugging Face datasets cache {no_copies / 'datasets'}" in message
    assert "save_to_disk" in message and "instances.jsonl" in message


def test_named_dataset_from_m2rl_swe_data_is_the_test_split(no_copies):
    write_jsonl((no_copies / "SWE-bench_Lite").mkdir() or no_copies / "SWE-bench_Lite" / "instances.jsonl",
                [ASTROPY_ROW, DJANGO_ROW])
    found = load_instances("princeton-nlp/SWE-bench_Lite", split="test")
    assert ids_of(found) == ["astropy__astropy-12907", "django__django-11099"]


def test_named_dataset_from_the_hugging_face_cache_offline(no_copies):
    """A copy in the datasets cache, laid out as load_dataset leaves a Hub dataset there (built here from a
    local parquet file and renamed into place), is found with the Hub switched off."""
    datasets, pa, pq = (pytest.importorskip(m) for m in ("datasets", "pyarrow", "pyarrow.parquet"))
    rows = [{k: v for k, v in i.to_record().items() if k != "split"} for i in instances()]
    pq.write_table(pa.Table.from_pylist(rows), no_copies / "lite.parquet")
    cache = no_copies / "datasets"  # HF_HOME/datasets
    datasets.load_dataset("parquet", data_files={"test": str(no_copies / "lite.parquet")},
                          cache_dir=str(cache))
    [built] = (cache / "parquet").glob("*/*/*/parquet-test.arrow")
    built.rename(built.with_name("swe-bench_lite-test.arrow"))
    built.parents[2].rename(built.parents[3] / "default")  # a Hub dataset's config is "default"
    (cache / "parquet").rename(cache / "SWE-bench___swe-bench_lite")
    found = load_instances("lite")
    assert found == [dataclasses.replace(i, split="test") for i in instances()]


# --------------------------------------------------------------------------- test command, script, image


def test_test_files_and_command():
    astropy, factory, django = instances()
    assert test_files(astropy) == ("astropy/modeling/tests/test_models.py",
                                   "astropy/modeling/tests/test_separable.py")
    assert test_files(factory) == ("tests/test_sep.py",)  # the csv the test patch adds is not a test module
    assert test_files(django) == ()
    assert factory.command == f"{DEFAULT_TEST_CMD} tests/test_sep.py"
    assert django.command == DEFAULT_TEST_CMD
    touched = "".join(f"diff --git a/{p} b/{p}\n--- a/{p}\n+++ b/{p}\n@@ -1 +1 @@\n-a\n+b\n"
                      for p in ("docs/conf.py", "tests/conftest.py", "tests/helpers.py", "tests/test_b.py"))
    touching = SWEInstance.from_record({**FACTORY_ROW, "test_patch": touched}, "row")
    assert test_files(touching) == ("tests/helpers.py", "tests/test_b.py", "tests/test_sep.py")
    custom = SWEInstance.from_record({**FACTORY_ROW, "test_cmd": "make test"}, "row")
    assert custom.command == "make test" and "\nmake test\n" in custom.script


def test_eval_script_shape():
    astropy, factory, django = instances()
    lines = eval_script(astropy, repo_dir="/work/repo").splitlines()
    assert lines[:2] == ["#!/bin/bash", "set -uxo pipefail"]
    checkout = f"git checkout {astropy.base_commit} -- astropy/modeling/tests/test_separable.py"
    start, end = lines.index(f": '{START_TEST_OUTPUT}'"), lines.index(f": '{END_TEST_OUTPUT}'")
    apply = "git apply --verbose - <<'EOF_114329324912'"
    assert lines.index("cd /work/repo") < lines.index(checkout) < lines.index(apply) < start
    assert lines[start + 1:end] == [astropy.command] and lines[end + 1:] == [checkout]
    assert astropy.test_patch in eval_script(astropy)
    factory_script = eval_script(factory)
    assert factory_script.count("rm -f -- tests/data/rows.csv tests/test_sep.py") == 2
    assert "git checkout" not in factory_script
    assert "git apply" not in eval_script(django) and "git checkout" not in eval_script(django)
    tricky = SWEInstance.from_record(
        {**ASTROPY_ROW, "test_patch": ASTROPY_ROW["test_patch"] + "+EOF_114329324912\n"}, "row")
    assert "<<'EOF_114329324912_'" in eval_script(tricky)


def test_make_test_spec_accepts_the_record():
    for inst in instances():
        spec = make_test_spec(inst.to_record())
        assert (spec.instance_id, spec.repo, spec.image) == (inst.instance_id, inst.repo, inst.image)
        assert (spec.log_parser, spec.eval_type) == (inst.log_parser, inst.eval_type)
        assert spec.FAIL_TO_PASS == list(inst.FAIL_TO_PASS) and spec.PASS_TO_PASS == list(inst.PASS_TO_PASS)
        script = spec.eval_script
        assert START_TEST_OUTPUT in script and END_TEST_OUTPUT in script and inst.command in script
        # swebench found the end marker and records the test command's own exit status right before it
        lines = spec.eval_script_list
        end = next(i for i, line in enumerate(lines) if END_TEST_OUTPUT in line)
        assert lines[end - 2:end] == [inst.command, f"{TEST_EXIT_CODE_VAR}=$?"]
        assert lines[end + 1] == f'echo "{TEST_EXIT_CODE}: ${TEST_EXIT_CODE_VAR}"'


def fake_log(path: Path, results: list[str], exit_code: int) -> Path:
    """What running the script prints under `set -x`: the markers, pytest -rA's summary, the exit code."""
    path.write_text("\n".join([
        "+ git apply --verbose -", "Applied patch astropy/modeling/tests/test_separable.py cleanly.",
        f"+ : '{START_TEST_OUTPUT}'", "+ python -m pytest -rA -p no:cacheprovider ...",
        "============================= test session starts ==============================",
        *results, f"+ {TEST_EXIT_CODE_VAR}={exit_code}", f"+ : '{END_TEST_OUTPUT}'",
        f"{TEST_EXIT_CODE}: {exit_code}",
        "+ git checkout d16bfe05a744909de4b27f5875fe0d4ed41ce607 -- astropy/modeling/tests/test_separable.py",
    ]) + "\n")
    return path


def test_swebench_grades_a_log_of_the_script(tmp_path):
    inst = instances()[0]
    spec = make_test_spec(inst.to_record())
    passing = [f"PASSED {t}" for t in P2P_IDS]
    failing = [f"FAILED {t} - AssertionError: x" for t in F2P_IDS]
    failing_log = fake_log(tmp_path / "fail.log", passing + failing, 1)
    status, found = get_logs_eval(spec, str(failing_log))
    assert found and status == {**{t: "PASSED" for t in P2P_IDS}, **{t: "FAILED" for t in F2P_IDS}}
    fixed_log = fake_log(tmp_path / "fixed.log", passing + [f"PASSED {t}" for t in F2P_IDS], 0)
    prediction = {"instance_id": inst.instance_id, "model_patch": inst.patch, "model_name_or_path": "gold"}
    assert not get_eval_report(spec, prediction, str(failing_log), False)[inst.instance_id]["resolved"]
    assert get_eval_report(spec, prediction, str(fixed_log), False)[inst.instance_id]["resolved"]


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    done = subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True)
    return done.stdout


def test_the_script_runs_and_swebench_grades_its_output(tmp_path):
    """The derived script executed for real on a two-file repo: before the fix the new test fails, after it
    the instance resolves, and the test files are back to base_commit afterwards."""
    repo = tmp_path / "repo"
    (repo / "tinycsv").mkdir(parents=True)
    (repo / "tinycsv" / "__init__.py").write_text("")
    (repo / "tinycsv" / "core.py").write_text("SEP = ';'\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-qm", "base")
    base = _git(repo, "rev-parse", "HEAD").strip()
    inst = SWEInstance.from_record({**FACTORY_ROW, "base_commit": base}, "row")
    spec = make_test_spec({**inst.to_record(), "eval_script": eval_script(inst, repo_dir=str(repo))})
    script = tmp_path / "eval.sh"
    script.write_text(spec.eval_script)
    # `python` is this venv's (it has pytest); no bytecode, so the tree holds only what the script leaves
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONDONTWRITEBYTECODE": "1"}
    prediction = {"instance_id": inst.instance_id, "model_patch": inst.patch, "model_name_or_path": "gold"}

    def run(name: str) -> bool:
        # one stream, as a container exec gives it: the set -x markers land around the pytest output
        done = subprocess.run(["bash", str(script)], check=False, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=120)
        log = tmp_path / name
        log.write_text(done.stdout)
        return get_eval_report(spec, prediction, str(log), False)[inst.instance_id]["resolved"]

    assert not run("before.log")
    (repo / "tinycsv" / "core.py").write_text("SEP = ','\n")  # the gold patch
    assert run("after.log")
    # the files the test patch created are gone again, and nothing else was left behind in the tree
    assert not (repo / "tests" / "test_sep.py").exists()
    assert not (repo / "tests" / "data" / "rows.csv").exists()
    assert _git(repo, "status", "--porcelain", "--untracked-files=all") == " M tinycsv/core.py\n"


def test_official_image_name_follows_swebench():
    assert official_image_name("astropy__astropy-12907") == "sweb.eval.x86_64.astropy_1776_astropy-12907"
    assert official_image_name("Django__Django-11099") == "sweb.eval.x86_64.django_1776_django-11099"
    for iid in ("astropy__astropy-12907", "sympy__sympy-20590", "m2rl-factory__TinyCSV-7"):
        assert f"swebench/{official_image_name(iid)}:latest" == expected_image(iid)
