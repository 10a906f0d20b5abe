"""Reward components: pure functions (steps, task) -> one raw, unweighted value per step.

Raw values are counts or indicators ("2 valid tool calls", "1 = resolved"); `RewardSpec` weights
turn them into rewards, so the sign convention lives in the weights (penalties have negative
weights) and every component can be unit-tested with hand-computed counts.

Outcome components (verifiable results) put their value on the terminal (last) step and 0 elsewhere;
dense (process) components score every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from m2rl.rewards.answer import grade_answer
from m2rl.rewards.episode import Episode, RewardTask, StepInfo, Verification
from m2rl.rewards.paths import path_matches

Component = Callable[[Sequence[StepInfo], RewardTask], list[float]]

DEFAULT_NUMERIC_TOLERANCE = 1e-6
# Error kinds that mean the call itself was invalid (as opposed to a tool that ran and failed).
INVALID_CALL_KINDS = ("unknown_tool", "schema")


# --------------------------------------------------------------------------- outcome components


def _terminal_verification(steps: Sequence[StepInfo]) -> Verification | None:
    return Episode(tuple(steps)).verification


def _on_terminal(steps: Sequence[StepInfo], value: float) -> list[float]:
    out = [0.0] * len(steps)
    if steps:
        out[-1] = value
    return out


def resolved(steps: Sequence[StepInfo], task: RewardTask) -> list[float]:
    """1 if the grader resolved the task (all target tests pass, nothing else broke)."""
    v = _terminal_verification(steps)
    return _on_terminal(steps, 1.0 if v is not None and v.resolved else 0.0)


def target_tests_fraction(steps: Sequence[StepInfo], task: RewardTask) -> list[float]:
    """Fraction of the target tests passing in the grader's run (its `score`, clamped to [0, 1])."""
    v = _terminal_verification(steps)
    return _on_terminal(steps, 0.0 if v is None else min(1.0, max(0.0, v.score)))


def grader_score(steps: Sequence[StepInfo], task: RewardTask) -> list[float]:
    """The grader's score as it gave it, unclamped: a benchmark's own reward (a MiniWoB page's, in [-1, 1])."""
    v = _terminal_verification(steps)
    return _on_terminal(steps, 0.0 if v is None else float(v.score))


def answer_match(steps: Sequence[StepInfo], task: RewardTask) -> list[float]:
    """1 if the last submitted answer matches the task's expected answer (exact or numeric)."""
    if task.expected_answer is None:
        return _on_terminal(steps, 0.0)
    answer = Episode(tuple(steps)).answer
    tol = DEFAULT_NUMERIC_TOLERANCE if task.numeric_tolerance is None else task.numeric_tolerance
    return _on_terminal(steps, 1.0 if grade_answer(task.expected_answer, answer, tol) else 0.0)


def checker_exit(steps: Sequence[StepInfo], task: RewardTask) -> list[float]:
    """1 if the grader's checker program exited 0 (verification.exit_code)."""
    v = _terminal_verification(steps)
    return _on_terminal(steps, 1.0 if v is not None and v.exit_code == 0 else 0.0)


# --------------------------------------------------------------------------- dense components


def valid_tool_call(steps: Sequence[StepInfo], task: RewardTask) -> list[float]:
    """Number of the step's tool calls that named a known tool with schema-valid arguments.

    `StepInfo.tool_calls` holds exactly those (the parser validates before anything runs); invalid calls
    appear only as `unknown_tool`/`schema` errors, counted by `invalid_tool_call`."""
    return [float(len(s.tool_calls)) for s in steps]


def invalid_tool_call(steps: Sequence[StepInfo], task: RewardTask) -> list[float]:
    """Number of calls to an unknown tool or with arguments that fail the tool's schema."""
    return [float(s.error_count(*INVALID_CALL_KINDS)) for s in steps]


def format_error(steps: Sequence[StepInfo], task: RewardTask) -> list[float]:
    """1 if the step's output could not be parsed (malformed tool-call markup etc.)."""
    return [1.0 if s.error_count("format") else 0.0 for s in steps]


def valid_syntax(steps: Sequence[StepInfo], task: RewardTask) -> list[float]:
    """Number of edited files whose syntax the env checked and found valid."""
    return [float(sum(1 for e in s.edits if e.syntax_ok is True)) for s in steps]


def syntax_error(steps: Sequence[StepInfo], task: RewardTask) -> list[float]:
    """Number of edited files left syntactically invalid."""
    return [float(sum(1 for e in s.edits if e.syntax_ok is False)) for s in steps]


def newly_passing_tests(steps: Sequence[StepInfo], task: RewardTask) -> list[float]:
    """Number of tests passing for the first time in the episode (target tests only, if the task
    names them). 'First time ever', not 'since the last run', so breaking and re-fixing a test
    cannot be farmed."""
    targets = set(task.target_tests)
    ever_passed: set[str] = set()
    out = []
    for s in steps:
        new = 0
        for t in s.tests_passed or ():
            if (not targets or t in targets) and t not in ever_passed:
                ever_passed.add(t)
                new += 1
        out.append(float(new))
    return out


def relevant_file(steps: Sequence[StepInfo], task: RewardTask) -> list[float]:
    """Localisation: number of files the reference fix touches that this step edits for the first
    time in the episode."""
    found: set[str] = set()
    out = []
    for s in steps:
        new = 0
        for e in s.edits:
            for ref in task.reference_files:
                if ref not in found and path_matches(e.path, ref):
                    found.add(ref)
                    new += 1
        out.append(float(new))
    return out


def timeout(steps: Sequence[StepInfo], task: RewardTask) -> list[float]:
    """Number of tool executions that hit their time limit (the env may report a timeout both as
    a result flag and as an error; the larger count is used so it is not counted twice)."""
    return [
        float(max(sum(1 for r in s.tool_results if r.timed_out), s.error_count("timeout"))) for s in steps
    ]


def repetition(steps: Sequence[StepInfo], task: RewardTask) -> list[float]:
    """Number of the step's tool calls identical (name and arguments) to a call earlier in the
    same step or in the previous step: the signature of an agent stuck in a loop."""
    out = []
    previous: set[str] = set()
    for s in steps:
        seen = set(previous)
        repeats = 0
        for c in s.tool_calls:
            k = c.key()
            if k in seen:
                repeats += 1
            seen.add(k)
        out.append(float(repeats))
        previous = {c.key() for c in s.tool_calls}
    return out


OUTCOME_COMPONENTS: dict[str, Component] = {
    "resolved": resolved,
    "tests_fraction": target_tests_fraction,
    "grader_score": grader_score,
    "answer_match": answer_match,
    "checker_exit": checker_exit,
}

DENSE_COMPONENTS: dict[str, Component] = {
    "valid_tool_call": valid_tool_call,
    "invalid_tool_call": invalid_tool_call,
    "format_error": format_error,
    "valid_syntax": valid_syntax,
    "syntax_error": syntax_error,
    "test_progress": newly_passing_tests,
    "relevant_file": relevant_file,
    "timeout": timeout,
    "repetition": repetition,
}

COMPONENTS: dict[str, Component] = {**OUTCOME_COMPONENTS, **DENSE_COMPONENTS}
