"""Typed, read-only views of the per-step `info` dicts that envs/ produce (see docs/design.md,
"The env -> rewards contract").

Envs write plain dicts; rewards read them through these views so every component sees the same
defaults: an absent key means "nothing of that kind happened this step" (empty list / None).
A key that is present with the wrong type is an env bug and raises `EpisodeInfoError` naming it,
rather than being silently read as empty (which would hide reward bugs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class EpisodeInfoError(ValueError):
    """A step `info` dict or task dict does not follow the env -> rewards contract."""


def _as_list(d: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = d.get(key)
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise EpisodeInfoError(f"{where}: {key!r} must be a list, got {type(value).__name__}")
    return list(value)


def _as_mapping(item: Any, key: str, where: str) -> Mapping[str, Any]:
    if not isinstance(item, Mapping):
        raise EpisodeInfoError(f"{where}: every entry of {key!r} must be a dict, got {type(item).__name__}")
    return item


def _as_str(value: Any, key: str, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise EpisodeInfoError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class ToolCallInfo:
    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        """Canonical identity of a call, used to spot repeated calls."""
        return f"{self.name}:{sorted(self.arguments.items(), key=lambda kv: kv[0])!r}"

    def string_arguments(self) -> list[str]:
        """Every string argument (nested too): code, commands, file contents the agent sent."""
        out: list[str] = []
        stack: list[Any] = list(self.arguments.values())
        while stack:
            v = stack.pop()
            if isinstance(v, str):
                out.append(v)
            elif isinstance(v, Mapping):
                stack.extend(v.values())
            elif isinstance(v, (list, tuple)):
                stack.extend(v)
        return out


@dataclass(frozen=True)
class ToolResultInfo:
    name: str
    ok: bool
    output: str = ""
    timed_out: bool = False
    duration_s: float = 0.0


@dataclass(frozen=True)
class ErrorInfo:
    kind: str  # "format" | "unknown_tool" | "schema" | "timeout" | "tool" | "sandbox"
    message: str = ""


@dataclass(frozen=True)
class EditInfo:
    path: str
    syntax_ok: bool | None = None  # None: the env could not check this file's syntax


@dataclass(frozen=True)
class Verification:
    """The grader's verdict on the terminal step, computed outside anything the agent can write."""

    resolved: bool
    score: float
    details: str = ""
    exit_code: int | None = None  # optional: a checker program's exit status


@dataclass(frozen=True)
class StepInfo:
    tool_calls: tuple[ToolCallInfo, ...] = ()
    tool_results: tuple[ToolResultInfo, ...] = ()
    errors: tuple[ErrorInfo, ...] = ()
    edits: tuple[EditInfo, ...] = ()
    files_viewed: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()
    tests_passed: tuple[str, ...] | None = None  # None: the step did not run the task's tests
    tests_failed: tuple[str, ...] | None = None
    answer: str | None = None
    verification: Verification | None = None
    error: str | None = None  # episode truncated because the sandbox died

    @classmethod
    def from_dict(cls, info: Mapping[str, Any] | StepInfo, index: int = 0) -> StepInfo:
        if isinstance(info, StepInfo):
            return info
        where = f"step {index} info"
        if not isinstance(info, Mapping):
            raise EpisodeInfoError(f"{where} must be a dict, got {type(info).__name__}")

        calls = []
        for c in _as_list(info, "tool_calls", where):
            c = _as_mapping(c, "tool_calls", where)
            args = c.get("arguments") or {}
            if not isinstance(args, Mapping):
                # Unparseable arguments are a format problem the env reports in "errors"; keep the call.
                args = {"_raw": str(args)}
            calls.append(ToolCallInfo(name=_as_str(c.get("name"), "tool_calls.name", where), arguments=args))

        results = []
        for r in _as_list(info, "tool_results", where):
            r = _as_mapping(r, "tool_results", where)
            results.append(
                ToolResultInfo(
                    name=_as_str(r.get("name"), "tool_results.name", where),
                    ok=bool(r.get("ok", False)),
                    output=_as_str(r.get("output"), "tool_results.output", where),
                    timed_out=bool(r.get("timed_out", False)),
                    duration_s=float(r.get("duration_s") or 0.0),
                )
            )

        errors = []
        for e in _as_list(info, "errors", where):
            e = _as_mapping(e, "errors", where)
            errors.append(
                ErrorInfo(
                    kind=_as_str(e.get("kind"), "errors.kind", where),
                    message=_as_str(e.get("message"), "errors.message", where),
                )
            )

        edits = []
        for e in _as_list(info, "edits", where):
            if isinstance(e, str):  # tolerate a bare path
                edits.append(EditInfo(path=e))
                continue
            e = _as_mapping(e, "edits", where)
            ok = e.get("syntax_ok")
            edits.append(
                EditInfo(
                    path=_as_str(e.get("path"), "edits.path", where),
                    syntax_ok=None if ok is None else bool(ok),
                )
            )

        files_viewed = tuple(_as_str(p, "files_viewed", where) for p in _as_list(info, "files_viewed", where))
        commands = tuple(_as_str(c, "commands", where) for c in _as_list(info, "commands", where))

        passed: tuple[str, ...] | None = None
        failed: tuple[str, ...] | None = None
        tests = info.get("tests")
        if tests is not None:
            tests = _as_mapping(tests, "tests", where)
            passed = tuple(str(t) for t in _as_list(tests, "passed", where + " tests"))
            failed = tuple(str(t) for t in _as_list(tests, "failed", where + " tests"))

        answer = info.get("answer")
        if answer is not None and not isinstance(answer, str):
            answer = str(answer)  # a number submitted as an answer is still an answer

        verification = None
        v = info.get("verification")
        if v is not None:
            v = _as_mapping(v, "verification", where)
            try:
                score = float(v.get("score", 1.0 if v.get("resolved") else 0.0))
            except (TypeError, ValueError):
                raise EpisodeInfoError(
                    f"{where}: verification.score must be a number, got {v.get('score')!r}"
                )
            exit_code = v.get("exit_code")
            verification = Verification(
                resolved=bool(v.get("resolved", False)),
                score=score,
                details=_as_str(v.get("details"), "verification.details", where),
                exit_code=None if exit_code is None else int(exit_code),
            )

        error = info.get("error")
        return cls(
            tool_calls=tuple(calls),
            tool_results=tuple(results),
            errors=tuple(errors),
            edits=tuple(edits),
            files_viewed=files_viewed,
            commands=commands,
            tests_passed=passed,
            tests_failed=failed,
            answer=answer,
            verification=verification,
            error=None if error is None else str(error),
        )

    def error_count(self, *kinds: str) -> int:
        return sum(1 for e in self.errors if e.kind in kinds)

    def agent_text(self) -> list[str]:
        """Everything the agent itself wrote this step: commands and string tool arguments."""
        out = list(self.commands)
        for c in self.tool_calls:
            out.extend(c.string_arguments())
        return out


