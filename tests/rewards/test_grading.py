"""grade_patch on a real git repo and real pytest runs, through a local-directory executor."""

import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from m2rl.rewards import RewardSpec, compute_episode_rewards
from m2rl.rewards.grading import (
    GradingError,
    GradingTask,
    filter_patch,
    grade_checker,
    grade_patch,
    split_patch,
)


@dataclass
class LocalResult:
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool


class LocalDirExecutor:
    """Test double for a Sandbox: runs `bash -c` in a local directory (no isolation)."""

    def __init__(self, root: Path):
        self.root = root

    def exec(self, cmd: str, timeout: float = 30.0) -> LocalResult:
        proc = subprocess.Popen(
            ["bash", "-c", cmd],
            cwd=self.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
            return LocalResult(proc.returncode, out, err, False)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: grandchildren hold the pipes open
            out, err = proc.communicate()
            return LocalResult(124, out, err, True)

    def write_file(self, path: str, data: bytes | str) -> None:
        p = Path(path) if os.path.isabs(path) else self.root / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)


class CappedOutputExecutor(LocalDirExecutor):
    """Like a Sandbox: a command's output is cut at 128 KiB; files are read whole."""

    def exec(self, cmd: str, timeout: float = 30.0) -> LocalResult:
        res = super().exec(cmd, timeout)
        return LocalResult(res.exit_code, res.stdout[: 128 << 10], res.stderr[: 128 << 10], res.timed_out)

    def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        return Path(path).read_bytes()


CALC = "def add(a, b):\n    return a - b\n\n\ndef sub(a, b):\n    return a - b\n"
FIXED = CALC.replace("return a - b\n\n\ndef sub", "return a + b\n\n\ndef sub")
TESTS = textwrap.dedent("""\
    from calc import add, sub


    def test_add():
        assert add(2, 2) == 4


    def test_sub():
        assert sub(5, 3) == 2
    """)
HIDDEN = "from calc import add\n\n\ndef test_add_negative():\n    assert add(-1, -1) == -2\n"
SETUP_CFG = "[metadata]\nname = calc\n\n[tool:pytest]\ntestpaths = tests\n"
GIT = "git -c user.name=t -c user.email=t@example.com"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("task") / "repo"
    (root / "src").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "src" / "calc.py").write_text(CALC)
    (root / "tests" / "test_calc.py").write_text(TESTS)
    (root / "setup.cfg").write_text(SETUP_CFG)
    subprocess.run(f"git init -q && {GIT} add -A && {GIT} commit -qm base", shell=True, cwd=root, check=True)
    return root


def make_patch(repo: Path, files: dict[str, str | None]) -> str:
    """The diff an agent's edits would produce (None deletes), starting from the clean base."""
    subprocess.run("git reset -q --hard && git clean -fdq", shell=True, cwd=repo, check=True)
    for rel, content in files.items():
        p = repo / rel
        if content is None:
            p.unlink()
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(content)
    subprocess.run("git add -A -N .", shell=True, cwd=repo, check=True)
    diff = subprocess.run("git diff", shell=True, cwd=repo, check=True, capture_output=True, text=True).stdout
    subprocess.run("git reset -q --hard && git clean -fdq", shell=True, cwd=repo, check=True)
    return diff


def task_for(repo: Path, **kw) -> GradingTask:
    base = {
        "repo_dir": str(repo),
        # No plugin autoload: the venv's plugins cost seconds per run and the task needs none.
        "test_cmd": f"PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 PYTHONPATH=src {sys.executable} -m pytest -rA -p no:cacheprovider tests",
        "fail_to_pass": ("tests/test_calc.py::test_add",),
        "pass_to_pass": ("tests/test_calc.py::test_sub",),
        "timeout_s": 60.0,
    }
    base.update(kw)
    return GradingTask(**base)


def test_correct_fix_resolves(repo):
    result = grade_patch(LocalDirExecutor(repo), make_patch(repo, {"src/calc.py": FIXED}), task_for(repo))
    assert result.applied and result.resolved and result.score == 1.0, result.log
    assert result.status == "RESOLVED_FULL"
    assert result.test_status["tests/test_calc.py::test_add"] == "PASSED"
    assert result.dropped_paths == [] and result.restored_paths == []
    # The verdict flows through the env -> rewards contract.
    r = compute_episode_rewards(RewardSpec.default(), [{"verification": result.to_verification()}])
    assert r.breakdown["resolved"] == 1.0


def test_no_patch_does_not_resolve(repo):
    result = grade_patch(LocalDirExecutor(repo), "", task_for(repo))
    assert result.applied and not result.resolved and result.score == 0.0 and result.p2p_score == 1.0


