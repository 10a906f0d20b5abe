"""The env -> everyone contract: `StepInfo`, what one `env.step()` did, and `Episode`, an episode's steps.

Gymnasium requires `info` to be a dict, so `StepInfo` is a frozen dataclass with exactly one conversion
on each side of `step()`: the env returns `StepInfo.to_dict()` (ToolEnv checks what it built with
`StepInfo.from_dict` first), and whoever reads a step's info (the agent loop, rewards) calls
`StepInfo.from_dict` once and then reads attributes, never string keys. The trajectory stores the dict
form (JSON); the rollout reads it back into an `Episode` for the learner.

An absent key means "nothing of that kind happened this step" (empty list / None). A key that is
present with the wrong type is an env bug and raises `EpisodeInfoError` naming it, rather than being
read as empty (which would hide reward bugs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

# `errors[*].kind`: what went wrong in a step.
ERROR_KINDS = ("format", "unknown_tool", "schema", "timeout", "tool", "sandbox")


class EpisodeInfoError(ValueError):
    """A step `info` dict or task dict does not follow the env -> rewards contract."""


# --------------------------------------------------------------------------- checked reads of one key


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


def _as_number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise EpisodeInfoError(f"{where}: {key!r} must be a number, got {value!r}")
    return float(value)


def _entries(
    d: Mapping[str, Any], key: str, where: str, read: Callable[[Mapping[str, Any]], T]
) -> tuple[T, ...]:
    """Each dict entry of the list `d[key]`, read by `read`."""
    return tuple(read(_as_mapping(item, key, where)) for item in _as_list(d, key, where))


def _strings(d: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    return tuple(_as_str(s, key, where) for s in _as_list(d, key, where))


def _numbers(d: Mapping[str, Any], key: str, where: str) -> dict[str, float]:
    """A {name: number} mapping (absent: empty)."""
    value = d.get(key)
    if value is None:
        return {}
    return {str(k): _as_number(v, f"{key}.{k}", where) for k, v in _as_mapping(value, key, where).items()}


def _json_copy(value: Any) -> Any:
    """A copy made of plain dicts and lists, so the dict form shares nothing with the frozen view."""
    if isinstance(value, Mapping):
        return {k: _json_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_copy(v) for v in value]
    return value


# --------------------------------------------------------------------------- the parts of a step


@dataclass(frozen=True)
class ToolCallInfo:
    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> ToolCallInfo:
        args = d.get("arguments") or {}
        if not isinstance(args, Mapping):
            # Unparseable arguments are a format problem the env reports in "errors"; keep the call.
            args = {"_raw": str(args)}
        return cls(name=_as_str(d.get("name"), "tool_calls.name", where), arguments=args)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": _json_copy(self.arguments)}

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

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> ToolResultInfo:
        return cls(
            name=_as_str(d.get("name"), "tool_results.name", where),
            ok=bool(d.get("ok", False)),
            output=_as_str(d.get("output"), "tool_results.output", where),
            timed_out=bool(d.get("timed_out", False)),
            duration_s=float(d.get("duration_s") or 0.0),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "output": self.output, "timed_out": self.timed_out,
                "duration_s": self.duration_s}


@dataclass(frozen=True)
class ErrorInfo:
    kind: str  # one of ERROR_KINDS
    message: str = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> ErrorInfo:
        return cls(kind=_as_str(d.get("kind"), "errors.kind", where),
                   message=_as_str(d.get("message"), "errors.message", where))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message}


@dataclass(frozen=True)
class EditInfo:
    path: str
    syntax_ok: bool | None = None  # None: the env could not check this file's syntax

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> EditInfo:
        ok = d.get("syntax_ok")
        path = _as_str(d.get("path"), "edits.path", where)
        return cls(path=path, syntax_ok=None if ok is None else bool(ok))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "syntax_ok": self.syntax_ok}


@dataclass(frozen=True)
class Verification:
    """The grader's verdict on the terminal step, computed outside anything the agent can write.

    Task sets' graders return it (envs/tasks/base.py); the env puts `to_dict()` in the terminal info.
    """

    resolved: bool
    score: float  # in [0, 1]: the fraction of the task done (1.0 when resolved); a benchmark's own reward where
    # its page or checker computes one (MiniWoB: [-1, 1])
    details: str = ""
    exit_code: int | None = None  # optional: a checker program's exit status
    # optional: the change that was graded (a SWE episode's git diff), so an eval can hand it on as a prediction
    patch: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "verification") -> Verification:
        try:
            score = float(d.get("score", 1.0 if d.get("resolved") else 0.0))
        except (TypeError, ValueError):
            raise EpisodeInfoError(
                f"{where}: verification.score must be a number, got {d.get('score')!r}"
            ) from None
        exit_code = d.get("exit_code")
        patch = d.get("patch")
        return cls(
            resolved=bool(d.get("resolved", False)),
            score=score,
            details=_as_str(d.get("details"), "verification.details", where),
            exit_code=None if exit_code is None else int(exit_code),
            patch=None if patch is None else _as_str(patch, "verification.patch", where),
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"resolved": self.resolved, "score": float(self.score), "details": self.details}
        if self.exit_code is not None:
            out["exit_code"] = self.exit_code
        if self.patch is not None:
            out["patch"] = self.patch
        return out


# --------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class StepInfo:
    """What one `ToolEnv.step()` did: the env -> agent/rewards/learner contract (docs/design.md).

    Its dict form (`to_dict()`, Gymnasium's `info`) has these keys; lists and mappings are always
    present (empty when nothing happened), the optional keys only when they apply:

    - ``tool_calls`` (list[dict]): ``{"name": str, "arguments": dict}`` per valid call parsed from the
      action (a known tool, schema-valid arguments), in the order written; an invalid call is only an
      ``unknown_tool``/``schema`` error.
    - ``tool_results`` (list[dict]): ``{"name": str, "ok": bool, "output": str, "timed_out": bool,
      "duration_s": float}`` per call, in the same order.
    - ``errors`` (list[dict]): ``{"kind": str, "message": str}``, kind one of `ERROR_KINDS`.
    - ``edits`` (list[dict]): ``{"path": str, "syntax_ok": bool | None}`` files the step created or modified.
    - ``files_viewed`` (list[str]): paths read or listed.
    - ``commands`` (list[str]): shell commands / code cells executed.
    - ``detectors`` (dict[str, list[str]]): the anti-hacking detectors' evidence on this step, per detector
      (empty when clean).
    - ``timings`` (dict[str, float]): seconds spent, e.g. ``sandbox_s``, ``grade_s``.
    - ``reward_breakdown`` (dict[str, float]): ``{component: weighted value}`` of this step under the env's
      RewardSpec; the step's reward is their sum.
    - ``responses`` (list[str]): exactly the tool responses the observation renders, in order (the agent
      rebuilds its tool messages from them).
    - ``tests`` (dict, optional): ``{"passed": [ids], "failed": [ids]}`` when the step ran the task's tests.
    - ``answer`` (str, optional): the submitted answer, on the step that submitted it.
    - ``verification`` (dict, optional): on the terminal step, the grader's `Verification.to_dict()`.
    - ``error`` (str, optional): set when the episode was truncated because the sandbox died.
    """

    tool_calls: tuple[ToolCallInfo, ...] = ()
    tool_results: tuple[ToolResultInfo, ...] = ()
    errors: tuple[ErrorInfo, ...] = ()
    edits: tuple[EditInfo, ...] = ()
    files_viewed: tuple[str, ...] = ()
    commands: tuple[str, ...] = ()
    detectors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    reward_breakdown: Mapping[str, float] = field(default_factory=dict)
    responses: tuple[str, ...] = ()
    tests_passed: tuple[str, ...] | None = None  # None: the step did not run the task's tests
    tests_failed: tuple[str, ...] | None = None
    answer: str | None = None
    verification: Verification | None = None
    error: str | None = None  # episode truncated because the sandbox died

    @classmethod
    def from_dict(cls, info: Mapping[str, Any] | StepInfo, index: int = 0) -> StepInfo:
        """Read (and check) the dict form; `index` names the step in error messages."""
        if isinstance(info, StepInfo):
            return info
        where = f"step {index} info"
        if not isinstance(info, Mapping):
            raise EpisodeInfoError(f"{where} must be a dict, got {type(info).__name__}")
        passed, failed = _read_tests(info, where)
        return cls(
            tool_calls=_entries(info, "tool_calls", where, lambda d: ToolCallInfo.from_dict(d, where)),
            tool_results=_entries(info, "tool_results", where, lambda d: ToolResultInfo.from_dict(d, where)),
            errors=_entries(info, "errors", where, lambda d: ErrorInfo.from_dict(d, where)),
            edits=_read_edits(info, where),
            files_viewed=_strings(info, "files_viewed", where),
            commands=_strings(info, "commands", where),
            detectors=_read_detectors(info, where),
            timings=_numbers(info, "timings", where),
            reward_breakdown=_numbers(info, "reward_breakdown", where),
            responses=_strings(info, "responses", where),
            tests_passed=passed,
            tests_failed=failed,
            answer=_read_answer(info),
            verification=_read_verification(info, where),
            error=None if info.get("error") is None else str(info["error"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """The Gymnasium `info` dict (plain JSON types); `from_dict(to_dict())` gives this view back."""
        out: dict[str, Any] = {
            "tool_calls": [c.to_dict() for c in self.tool_calls],
            "tool_results": [r.to_dict() for r in self.tool_results],
            "errors": [e.to_dict() for e in self.errors],
            "edits": [e.to_dict() for e in self.edits],
            "files_viewed": list(self.files_viewed),
            "commands": list(self.commands),
            "detectors": {name: list(evidence) for name, evidence in self.detectors.items()},
            "timings": dict(self.timings),
            "reward_breakdown": dict(self.reward_breakdown),
            "responses": list(self.responses),
        }
        if self.tests_passed is not None or self.tests_failed is not None:
            out["tests"] = {"passed": list(self.tests_passed or ()), "failed": list(self.tests_failed or ())}
        if self.answer is not None:
            out["answer"] = self.answer
        if self.verification is not None:
            out["verification"] = self.verification.to_dict()
        if self.error is not None:
            out["error"] = self.error
        return out

    @property
    def reward(self) -> float:
        """The step's reward: the sum of its weighted components."""
        return float(sum(self.reward_breakdown.values()))

    def error_count(self, *kinds: str) -> int:
        return sum(1 for e in self.errors if e.kind in kinds)

    def agent_text(self) -> list[str]:
        """Everything the agent itself wrote this step: commands and string tool arguments."""
        out = list(self.commands)
        for c in self.tool_calls:
            out.extend(c.string_arguments())
        return out


def _read_edits(info: Mapping[str, Any], where: str) -> tuple[EditInfo, ...]:
    # A bare path is tolerated: some tools only know which file they touched.
    return tuple(
        EditInfo(path=e) if isinstance(e, str) else EditInfo.from_dict(_as_mapping(e, "edits", where), where)
        for e in _as_list(info, "edits", where)
    )


def _read_detectors(info: Mapping[str, Any], where: str) -> dict[str, tuple[str, ...]]:
    value = info.get("detectors")
    if value is None:
        return {}
    return {str(name): _strings({"detectors": ev}, "detectors", where)
            for name, ev in _as_mapping(value, "detectors", where).items()}


def _read_tests(info: Mapping[str, Any], where: str) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None]:
    tests = info.get("tests")
    if tests is None:
        return None, None
    tests = _as_mapping(tests, "tests", where)
    passed = tuple(str(t) for t in _as_list(tests, "passed", where + " tests"))
    failed = tuple(str(t) for t in _as_list(tests, "failed", where + " tests"))
    return passed, failed