@dataclass(frozen=True)
class RewardTask:
    """What rewards need to know about the task (never shown to the agent).

    target_tests: tests the reference fix makes pass (SWE-bench FAIL_TO_PASS); empty = any test counts.
    reference_files: files the reference fix touches (localisation reward).
    hidden_paths: paths the agent must not read (hidden tests).
    test_paths: extra task-specific test paths the agent must not edit (beyond the generic patterns).
    expected_answer: for answer tasks; compared by `grade_answer`.
    """

    target_tests: tuple[str, ...] = ()
    reference_files: tuple[str, ...] = ()
    hidden_paths: tuple[str, ...] = ()
    test_paths: tuple[str, ...] = ()
    expected_answer: str | None = None
    numeric_tolerance: float | None = None  # None: use the RewardSpec's tolerance

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | RewardTask | None) -> RewardTask:
        if d is None:
            return cls()
        if isinstance(d, RewardTask):
            return d
        if not isinstance(d, Mapping):
            raise EpisodeInfoError(f"task must be a dict or RewardTask, got {type(d).__name__}")
        # Unrelated task keys (prompt, repo, ...) are allowed and ignored.
        where = "task"

        def strs(key: str) -> tuple[str, ...]:
            return tuple(_as_str(x, key, where) for x in _as_list(d, key, where))

        answer = d.get("expected_answer")
        tol = d.get("numeric_tolerance")
        return cls(
            target_tests=strs("target_tests"),
            reference_files=strs("reference_files"),
            hidden_paths=strs("hidden_paths"),
            test_paths=strs("test_paths"),
            expected_answer=None if answer is None else str(answer),
            numeric_tolerance=None if tol is None else float(tol),
        )


@dataclass(frozen=True)
class Episode:
    """One episode as rewards see it: the per-step infos in order and the task they were scored on."""

    steps: tuple[StepInfo, ...]
    task: RewardTask = field(default_factory=RewardTask)

    @classmethod
    def from_infos(
        cls, infos: Sequence[Mapping[str, Any] | StepInfo], task: Mapping[str, Any] | RewardTask | None = None
    ) -> Episode:
        return cls(steps=tuple(parse_steps(infos)), task=RewardTask.from_dict(task))

    @property
    def verification(self) -> Verification | None:
        """The grader's verdict (from the last step that carries one)."""
        return next((s.verification for s in reversed(self.steps) if s.verification is not None), None)

    @property
    def answer(self) -> str | None:
        """The last submitted answer."""
        return next((s.answer for s in reversed(self.steps) if s.answer is not None), None)

    @property
    def truncated_by_error(self) -> str | None:
        return next((s.error for s in reversed(self.steps) if s.error is not None), None)


def parse_steps(steps: Sequence[Mapping[str, Any] | StepInfo]) -> list[StepInfo]:
    if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Sequence):
        raise EpisodeInfoError(f"steps must be a list of info dicts, got {type(steps).__name__}")
    return [StepInfo.from_dict(s, i) for i, s in enumerate(steps)]