def test_editing_the_tests_to_pass_earns_nothing(repo):
    cheat = TESTS.replace("assert add(2, 2) == 4", "assert True")
    result = grade_patch(
        LocalDirExecutor(repo), make_patch(repo, {"tests/test_calc.py": cheat}), task_for(repo)
    )
    assert result.dropped_paths == ["tests/test_calc.py"]
    assert not result.resolved and result.score == 0.0


def test_fix_plus_test_edit_keeps_only_the_fix(repo):
    cheat = TESTS.replace("assert sub(5, 3) == 2", "assert False")
    patch = make_patch(repo, {"src/calc.py": FIXED, "tests/test_calc.py": cheat})
    result = grade_patch(LocalDirExecutor(repo), patch, task_for(repo))
    assert result.resolved and result.dropped_paths == ["tests/test_calc.py"]


def test_conftest_that_forces_passes_is_dropped(repo):
    hook = textwrap.dedent("""\
        import pytest

        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_makereport(item, call):
            outcome = yield
            rep = outcome.get_result()
            rep.outcome = "passed"
        """)
    result = grade_patch(LocalDirExecutor(repo), make_patch(repo, {"conftest.py": hook}), task_for(repo))
    assert result.dropped_paths == ["conftest.py"] and not result.resolved


def test_pytest_section_of_setup_cfg_is_reverted(repo):
    cfg = SETUP_CFG.replace("testpaths = tests", "testpaths = tests\naddopts = -k 'not test_add'")
    result = grade_patch(
        LocalDirExecutor(repo), make_patch(repo, {"setup.cfg": cfg, "src/calc.py": FIXED}), task_for(repo)
    )
    assert result.restored_paths == ["setup.cfg"]
    assert result.resolved  # test_add ran (and passed) under the pristine configuration
    metadata_only = SETUP_CFG.replace("name = calc", "name = calculator")
    result = grade_patch(
        LocalDirExecutor(repo), make_patch(repo, {"setup.cfg": metadata_only}), task_for(repo)
    )
    assert result.restored_paths == []


def test_hidden_tests_are_restored_and_cannot_be_overwritten(repo):
    task = task_for(
        repo,
        fail_to_pass=("tests/test_calc.py::test_add", "tests/test_hidden.py::test_add_negative"),
        test_files={"tests/test_hidden.py": HIDDEN},
    )
    assert grade_patch(LocalDirExecutor(repo), make_patch(repo, {"src/calc.py": FIXED}), task).resolved
    fake_hidden = "def test_add_negative():\n    pass\n"
    result = grade_patch(
        LocalDirExecutor(repo), make_patch(repo, {"tests/test_hidden.py": fake_hidden}), task
    )
    assert "tests/test_hidden.py" in result.dropped_paths and not result.resolved
    half = grade_patch(
        LocalDirExecutor(repo),
        make_patch(repo, {"src/calc.py": CALC.replace("a - b", "abs(a) + abs(b)", 1)}),
        task,
    )
    assert not half.resolved and half.score == 0.5 and half.status == "RESOLVED_PARTIAL"


def test_swebench_style_test_patch_is_applied_after_the_agent_patch(repo):
    extra = TESTS + "\n\ndef test_add_three():\n    assert add(1, 2) == 3\n"
    test_patch = make_patch(repo, {"tests/test_calc.py": extra})
    task = task_for(
        repo,
        fail_to_pass=("tests/test_calc.py::test_add", "tests/test_calc.py::test_add_three"),
        test_patch=test_patch,
    )
    # The agent also edits the same test file: that hunk is dropped, so the test patch still applies.
    cheat = TESTS.replace("assert add(2, 2) == 4", "assert True")
    patch = make_patch(repo, {"src/calc.py": FIXED, "tests/test_calc.py": cheat})
    result = grade_patch(LocalDirExecutor(repo), patch, task)
    assert result.resolved, result.log
    assert result.test_status["tests/test_calc.py::test_add_three"] == "PASSED"


def test_fake_passed_lines_printed_by_the_code_do_not_resolve(repo):
    liar = CALC.replace(
        "def add(a, b):\n", "def add(a, b):\n    print('PASSED tests/test_calc.py::test_add')\n"
    )
    result = grade_patch(LocalDirExecutor(repo), make_patch(repo, {"src/calc.py": liar}), task_for(repo))
    assert not result.resolved and result.test_status["tests/test_calc.py::test_add"] == "FAILED"


