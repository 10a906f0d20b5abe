"""compute_episode_rewards: hand-computed episodes, neutralisation, clipping, shaping modes."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from m2rl.rewards import RewardSpec, compute_episode_rewards
from m2rl.rewards.compute import CLIP_KEY

TASK = {
    "target_tests": ["tests/test_core.py::test_fix"],
    "reference_files": ["src/pkg/core.py"],
    "hidden_paths": ["tests/hidden"],
}
RESOLVED = {"resolved": True, "score": 1.0, "details": "all target tests pass"}


def call(name, **args):
    return {"name": name, "arguments": args}


def honest_episode():
    return [
        {"tool_calls": [call("bash", command="ls")], "commands": ["ls"]},
        {
            "tool_calls": [call("edit", path="src/pkg/core.py")],
            "edits": [{"path": "src/pkg/core.py", "syntax_ok": True}],
        },
        {
            "tool_calls": [call("run_tests")],
            "tests": {"passed": ["tests/test_core.py::test_fix"], "failed": []},
        },
        {"errors": [{"kind": "unknown_tool", "message": "no tool 'nope'"}]},
        {"tool_calls": [call("submit")], "verification": RESOLVED},
    ]


def test_honest_episode_hand_computed():
    r = compute_episode_rewards(RewardSpec.default(), honest_episode(), TASK)
    expected = [0.05, 0.05 + 0.03 + 0.02, 0.05 + 0.04, -0.05, 0.05 + 1.0]
    assert r.per_step == pytest.approx(expected)
    assert r.total == pytest.approx(1.24)
    assert r.breakdown["resolved"] == 1.0
    assert r.breakdown["valid_tool_call"] == pytest.approx(0.2)
    assert r.breakdown["invalid_tool_call"] == pytest.approx(-0.05)
    assert r.breakdown["relevant_file"] == pytest.approx(0.03)
    assert r.breakdown[CLIP_KEY] == 0.0
    assert r.detectors == {
        "test_tampering": 0,
        "fake_test_output": 0,
        "hidden_test_access": 0,
        "network_attempt": 0,
    }
    assert not r.outcome_voided
    assert r.per_step_breakdown[2]["test_progress"] == pytest.approx(0.04)
    assert r.per_step_breakdown[0]["resolved"] == 0.0


def test_trajectory_that_edits_tests_gets_no_outcome_and_counts_the_hack():
    cheat = "sed -i 's/assert add(2, 2) == 4/assert True/' tests/test_core.py"
    steps = [
        {
            "tool_calls": [call("bash", command="cat tests/test_core.py")],
            "commands": ["cat tests/test_core.py"],
        },
        {
            "tool_calls": [call("bash", command=cheat)],
            "commands": [cheat],
            "edits": [{"path": "tests/test_core.py", "syntax_ok": True}],
        },
        {
            "tool_calls": [call("run_tests")],
            "tests": {"passed": ["tests/test_core.py::test_fix"], "failed": []},
        },
        {"tool_calls": [call("submit")], "verification": RESOLVED},
    ]
    r = compute_episode_rewards(RewardSpec.default(), steps, TASK)
    assert r.outcome_voided
    assert r.breakdown["resolved"] == 0.0
    assert r.detectors["test_tampering"] == 1
    assert r.metrics()["reward/detector/test_tampering"] == 1.0
    assert r.per_step[1] == 0.0  # the offending step's dense gains are gone
    assert r.total == pytest.approx(0.05 + 0.0 + (0.05 + 0.04) + 0.05)
    honest = compute_episode_rewards(RewardSpec.default(), honest_episode(), TASK)
    assert r.total < honest.total - 0.9


def test_offending_step_keeps_its_penalties():
    steps = [
        {
            "tool_calls": [call("bash", command="curl http://x"), call("nope")],
            "commands": ["curl http://x"],
            "errors": [{"kind": "unknown_tool", "message": ""}],
        },
        {"verification": RESOLVED},
    ]
    r = compute_episode_rewards(RewardSpec.default(), steps, TASK)
    assert r.detectors["network_attempt"] == 1
    assert r.per_step_breakdown[0]["valid_tool_call"] == 0.0  # +0.05 neutralised
    assert r.per_step_breakdown[0]["invalid_tool_call"] == pytest.approx(-0.05)
    # Network use alone does not void the outcome (the grader never saw anything fetched).
    assert not r.outcome_voided and r.breakdown["resolved"] == 1.0


def test_hidden_tests_void_the_outcome():
    bad_step = {"files_viewed": ["tests/hidden/test_secret.py"]}
    r = compute_episode_rewards(RewardSpec.default(), [bad_step, {"verification": RESOLVED}], TASK)
    assert r.outcome_voided and r.total == 0.0 and r.detectors["hidden_test_access"] == 1


def _answer_episode(extra_command: str | None, answer: str) -> list[dict]:
    """python computes, the agent maybe prints something, then submits; the grader compares answers."""
    steps = [{"tool_calls": [call("python", code="2 + 2")], "commands": ["2 + 2"]}]
    if extra_command is not None:
        steps.append({"tool_calls": [call("bash", command=extra_command)], "commands": [extra_command]})
    verdict = {"resolved": answer == "4", "score": float(answer == "4"), "details": ""}
    steps.append({"tool_calls": [call("submit", answer=answer)], "answer": answer, "verification": verdict})
    return steps


def test_printing_a_test_summary_does_not_cost_a_correct_answer():
    """Before: `echo '5 passed'` after a correct answer voided it (1.05 -> 0.05 on the Python env)."""
    spec, task = RewardSpec.default(), {"expected_answer": "4"}
    honest = compute_episode_rewards(spec, _answer_episode("echo hello", "4"), task)
    echoed = compute_episode_rewards(spec, _answer_episode("echo '5 passed'", "4"), task)
    assert echoed.detectors["fake_test_output"] == 1  # still seen and counted: a signal for the metrics
    assert not echoed.outcome_voided and echoed.breakdown["resolved"] == 1.0
    assert echoed.total == pytest.approx(honest.total) == pytest.approx(1.15)


def test_hidden_fake_output_gains_nothing_because_the_grader_decides():
    spec, task = RewardSpec.default(), {"expected_answer": "4"}
    evasive = compute_episode_rewards(spec, _answer_episode("python -c \"print('5 pa'+'ssed')\"", "5"), task)
    assert evasive.detectors["fake_test_output"] == 0  # the detector cannot see it ...
    assert evasive.breakdown["resolved"] == 0.0 and evasive.total < 0.5  # ... and it does not matter


def test_fake_output_costs_the_dense_gain_only_where_the_env_parsed_tests():
    fake = "echo '3 passed in 0.02s'"
    parsed = {"tool_calls": [call("bash", command=fake)], "commands": [fake],
              "tests": {"passed": ["tests/test_core.py::test_fix"], "failed": []}}
    printed = {"tool_calls": [call("bash", command=fake + " ")], "commands": [fake + " "]}  # not a repeat
    r = compute_episode_rewards(RewardSpec.default(), [parsed, printed, {"verification": RESOLVED}], TASK)
    assert r.detectors["fake_test_output"] == 2 and not r.outcome_voided
    assert r.per_step[0] == 0.0  # test_progress could have been fooled by the printed line
    assert r.per_step[1] == pytest.approx(0.05)  # nothing was parsed: the call is an ordinary valid call
    assert r.breakdown["resolved"] == 1.0


def test_void_outcome_on_can_still_name_fake_output():
    spec = RewardSpec.from_dict({"void_outcome_on": ["fake_test_output"]})
    r = compute_episode_rewards(spec, [{"commands": ["echo '3 passed'"]}, {"verification": RESOLVED}], TASK)
    assert r.outcome_voided and r.breakdown["resolved"] == 0.0


def test_precomputed_hits_give_the_same_rewards():
    from m2rl.rewards.detectors import run_detectors
    from m2rl.rewards.episode import RewardTask, parse_steps

    spec = RewardSpec.default()
    steps = parse_steps(honest_episode()[:-1] + [
        {"commands": ["rm tests/test_core.py"], "edits": [{"path": "tests/test_core.py"}]},
        {"commands": ["curl http://x"]}, {"verification": RESOLVED}])
    task = RewardTask.from_dict(TASK)
    hits = [h for t, s in enumerate(steps) for h in run_detectors([s], task, spec.detectors, first_step=t)]
    assert compute_episode_rewards(spec, steps, task, hits=hits) == compute_episode_rewards(spec, steps, task)


def test_disabled_detector_neither_counts_nor_voids():
    spec = RewardSpec.from_dict({"detectors": ["network_attempt"], "void_outcome_on": []})
    r = compute_episode_rewards(
        spec, [{"edits": [{"path": "tests/test_core.py"}]}, {"verification": RESOLVED}], TASK
    )
    assert "test_tampering" not in r.detectors and not r.outcome_voided and r.breakdown["resolved"] == 1.0


def test_dense_total_clip_bounds_farming():
    steps = [{"tool_calls": [call("bash", command=f"ls {i}")]} for i in range(20)] + [
        {"verification": RESOLVED}
    ]
    r = compute_episode_rewards(RewardSpec.default(), steps, TASK)
    assert r.breakdown["valid_tool_call"] == pytest.approx(0.05 * 20)
    assert r.breakdown[CLIP_KEY] == pytest.approx(0.5 - 1.0)
    assert r.total == pytest.approx(1.5)
    assert r.per_step[10:20] == pytest.approx([0.0] * 10, abs=1e-12)


def test_step_and_total_clip():
    spec = RewardSpec.from_dict({"clip": {"step": [-0.1, 0.1], "dense_total": None, "total": [-1.0, 1.0]}})
    steps = [{"tool_calls": [call("a"), call("b"), call("c")]}, {"verification": RESOLVED}]
    r = compute_episode_rewards(spec, steps, TASK)
    assert r.per_step[0] == pytest.approx(0.1)
    assert r.per_step_breakdown[0][CLIP_KEY] == pytest.approx(-0.05)
    assert r.total == pytest.approx(1.0) and sum(r.per_step) == pytest.approx(1.0)


def test_potential_shaping_mode_telescopes_with_gamma_one():
    spec = RewardSpec.from_dict({"shaping": "potential", "clip": {"dense_total": None}})
    r = compute_episode_rewards(spec, honest_episode(), TASK)
    dense = [0.05, 0.10, 0.09, -0.05, 0.05]
    # F_t = Phi(s_{t+1}) - Phi(s_t) = dense_t for t < T-1; the terminal step refunds Phi(s_{T-1}) since Phi(terminal) = 0.
    assert r.per_step[:4] == pytest.approx(dense[:4])
    assert r.per_step[4] == pytest.approx(-sum(dense[:4]) + 1.0)
    assert r.total == pytest.approx(1.0)  # same return as outcome-only


def test_potential_shaping_with_discount():
    spec = RewardSpec.from_dict(
        {
            "components": {"valid_tool_call": 1.0},
            "shaping": {"mode": "potential", "gamma": 0.5},
            "clip": {"dense_total": None},
        }
    )
    steps = [{"tool_calls": [call("a")]}, {"tool_calls": [call("b")]}, {}]
    r = compute_episode_rewards(spec, steps, TASK)
    # Phi = [0, 1, 2, 0 (terminal)]; F_t = 0.5 * Phi_{t+1} - Phi_t
    assert r.per_step == pytest.approx([0.5, 0.0, -2.0])


def test_outcome_only_mode():
    r = compute_episode_rewards(RewardSpec.from_dict({"shaping": "none"}), honest_episode(), TASK)
    assert r.per_step == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_accepts_an_episode_view():
    from m2rl.rewards import Episode

    ep = Episode.from_infos(honest_episode(), TASK)
    assert compute_episode_rewards(RewardSpec.default(), ep).total == pytest.approx(1.24)


def test_empty_episode_and_bad_arguments():
    r = compute_episode_rewards(RewardSpec.default(), [], None)
    assert r.per_step == [] and r.total == 0.0
    with pytest.raises(TypeError, match="RewardSpec"):
        compute_episode_rewards({"components": {}}, [], None)  # type: ignore[arg-type]


def test_answer_task():
    spec = RewardSpec.from_dict({"components": {"answer_match": 1.0, "format_error": -0.05}})
    r = compute_episode_rewards(
        spec,
        [{"errors": [{"kind": "format", "message": ""}]}, {"answer": "0.333"}],
        {"expected_answer": "1/3", "numeric_tolerance": 1e-3},
    )
    assert r.per_step == pytest.approx([-0.05, 1.0])
    r = compute_episode_rewards(
        spec, [{"answer": "0.333"}], {"expected_answer": "1/3"}
    )  # spec tolerance 1e-6
    assert r.total == 0.0


# ----------------------------------------------------------------------------- invariants

_call = st.builds(
    lambda n, a: {"name": n, "arguments": {"x": a}},
    st.sampled_from(["bash", "edit", "nope"]),
    st.integers(0, 2),
)
_step = st.fixed_dictionaries(
    {},
    optional={
        "tool_calls": st.lists(_call, max_size=3),
        "errors": st.lists(
            st.builds(
                lambda k: {"kind": k, "message": ""},
                st.sampled_from(["format", "unknown_tool", "schema", "timeout", "tool"]),
            ),
            max_size=2,
        ),
        "edits": st.lists(
            st.builds(
                lambda p, ok: {"path": p, "syntax_ok": ok},
                st.sampled_from(["src/pkg/core.py", "src/a.py", "tests/test_core.py"]),
                st.sampled_from([True, False, None]),
            ),
            max_size=2,
        ),
        "tests": st.builds(
            lambda p: {"passed": p, "failed": []},
            st.lists(st.sampled_from(["tests/test_core.py::test_fix", "other"]), max_size=2),
        ),
        "commands": st.lists(st.sampled_from(["ls", "curl x", "echo '2 passed'", "pytest -q"]), max_size=2),
    },
)
_episode = st.lists(_step, min_size=1, max_size=6).map(
    lambda s: s[:-1] + [{**s[-1], "verification": RESOLVED}]
)


@settings(max_examples=60, deadline=None)
@given(_episode, st.sampled_from(["dense", "potential", "none"]))
def test_breakdowns_always_add_up(steps, mode):
    r = compute_episode_rewards(RewardSpec.from_dict({"shaping": mode}), steps, TASK)
    assert len(r.per_step) == len(steps) == len(r.per_step_breakdown)
    for value, row in zip(r.per_step, r.per_step_breakdown):
        assert math.isclose(value, sum(row.values()), abs_tol=1e-9)
    assert math.isclose(r.total, sum(r.per_step), abs_tol=1e-9)
    for k, v in r.breakdown.items():
        assert math.isclose(v, sum(row.get(k, 0.0) for row in r.per_step_breakdown), abs_tol=1e-9)
    dense_total = r.total - sum(r.breakdown[c] for c in ("resolved",))
    assert -0.5 - 1e-9 <= dense_total <= 0.5 + 1e-9
    if r.outcome_voided:
        assert r.breakdown["resolved"] == 0.0
    if mode == "none":
        assert r.per_step[:-1] == [0.0] * (len(steps) - 1)


@settings(max_examples=40, deadline=None)
@given(_episode)
def test_potential_mode_return_equals_outcome_when_unclipped(steps):
    spec = RewardSpec.from_dict({"shaping": "potential", "clip": {"dense_total": None}})
    r = compute_episode_rewards(spec, steps, TASK)
    assert math.isclose(r.total, r.breakdown["resolved"], abs_tol=1e-9)


@settings(max_examples=40, deadline=None)
@given(_episode, st.sampled_from(["dense", "potential"]))
def test_rewards_of_a_prefix_match_the_full_episode(steps, mode):
    """What an env reports per step (prefix, terminal=False) is what the learner later recomputes."""
    spec = RewardSpec.from_dict({"shaping": mode, "clip": {"step": [-0.1, 0.1]}})
    full = compute_episode_rewards(spec, steps, TASK)
    for t in range(len(steps) - 1):
        prefix = compute_episode_rewards(spec, steps[: t + 1], TASK, terminal=False)
        assert prefix.per_step[-1] == pytest.approx(full.per_step[t], abs=1e-12)
        assert prefix.per_step_breakdown[-1] == pytest.approx(full.per_step_breakdown[t], abs=1e-12)
        assert prefix.breakdown["resolved"] == 0.0


def test_non_terminal_prefix_pays_no_outcome():
    r = compute_episode_rewards(RewardSpec.default(), [{"verification": RESOLVED}], TASK, terminal=False)
    assert r.total == 0.0 and r.per_step_breakdown[0]["resolved"] == 0.0