def _read_answer(info: Mapping[str, Any]) -> str | None:
    answer = info.get("answer")
    # A number submitted as an answer is still an answer.
    return None if answer is None else answer if isinstance(answer, str) else str(answer)


def _read_verification(info: Mapping[str, Any], where: str) -> Verification | None:
    v = info.get("verification")
    return None if v is None else Verification.from_dict(_as_mapping(v, "verification", where), where)


# --------------------------------------------------------------------------- the task and the episode


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
        answer = d.get("expected_answer")
        tol = d.get("numeric_tolerance")
        return cls(
            target_tests=_strings(d, "target_tests", "task"),
            reference_files=_strings(d, "reference_files", "task"),
            hidden_paths=_strings(d, "hidden_paths", "task"),
            test_paths=_strings(d, "test_paths", "task"),
            expected_answer=None if answer is None else str(answer),
            numeric_tolerance=None if tol is None else float(tol),
        )


@dataclass(frozen=True)
class Episode:
    """One episode's record: its steps' infos in order and the task they are scored on."""

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
    def resolved(self) -> bool:
        """The grader resolved the task."""
        return self.verification is not None and self.verification.resolved

    @property
    def answer(self) -> str | None:
        """The last submitted answer."""
        return next((s.answer for s in reversed(self.steps) if s.answer is not None), None)

    @property
    def truncated_by_error(self) -> str | None:
        return next((s.error for s in reversed(self.steps) if s.error is not None), None)

    def reward_breakdown(self) -> dict[str, float]:
        """{component: the episode's sum of its weighted values}."""
        out: dict[str, float] = {}
        for step in self.steps:
            for name, value in step.reward_breakdown.items():
                out[name] = out.get(name, 0.0) + value
        return out

    def detector_steps(self) -> dict[str, int]:
        """{detector: number of steps it fired on}."""
        out: dict[str, int] = {}
        for step in self.steps:
            for name, evidence in step.detectors.items():
                if evidence:
                    out[name] = out.get(name, 0) + 1
        return out

    def tool_names(self) -> list[str]:
        """The tools the episode's calls ran, in order."""
        return [r.name for step in self.steps for r in step.tool_results]


def parse_steps(steps: Sequence[Mapping[str, Any] | StepInfo]) -> list[StepInfo]:
    if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Sequence):
        raise EpisodeInfoError(f"steps must be a list of info dicts, got {type(steps).__name__}")
    return [StepInfo.from_dict(s, i) for i, s in enumerate(steps)]
