"""Outcome grading that trusts nothing the agent wrote outside its patch.

`grade_patch` resets the task repo to a clean copy, applies only the agent's diff restricted to
non-test files, reverts pytest configuration changes in setup.cfg / pyproject.toml, restores the
task's pristine (and hidden) test files, runs the task's tests and grades the log exactly as the
SWE-bench harness does: the log is laid out like an eval script's (start/end markers, the test command's
exit code) and read by `swebench.harness.grading.get_eval_report`, so its checks hold here too (a run
whose command failed while the log shows no failure, or a suite that never ran, is not trusted).

Execution goes through any object with `exec(cmd, timeout=...) -> result(exit_code, stdout[, stderr,
timed_out])` and `write_file(path, data)`, plus `read_file(path, max_bytes)` to read the test log whole
(without it the command's output is used): an m2rl sandbox in production, a local-directory executor in
unit tests. All paths are absolute paths inside that executor (task.repo_dir).
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import shlex
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from m2rl.rewards.answer import grade_answer
from m2rl.rewards.paths import is_mixed_config, is_test_path, normalize_path, pytest_config_section
from swebench.harness.constants import (
    END_TEST_OUTPUT,
    FAIL_TO_PASS,
    PASS_TO_PASS,
    START_TEST_OUTPUT,
    TEST_EXIT_CODE,
    TESTS_TIMEOUT,
    EvalType,
    ResolvedStatus,
)
from swebench.harness.grading import (
    compute_fail_to_pass,
    compute_pass_to_pass,
    get_eval_report,
    get_eval_tests_report,
    get_logs_eval,
    get_resolution_status,
)
from swebench.harness.log_parsers import PARSER_REGISTRY
from swebench.types import TestSpec

logger = logging.getLogger(__name__)

__all__ = [
    "Executor",
    "GradeResult",
    "GradingError",
    "GradingTask",
    "filter_patch",
    "grade_answer",
    "grade_checker",
    "grade_patch",
    "split_patch",
]

# The patch application cascade of the SWE-bench harness (run_evaluation.GIT_APPLY_CMDS).
APPLY_COMMANDS = ("git apply --verbose", "git apply --verbose --reject", "patch --batch --fuzz=5 -p1 -i")
LOG_TAIL_CHARS = 20_000
MAX_TEST_LOG_BYTES = 64 << 20  # a test log is read back whole up to this size


class GradingError(ValueError):
    """The grading task itself is malformed or its environment is broken (not the agent's fault)."""


class Executor(Protocol):
    def exec(self, cmd: str, timeout: float = ...) -> Any: ...

    def write_file(self, path: str, data: bytes | str) -> None: ...


@dataclass(frozen=True)
class GradingTask:
    repo_dir: str  # absolute path of the task repo inside the executor (a git checkout)
    test_cmd: str  # run from repo_dir, e.g. "python -m pytest -rA tests/test_x.py"
    fail_to_pass: tuple[str, ...] = ()
    pass_to_pass: tuple[str, ...] = ()
    base_ref: str = "HEAD"  # the clean state to reset to
    test_files: Mapping[str, str] = field(default_factory=dict)  # repo-relative path -> pristine content
    test_patch: str = ""  # diff applied after the agent's patch (SWE-bench's test_patch)
    test_paths: tuple[str, ...] = ()  # task-specific protected paths beyond the generic test patterns
    log_parser: str = "parse_log_pytest"  # a key of swebench.harness.log_parsers.PARSER_REGISTRY
    eval_type: str = EvalType.PASS_AND_FAIL.value  # how swebench reads absent tests (an EvalType value)
    instance_id: str = ""
    repo: str = ""
    version: str = ""
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.repo_dir.startswith("/"):
            raise GradingError(f"GradingTask.repo_dir must be an absolute path, got {self.repo_dir!r}")
        if not self.test_cmd.strip():
            raise GradingError("GradingTask.test_cmd is empty")
        if not self.fail_to_pass and not self.pass_to_pass:
            raise GradingError("GradingTask needs at least one test in fail_to_pass or pass_to_pass")
        if self.log_parser not in PARSER_REGISTRY:
            raise GradingError(f"unknown log_parser {self.log_parser!r}; known: {sorted(PARSER_REGISTRY)}")
        if self.eval_type not in {e.value for e in EvalType}:
            raise GradingError(f"unknown eval_type {self.eval_type!r}; known: {[e.value for e in EvalType]}")
        for path in self.test_files:
            if path.startswith("/") or ".." in normalize_path(path).split("/"):
                raise GradingError(
                    f"test_files path {path!r} must be relative to the repo and stay inside it"
                )


@dataclass
class GradeResult:
    resolved: bool
    score: float  # fraction of FAIL_TO_PASS tests passing (SWE-bench's f2p metric)
    status: str  # ResolvedStatus value: RESOLVED_FULL / RESOLVED_PARTIAL / RESOLVED_NO
    applied: bool
    dropped_paths: list[str] = field(default_factory=list)  # test files removed from the agent's patch
    restored_paths: list[str] = field(default_factory=list)  # config files whose pytest section was reverted
    test_status: dict[str, str] = field(default_factory=dict)  # test id -> PASSED/FAILED/... from the parser
    report: dict[str, Any] = field(default_factory=dict)  # SWE-bench FAIL_TO_PASS/PASS_TO_PASS report
    p2p_score: float = 0.0
    exit_code: int | None = None
    timed_out: bool = False
    log: str = ""
    details: str = ""

    def to_verification(self) -> dict[str, Any]:
        """The `info["verification"]` dict of the env -> rewards contract."""
        return {
            "resolved": self.resolved,
            "score": self.score,
            "details": self.details,
            "exit_code": self.exit_code,
        }


# --------------------------------------------------------------------------- patch handling (pure)


@dataclass(frozen=True)
class FileDiff:
    old_path: str | None  # None for a created file
    new_path: str | None  # None for a deleted file
    text: str

    @property
    def paths(self) -> list[str]:
        return [p for p in (self.old_path, self.new_path) if p is not None]


_GIT_HEADER = re.compile(r"^diff --git (?:\"?a/)?(.+?)\"? (?:\"?b/)?(.+?)\"?$")


def _strip_prefix(path: str) -> str | None:
    path = path.strip().split("\t")[0].strip('"')
    if path == "/dev/null":
        return None
    if path.startswith(("a/", "b/")):
        path = path[2:]
    return normalize_path(path)


def split_patch(patch: str) -> list[FileDiff]:
    """Split a unified diff (git-style or plain ---/+++) into per-file diffs."""
    lines = patch.splitlines(keepends=True)
    starts = [i for i, ln in enumerate(lines) if ln.startswith("diff --git ")]
    if not starts:  # plain unified diff: a file starts at each '--- ' followed by '+++ '
        starts = [
            i for i, ln in enumerate(lines[:-1]) if ln.startswith("--- ") and lines[i + 1].startswith("+++ ")
        ]
    out = []
    for k, start in enumerate(starts):
        end = starts[k + 1] if k + 1 < len(starts) else len(lines)
        block = lines[start:end]
        old = new = None
        header = _GIT_HEADER.match(block[0].rstrip("\n"))
        if header:
            old, new = _strip_prefix(header.group(1)), _strip_prefix(header.group(2))
        for ln in block:
            if ln.startswith("--- "):
                old = _strip_prefix(ln[4:].rstrip("\n"))
            elif ln.startswith("+++ "):
                new = _strip_prefix(ln[4:].rstrip("\n"))
                break
        out.append(FileDiff(old_path=old, new_path=new, text="".join(block)))
    return out


def filter_patch(patch: str, protected: Sequence[str] = ()) -> tuple[str, list[str]]:
    """Drop the per-file diffs that touch test files or test configuration.
    Returns (patch without them, dropped paths)."""
    kept, dropped = [], []
    for fd in split_patch(patch):
        if any(is_test_path(p, protected) for p in fd.paths):
            dropped.extend(fd.paths)
        else:
            kept.append(fd.text)
    return "".join(kept), list(dict.fromkeys(dropped))


# --------------------------------------------------------------------------- execution


def _run(ex: Executor, cmd: str, timeout: float) -> tuple[int, str, bool]:
    res = ex.exec(cmd, timeout=timeout)
    parts = [getattr(res, "stdout", "") or "", getattr(res, "stderr", "") or ""]
    out = "".join(p.decode("utf-8", "replace") if isinstance(p, bytes) else str(p) for p in parts)
    return int(res.exit_code), out, bool(getattr(res, "timed_out", False))


def _reset(ex: Executor, task: GradingTask) -> None:
    # Not `git clean -x`: ignored build outputs (egg-info, compiled extensions) belong to the image.
    # Bytecode caches go though: a same-size source restored within the same second as the cached
    # .pyc would otherwise run the previous patch's code.
    cmd = (
        f"cd {shlex.quote(task.repo_dir)} && git reset --hard -q {shlex.quote(task.base_ref)} && git clean -fdq"
        " && find . -name __pycache__ -type d -prune -exec rm -rf {} +"
    )
    code, out, _ = _run(ex, cmd, 120.0)
    if code != 0:
        raise GradingError(
            f"could not reset {task.repo_dir} to a clean copy of {task.base_ref}: {out[-2000:]}"
        )


def _apply(
    ex: Executor, task: GradingTask, patch: str, name: str, commands: Sequence[str] = APPLY_COMMANDS
) -> tuple[bool, str]:
    """Try each apply command in turn; `git apply --reject` applies partially, so the tree is
    reset before the next attempt (only ever used before anything else was applied)."""
    patch_path = posixpath.join(task.repo_dir, f".m2rl_{name}_{uuid.uuid4().hex[:8]}.patch")
    if not patch.endswith("\n"):
        patch += "\n"
    ex.write_file(patch_path, patch.encode())
    log = ""
    try:
        previous = ""
        for apply in commands:
            if "--reject" in previous:
                _reset_keep(ex, task, patch_path)
            previous = apply
            code, out, _ = _run(
                ex, f"cd {shlex.quote(task.repo_dir)} && {apply} {shlex.quote(patch_path)}", 120.0
            )
            log += f"$ {apply}\n{out}\n"
            if code == 0:
                return True, log
        return False, log
    finally:
        _run(ex, f"rm -f {shlex.quote(patch_path)}", 60.0)


def _reset_keep(ex: Executor, task: GradingTask, keep: str) -> None:
    """Undo a partial application before the next method, keeping the patch file."""
    name = shlex.quote(posixpath.basename(keep))
    _run(
        ex,
        f"cd {shlex.quote(task.repo_dir)} && git reset --hard -q {shlex.quote(task.base_ref)} && "
        f"git clean -fdq -e {name}",
        120.0,
    )


def _read(ex: Executor, cmd: str) -> str | None:
    code, out, _ = _run(ex, cmd, 60.0)
    return out if code == 0 else None


def _revert_pytest_config(ex: Executor, task: GradingTask, paths: Sequence[str]) -> list[str]:
    """setup.cfg / pyproject.toml may carry legitimate changes, but not to their pytest section."""
    restored = []
    repo = shlex.quote(task.repo_dir)
    for path in paths:
        q = shlex.quote(path)
        before_text = _read(ex, f"cd {repo} && git show {shlex.quote(task.base_ref)}:{q}")
        after_text = _read(ex, f"cd {repo} && cat {q}")
        before = None if before_text is None else pytest_config_section(path, before_text)
        after = None if after_text is None else pytest_config_section(path, after_text)
        if before != after:
            if before_text is None:
                _run(ex, f"cd {repo} && rm -f {q}", 60.0)
            else:
                _run(ex, f"cd {repo} && git checkout -q {shlex.quote(task.base_ref)} -- {q}", 60.0)
            restored.append(path)
    return restored


def grade_patch(executor: Executor, patch: str, task: GradingTask) -> GradeResult:
    """Grade the agent's final diff against the task's tests on a clean copy of the repo."""
    if not isinstance(patch, str):
        raise GradingError(f"grade_patch: patch must be a string, got {type(patch).__name__}")
    protected = tuple(task.test_paths) + tuple(task.test_files)
    kept, dropped = filter_patch(patch, protected)
    _reset(executor, task)

    applied, apply_log = True, ""
    if kept.strip():
        applied, apply_log = _apply(executor, task, kept, "agent")
    if not applied:
        return GradeResult(
            resolved=False,
            score=0.0,
            status=ResolvedStatus.NO.value,
            applied=False,
            dropped_paths=dropped,
            log=apply_log[-LOG_TAIL_CHARS:],
            details="the agent's patch did not apply to a clean copy",
        )

    config_paths = [p for fd in split_patch(kept) for p in fd.paths if is_mixed_config(p)]
    restored = _revert_pytest_config(executor, task, list(dict.fromkeys(config_paths)))

    for rel, content in task.test_files.items():
        executor.write_file(posixpath.join(task.repo_dir, normalize_path(rel)), content.encode())
    if task.test_patch.strip():
        # git apply is atomic when it fails, so nothing of the agent's patch is at risk here.
        ok, log = _apply(executor, task, task.test_patch, "tests", (APPLY_COMMANDS[0], APPLY_COMMANDS[2]))
        if not ok:
            raise GradingError(
                f"the task's test_patch does not apply after the agent's patch:\n{log[-2000:]}"
            )

    code, log, timed_out = _run_tests(executor, task)
    spec = TestSpec(
        instance_id=task.instance_id or "m2rl-task",
        image="",
        eval_script_list=[],
        repo=task.repo,
        version=task.version,
        FAIL_TO_PASS=list(task.fail_to_pass),
        PASS_TO_PASS=list(task.pass_to_pass),
        log_parser=task.log_parser,
        eval_type=task.eval_type,
    )
    verdict, status_map = _official_verdict(spec, kept, eval_log(log, code, timed_out))
    report = get_eval_tests_report(
        status_map,
        {FAIL_TO_PASS: list(task.fail_to_pass), PASS_TO_PASS: list(task.pass_to_pass)},
        eval_type=EvalType(task.eval_type),
    )
    status = get_resolution_status(report) if status_map else ResolvedStatus.NO.value
    f2p, p2p = float(compute_fail_to_pass(report)), float(compute_pass_to_pass(report))
    if not status_map:  # swebench did not trust the log: nothing in it counts
        f2p = p2p = 0.0
    details = (
        f"{status}: {len(report[FAIL_TO_PASS]['success'])}/{len(task.fail_to_pass)} fail-to-pass, "
        f"{len(report[PASS_TO_PASS]['success'])}/{len(task.pass_to_pass)} pass-to-pass"
        + (", tests timed out" if timed_out else "")
        + ("" if status_map or timed_out else ", the log was not trusted (no test ran, or the command failed "
           "while the log shows no failure)")
        + (f"; dropped test edits {dropped}" if dropped else "")
        + (f"; reverted pytest config in {restored}" if restored else "")
    )
    return GradeResult(
        resolved=bool(verdict.get("resolved")) and not timed_out,
        score=0.0 if timed_out else f2p,
        status=status,
        applied=True,
        dropped_paths=dropped,
        restored_paths=restored,
        test_status=dict(status_map),
        report=report,
        p2p_score=p2p,
        exit_code=code,
        timed_out=timed_out,
        log=(apply_log + log)[-LOG_TAIL_CHARS:],
        details=details,
    )


def eval_log(log: str, exit_code: int, timed_out: bool) -> str:
    """The test output laid out like the log of a SWE-bench eval script: between the start and end markers,
    then the test command's exit code (what `record_test_exit_code` adds); a timeout is marked as the
    harness marks it."""
    head = f"{TESTS_TIMEOUT}\n" if timed_out else ""
    return f"{head}{START_TEST_OUTPUT}\n{log}\n{END_TEST_OUTPUT}\n{TEST_EXIT_CODE}: {exit_code}\n"


def _official_verdict(spec: TestSpec, patch: str, log: str) -> tuple[dict[str, Any], dict[str, str]]:
    """swebench's own report on the log (it reads logs from files), and the status map it trusted ({} when
    it rejected the log)."""
    fd, path = tempfile.mkstemp(prefix="m2rl-eval-", suffix=".log")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as f:
            f.write(log)
        prediction = {"instance_id": spec.instance_id, "model_name_or_path": "m2rl", "model_patch": patch}
        report = get_eval_report(spec, prediction, path, include_tests_status=True)[spec.instance_id]
        status_map, found = get_logs_eval(spec, path)
        return report, (status_map if found else {})
    finally:
        os.unlink(path)


def _run_tests(executor: Executor, task: GradingTask) -> tuple[int, str, bool]:
    """Run the test command with its output going to a log file, read back whole when the executor can
    read files (a sandbox caps what one command prints)."""
    reader = getattr(executor, "read_file", None)
    if reader is None:
        return _run(executor, f"cd {shlex.quote(task.repo_dir)} && {task.test_cmd}", task.timeout_s)
    log_path = f"/tmp/.m2rl_test_log_{uuid.uuid4().hex[:12]}"
    code, out, timed_out = _run(
        executor,
        f"cd {shlex.quote(task.repo_dir)} && ( {task.test_cmd} ) > {log_path} 2>&1",
        task.timeout_s,
    )
    try:
        log = reader(log_path, max_bytes=MAX_TEST_LOG_BYTES)
        log = log.decode("utf-8", "replace") if isinstance(log, bytes) else str(log)
    except Exception:  # noqa: BLE001  killed before writing, or the log outgrew the bound: what it printed
        logger.debug("no test log at %s; grading what the command printed", log_path, exc_info=True)
        log = out
    finally:
        _run(executor, f"rm -f {log_path}", 60.0)
    return code, log, timed_out


def grade_checker(executor: Executor, cmd: str, timeout: float = 60.0) -> dict[str, Any]:
    """Run a task's checker program; exit code 0 resolves. Returns an `info["verification"]` dict."""
    code, out, timed_out = _run(executor, cmd, timeout)
    ok = code == 0 and not timed_out
    return {
        "resolved": ok,
        "score": 1.0 if ok else 0.0,
        "exit_code": code,
        "details": ("checker timed out" if timed_out else f"checker exit code {code}") + f": {out[-500:]}",
    }