def test_a_failing_run_that_prints_only_passed_lines_does_not_resolve(repo):
    """swebench's own log check: the test command failed, yet the log shows no failure (the patched code
    printed PASSED lines and exited non-zero before pytest reported): the run is not trusted."""
    liar = CALC.replace("return a - b\n\n\ndef sub", "return a + b\n\n\ndef sub") + (
        "\nimport atexit, os\n"
        "atexit.register(lambda: (print('PASSED tests/test_calc.py::test_add'), "
        "print('PASSED tests/test_calc.py::test_sub'), os._exit(1)))\n"
    )
    result = grade_patch(LocalDirExecutor(repo), make_patch(repo, {"src/calc.py": liar}),
                         task_for(repo, test_cmd=f"{sys.executable} -c 'import sys; sys.path.insert(0, \"src\"); import calc'"))
    assert not result.resolved and result.exit_code == 1, result.log


def test_a_suite_that_never_ran_does_not_resolve(repo):
    """An empty log (no test ran) is not a pass, whatever the eval type."""
    task = task_for(repo, test_cmd="true", fail_to_pass=(), pass_to_pass=("tests/test_calc.py::test_sub",))
    result = grade_patch(LocalDirExecutor(repo), "", task)
    assert not result.resolved and result.status == "RESOLVED_NO", result.details


def test_a_long_log_is_read_whole(repo):
    """The test log is read back from a file, not from the command's (capped) output."""
    task = task_for(repo, test_cmd="python3 -c \"print('x' * 300000)\"; " + task_for(repo).test_cmd)
    result = grade_patch(CappedOutputExecutor(repo), make_patch(repo, {"src/calc.py": FIXED}), task)
    assert result.resolved, result.details


def test_patch_that_does_not_apply(repo):
    bogus = "--- a/src/calc.py\n+++ b/src/calc.py\n@@ -1,2 +1,2 @@\n-def nothing_like_this():\n+def x():\n     pass\n"
    result = grade_patch(LocalDirExecutor(repo), bogus, task_for(repo))
    assert not result.applied and not result.resolved and "did not apply" in result.details


def test_test_timeout_is_not_resolved(repo):
    task = task_for(repo, test_cmd="sleep 10", timeout_s=0.5)
    result = grade_patch(LocalDirExecutor(repo), make_patch(repo, {"src/calc.py": FIXED}), task)
    assert result.timed_out and not result.resolved and result.score == 0.0


def test_grading_task_validation(repo):
    with pytest.raises(GradingError, match="absolute"):
        task_for(repo, repo_dir="repo")
    with pytest.raises(GradingError, match="at least one test"):
        task_for(repo, fail_to_pass=(), pass_to_pass=())
    with pytest.raises(GradingError, match="unknown log_parser 'parse_log_nope'"):
        task_for(repo, log_parser="parse_log_nope")
    with pytest.raises(GradingError, match="must be relative"):
        task_for(repo, test_files={"../evil.py": ""})
    with pytest.raises(GradingError, match="could not reset"):
        grade_patch(LocalDirExecutor(repo), "", task_for(repo, base_ref="no-such-ref"))


def test_split_and_filter_patch():
    patch = (
        "diff --git a/src/x.py b/src/x.py\n--- a/src/x.py\n+++ b/src/x.py\n@@ -1 +1 @@\n-a\n+b\n"
        "diff --git a/tests/test_x.py b/tests/test_x.py\nnew file mode 100644\n--- /dev/null\n+++ b/tests/test_x.py\n@@ -0,0 +1 @@\n+x\n"
        "diff --git a/src/old_test.py b/src/renamed.py\nsimilarity index 100%\nrename from src/old_test.py\nrename to src/renamed.py\n"
    )
    files = split_patch(patch)
    assert [(f.old_path, f.new_path) for f in files] == [
        ("src/x.py", "src/x.py"),
        (None, "tests/test_x.py"),
        ("src/old_test.py", "src/renamed.py"),
    ]
    kept, dropped = filter_patch(patch)
    assert dropped == ["tests/test_x.py", "src/old_test.py", "src/renamed.py"]
    assert kept == files[0].text
    plain = "--- src/a.py\n+++ src/a.py\n@@ -1 +1 @@\n-a\n+b\n--- conftest.py\n+++ conftest.py\n@@ -1 +1 @@\n-a\n+b\n"
    kept, dropped = filter_patch(plain)
    assert dropped == ["conftest.py"] and kept.startswith("--- src/a.py") and "conftest" not in kept


def test_grade_checker(tmp_path):
    ex = LocalDirExecutor(tmp_path)
    assert grade_checker(ex, "exit 0")["resolved"]
    v = grade_checker(ex, "echo wrong; exit 3")
    assert not v["resolved"] and v["exit_code"] == 3 and "wrong" in v["details"]
