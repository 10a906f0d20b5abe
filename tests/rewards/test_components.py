"""Each reward component on hand-built steps, with hand-computed raw values."""

from m2rl.rewards import components as C
from m2rl.rewards.episode import RewardTask, parse_steps

NO_TASK = RewardTask()


def call(name, **args):
    return {"name": name, "arguments": args}


def steps(*infos):
    return parse_steps(list(infos))


# ----------------------------------------------------------------------------- outcome components


def test_outcomes_land_on_the_terminal_step_only():
    s = steps({}, {}, {"verification": {"resolved": True, "score": 1.0, "details": "", "exit_code": 0}})
    assert C.resolved(s, NO_TASK) == [0.0, 0.0, 1.0]
    assert C.target_tests_fraction(s, NO_TASK) == [0.0, 0.0, 1.0]
    assert C.checker_exit(s, NO_TASK) == [0.0, 0.0, 1.0]


def test_unresolved_partial_score_and_failed_checker():
    s = steps({}, {"verification": {"resolved": False, "score": 0.25, "exit_code": 3}})
    assert C.resolved(s, NO_TASK) == [0.0, 0.0]
    assert C.target_tests_fraction(s, NO_TASK) == [0.0, 0.25]
    assert C.checker_exit(s, NO_TASK) == [0.0, 0.0]


def test_no_verification_scores_zero_and_empty_episode_is_empty():
    assert C.resolved(steps({}, {}), NO_TASK) == [0.0, 0.0]
    assert C.target_tests_fraction(steps({}), NO_TASK) == [0.0]
    assert C.resolved([], NO_TASK) == []


def test_tests_fraction_is_clamped():
    assert C.target_tests_fraction(steps({"verification": {"resolved": False, "score": 7.0}}), NO_TASK) == [
        1.0
    ]


def test_answer_match_exact_numeric_and_missing():
    task = RewardTask(expected_answer="3.14159", numeric_tolerance=1e-3)
    assert C.answer_match(steps({}, {"answer": "3.1416"}), task) == [0.0, 1.0]
    assert C.answer_match(steps({"answer": "3.2"}), task) == [0.0]
    assert C.answer_match(steps({"answer": "3.1416"}, {}), task) == [0.0, 1.0]  # last submitted answer counts
    assert C.answer_match(steps({}), task) == [0.0]
    assert C.answer_match(steps({"answer": "Paris"}), RewardTask(expected_answer="paris")) == [1.0]
    assert C.answer_match(steps({"answer": "x"}), NO_TASK) == [0.0]  # no expected answer


# ----------------------------------------------------------------------------- dense components


def test_valid_and_invalid_tool_calls():
    s = steps(
        {
            "tool_calls": [call("bash", cmd="ls")],  # the call to "nope" is only an error
            "errors": [{"kind": "unknown_tool", "message": ""}],
        },
        {"tool_calls": [call("bash", cmd="ls")], "errors": [{"kind": "tool", "message": "exit 1"}]},
        {"errors": [{"kind": "schema", "message": ""}, {"kind": "format", "message": ""}]},
    )
    assert C.valid_tool_call(s, NO_TASK) == [1.0, 1.0, 0.0]
    assert C.invalid_tool_call(s, NO_TASK) == [1.0, 0.0, 1.0]
    assert C.format_error(s, NO_TASK) == [0.0, 0.0, 1.0]


def test_syntax_components():
    s = steps(
        {
            "edits": [
                {"path": "a.py", "syntax_ok": True},
                {"path": "b.py", "syntax_ok": False},
                {"path": "c.txt", "syntax_ok": None},
                {"path": "d.py", "syntax_ok": True},
            ]
        },
        {},
    )
    assert C.valid_syntax(s, NO_TASK) == [2.0, 0.0]
    assert C.syntax_error(s, NO_TASK) == [1.0, 0.0]


def test_test_progress_counts_first_passes_of_target_tests():
    task = RewardTask(target_tests=("t1", "t2", "t3"))
    s = steps(
        {"tests": {"passed": ["t1", "other"], "failed": ["t2", "t3"]}},
        {"tests": {"passed": [], "failed": ["t1", "t2", "t3"]}},  # t1 breaks
        {"tests": {"passed": ["t1", "t2"], "failed": ["t3"]}},  # t1 re-fixed: not new; t2 new
        {},
        {"tests": {"passed": ["t1", "t2", "t3"], "failed": []}},
    )
    assert C.newly_passing_tests(s, task) == [1.0, 0.0, 1.0, 0.0, 1.0]
    # Without target tests every newly passing test counts.
    assert C.newly_passing_tests(s, NO_TASK) == [2.0, 0.0, 1.0, 0.0, 1.0]


def test_relevant_file_counts_each_reference_file_once():
    task = RewardTask(reference_files=("src/pkg/core.py", "src/pkg/util.py"))
    s = steps(
        {"edits": [{"path": "/work/repo/src/pkg/core.py"}, {"path": "src/pkg/other.py"}]},
        {"edits": [{"path": "src/pkg/core.py"}, {"path": "./src/pkg/util.py"}]},
        {"edits": [{"path": "xsrc/pkg/util.py"}]},  # not a component-boundary match
    )
    assert C.relevant_file(s, task) == [1.0, 1.0, 0.0]


def test_timeout_counts_without_double_counting():
    s = steps(
        {
            "tool_results": [{"name": "bash", "ok": False, "timed_out": True}],
            "errors": [{"kind": "timeout", "message": "30 s"}],
        },
        {
            "tool_results": [
                {"name": "a", "ok": False, "timed_out": True},
                {"name": "b", "ok": False, "timed_out": True},
            ]
        },
        {"errors": [{"kind": "timeout", "message": ""}]},
        {"tool_results": [{"name": "a", "ok": True}]},
    )
    assert C.timeout(s, NO_TASK) == [1.0, 2.0, 1.0, 0.0]


def test_repetition_within_and_across_consecutive_steps():
    ls, cat = call("bash", cmd="ls"), call("bash", cmd="cat x")
    s = steps(
        {"tool_calls": [ls, ls]},  # repeat within the step
        {"tool_calls": [ls, cat]},  # ls repeats the previous step
        {"tool_calls": [ls]},  # ls was not in the previous step... but it was: [ls, cat]
        {"tool_calls": [cat]},  # cat was two steps ago: not a loop
    )
    assert C.repetition(s, NO_TASK) == [1.0, 1.0, 1.0, 0.0]


def test_registry_is_complete_and_disjoint():
    assert set(C.OUTCOME_COMPONENTS).isdisjoint(C.DENSE_COMPONENTS)
    assert set(C.COMPONENTS) == set(C.OUTCOME_COMPONENTS) | set(C.DENSE_COMPONENTS)
    for name, fn in C.COMPONENTS.items():
        assert fn([], NO_TASK) == [], name
