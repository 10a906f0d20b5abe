"""StepInfo / RewardTask views of the env -> rewards contract dicts."""

import pytest
from m2rl.rewards.episode import Episode, EpisodeInfoError, RewardTask, StepInfo, parse_steps


def test_empty_info_means_nothing_happened():
    s = StepInfo.from_dict({})
    assert s.tool_calls == () and s.tool_results == () and s.errors == () and s.edits == ()
    assert s.files_viewed == () and s.commands == ()
    assert s.tests_passed is None and s.tests_failed is None
    assert s.answer is None and s.verification is None and s.error is None


def test_full_info_is_read():
    info = {
        "tool_calls": [{"name": "bash", "arguments": {"cmd": "ls", "opts": {"deep": ["x"]}}}],
        "tool_results": [
            {"name": "bash", "ok": True, "output": "a\n", "timed_out": False, "duration_s": 0.5}
        ],
        "errors": [{"kind": "schema", "message": "missing cmd"}],
        "edits": [{"path": "src/a.py", "syntax_ok": False}, {"path": "README", "syntax_ok": None}],
        "files_viewed": ["src/a.py"],
        "commands": ["ls"],
        "tests": {"passed": ["t1"], "failed": ["t2"]},
        "answer": 42,
        "verification": {"resolved": True, "score": 1, "details": "ok", "exit_code": 0},
        "reward_breakdown": {"x": 1.0},
        "timings": {"sandbox_s": 0.1},
    }
    s = StepInfo.from_dict(info)
    assert s.tool_calls[0].name == "bash"
    assert sorted(s.tool_calls[0].string_arguments()) == ["ls", "x"]
    assert s.tool_results[0].ok and s.tool_results[0].duration_s == 0.5
    assert s.error_count("schema", "unknown_tool") == 1
    assert s.edits[0].syntax_ok is False and s.edits[1].syntax_ok is None
    assert s.tests_passed == ("t1",) and s.tests_failed == ("t2",)
    assert s.answer == "42"
    assert s.verification.resolved and s.verification.score == 1.0 and s.verification.exit_code == 0
    assert "ls" in s.agent_text() and "x" in s.agent_text()


def test_identical_calls_have_identical_keys_regardless_of_argument_order():
    a = StepInfo.from_dict({"tool_calls": [{"name": "f", "arguments": {"a": 1, "b": 2}}]}).tool_calls[0]
    b = StepInfo.from_dict({"tool_calls": [{"name": "f", "arguments": {"b": 2, "a": 1}}]}).tool_calls[0]
    c = StepInfo.from_dict({"tool_calls": [{"name": "f", "arguments": {"a": 1, "b": 3}}]}).tool_calls[0]
    assert a.key() == b.key() != c.key()


@pytest.mark.parametrize(
    "info, needle",
    [
        ({"tool_calls": "bash"}, "tool_calls"),
        ({"edits": [3]}, "edits"),
        ({"tests": ["t1"]}, "tests"),
        ({"verification": {"resolved": True, "score": "high"}}, "verification.score"),
        ({"commands": [["ls"]]}, "commands"),
    ],
)
def test_malformed_info_names_the_key(info, needle):
    with pytest.raises(EpisodeInfoError, match=needle):
        StepInfo.from_dict(info, index=3)


def test_parse_steps_rejects_non_lists_and_names_the_step():
    with pytest.raises(EpisodeInfoError, match="steps must be a list"):
        parse_steps({"tool_calls": []})
    with pytest.raises(EpisodeInfoError, match="step 1"):
        parse_steps([{}, "oops"])


def test_task_from_dict_ignores_unrelated_keys():
    t = RewardTask.from_dict(
        {
            "target_tests": ["a"],
            "reference_files": ["src/x.py"],
            "prompt": "fix it",
            "expected_answer": 3,
            "numeric_tolerance": 0.1,
        }
    )
    assert t.target_tests == ("a",) and t.reference_files == ("src/x.py",)
    assert t.expected_answer == "3" and t.numeric_tolerance == 0.1
    assert RewardTask.from_dict(None) == RewardTask()
    with pytest.raises(EpisodeInfoError, match="task"):
        RewardTask.from_dict(["a"])


def test_episode_view():
    ep = Episode.from_infos(
        [
            {"answer": "1"},
            {"verification": {"resolved": False, "score": 0.5}},
            {"answer": "2", "error": "dead"},
        ],
        {"expected_answer": "2"},
    )
    assert len(ep.steps) == 3 and ep.task.expected_answer == "2"
    assert ep.answer == "2" and ep.verification.score == 0.5 and ep.truncated_by_error == "dead"
    assert Episode.from_infos([]).verification is None


FULL_INFO = {
    "tool_calls": [{"name": "bash", "arguments": {"command": "pytest -q", "opts": {"deep": ["x"]}}}],
    "tool_results": [{"name": "bash", "ok": False, "output": "1 failed", "timed_out": False, "duration_s": 0.25}],
    "errors": [{"kind": "tool", "message": "exit 1"}],
    "edits": [{"path": "src/a.py", "syntax_ok": True}, {"path": "notes.txt", "syntax_ok": None}],
    "files_viewed": ["src/a.py"],
    "commands": ["pytest -q"],
    "detectors": {"fake_test_output": ["printed test summary"]},
    "timings": {"sandbox_s": 0.25, "grade_s": 0.5},
    "reward_breakdown": {"resolved": 1.0, "valid_tool_call": 0.05},
    "responses": ["1 failed"],
    "tests": {"passed": ["t1"], "failed": ["t2"]},
    "answer": "42",
    "verification": {"resolved": True, "score": 1.0, "details": "ok"},
    "error": "the sandbox died",
}


def test_the_dict_form_round_trips_and_lists_every_key():
    """Before: StepInfo had no dict form and no fields for reward_breakdown, detectors, responses, timings,
    so the agent loop and the learner read those as raw string keys."""
    step = StepInfo.from_dict(FULL_INFO)
    assert step.to_dict() == FULL_INFO
    assert StepInfo.from_dict(step.to_dict()) == step
    assert step.reward == 1.05 and step.detectors == {"fake_test_output": ("printed test summary",)}
    assert step.responses == ("1 failed",) and step.timings["grade_s"] == 0.5
    # every key of the dict form is named in the docstring (the contract is documented where it is declared)
    for key in FULL_INFO:
        assert f"``{key}``" in StepInfo.__doc__, key


def test_the_dict_form_of_an_empty_step_has_the_lists_but_no_optional_keys():
    out = StepInfo().to_dict()
    assert out == {"tool_calls": [], "tool_results": [], "errors": [], "edits": [], "files_viewed": [],
                   "commands": [], "detectors": {}, "timings": {}, "reward_breakdown": {}, "responses": []}


def test_the_dict_form_shares_nothing_with_the_view():
    step = StepInfo.from_dict(FULL_INFO)
    out = step.to_dict()
    out["tool_calls"][0]["arguments"]["opts"]["deep"].append("y")
    out["reward_breakdown"]["resolved"] = 0.0
    assert step.to_dict() == FULL_INFO


@pytest.mark.parametrize("info, needle", [
    ({"reward_breakdown": {"resolved": "1"}}, "reward_breakdown.resolved"),
    ({"detectors": {"x": "evidence"}}, "detectors"),
    ({"responses": "text"}, "responses"),
    ({"timings": {"sandbox_s": True}}, "timings.sandbox_s"),
])
def test_malformed_new_keys_name_the_key(info, needle):
    with pytest.raises(EpisodeInfoError, match=needle):
        StepInfo.from_dict(info)


def test_one_verification_class_for_graders_and_rewards():
    """Before: envs/tasks/base.py and rewards/episode.py each declared a Verification."""
    from m2rl.envs.tasks.base import Verification as GraderVerification
    from m2rl.rewards.episode import Verification

    assert GraderVerification is Verification
    verdict = Verification(False, 0.0, "no answer was submitted")
    assert verdict.to_dict() == {"resolved": False, "score": 0.0, "details": "no answer was submitted"}
    assert Verification.from_dict(verdict.to_dict()) == verdict
    assert Verification(True, 1.0, "ok", exit_code=0).to_dict()["exit_code"] == 0


def test_episode_record_sums_what_the_learner_reads():
    ep = Episode.from_infos([
        {"reward_breakdown": {"valid_tool_call": 0.05}, "detectors": {"fake_test_output": ["x"], "network": []},
         "tool_results": [{"name": "python", "ok": True}]},
        {"reward_breakdown": {"valid_tool_call": 0.05, "resolved": 1.0},
         "tool_results": [{"name": "submit", "ok": True}], "verification": {"resolved": True, "score": 1.0}},
    ])
    assert ep.resolved and ep.reward_breakdown() == {"valid_tool_call": 0.1, "resolved": 1.0}
    assert ep.detector_steps() == {"fake_test_output": 1} and ep.tool_names() == ["python", "submit"]
    assert not Episode.from_infos([{"verification": {"resolved": False, "score": 0.0}}]).resolved
