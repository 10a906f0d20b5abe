"""Curriculum by solve rate, context-length stages, batch-size warm-up, multi-stage pipeline config."""

from __future__ import annotations

import random

import pytest
from m2rl.rl.schedules import (
    BatchSizeWarmup,
    ContextLengthSchedule,
    CurriculumConfig,
    DifficultyCurriculum,
    PipelineConfig,
    StageConfig,
)


def measured(rates: dict[int, float], config: CurriculumConfig, attempts: int = 20) -> DifficultyCurriculum:
    cur = DifficultyCurriculum(rates, config)
    for task, rate in rates.items():
        for _ in range(attempts):
            cur.update(task, rate)
    return cur


def test_band_tasks_first_then_harder_then_easy():
    rates = {i: i / 10 for i in range(10)}  # true solve rates 0.0 .. 0.9
    cur = measured(rates, CurriculumConfig())
    assert {t: cur.tier(t) for t in rates} == {
        0: "hard",
        1: "hard",
        2: "band",
        3: "band",
        4: "band",
        5: "band",
        6: "band",
        7: "easy",
        8: "easy",
        9: "easy",
    }
    rng = random.Random(0)
    assert set(cur.sample(5, rng)) == {2, 3, 4, 5, 6}
    draw = cur.sample(8, rng)
    assert set(draw[:5]) == {2, 3, 4, 5, 6} and draw[5:] == [1, 0, 7]  # hard nearest the band, then easy
    assert len(cur.sample(25, rng)) == 25


def test_reestimated_rates_move_the_draw_to_harder_tasks():
    rates = {i: i / 10 for i in range(10)}
    config = CurriculumConfig(decay=0.8)
    cur = measured(rates, config)
    # the policy improved: everything is now solved 0.3 more often
    for _ in range(30):
        for task, rate in rates.items():
            cur.update(task, min(1.0, rate + 0.3))
    assert set(cur.sample(4, random.Random(1))) == {0, 1, 2, 3}  # true rates now 0.3 .. 0.6
    assert cur.tier(5) == "easy"


def test_unknown_tasks_are_explored_and_state_round_trips():
    rates = {i: i / 10 for i in range(10)}
    cur = measured(rates, CurriculumConfig(explore_fraction=0.2))
    cur2 = DifficultyCurriculum(list(rates) + ["new_a", "new_b"], CurriculumConfig(explore_fraction=0.2))
    cur2.load_state_dict({k: {**v, "new_a": 0, "new_b": 0} for k, v in cur.state_dict().items()})
    assert cur2.tier("new_a") == "unknown"
    draw = cur2.sample(5, random.Random(0))
    assert len([t for t in draw if str(t).startswith("new")]) == 1  # ceil(0.2 * 5)
    assert set(draw) - {"new_a", "new_b"} <= {2, 3, 4, 5, 6}
    fresh = DifficultyCurriculum(rates)
    assert (
        all(fresh.tier(t) == "unknown" for t in rates) and len(set(fresh.sample(10, random.Random(0)))) == 10
    )
    assert cur.stats()["curriculum/band_tasks"] == 5


def test_solve_rate_estimate_converges_on_bernoulli_outcomes():
    rng = random.Random(3)
    cur = DifficultyCurriculum(["t"], CurriculumConfig())
    for _ in range(2000):
        cur.update("t", float(rng.random() < 0.35))
    assert cur.solve_rate("t") == pytest.approx(0.35, abs=0.03)


def test_curriculum_bad_input():
    with pytest.raises(ValueError, match="target_low"):
        CurriculumConfig(target_low=0.7, target_high=0.6)
    cur = DifficultyCurriculum(["a"])
    with pytest.raises(KeyError, match="unknown task"):
        cur.update("b", 1.0)
    with pytest.raises(ValueError, match="score"):
        cur.update("a", 2.0)
    with pytest.raises(ValueError, match="at least one task"):
        DifficultyCurriculum([])


def test_context_length_stages():
    sched = ContextLengthSchedule(stages=[[0, 4096], [100, 16384], [300, 65536]])
    assert [sched.max_tokens(s) for s in (0, 99, 100, 299, 300, 10_000)] == [
        4096,
        4096,
        16384,
        16384,
        65536,
        65536,
    ]
    with pytest.raises(ValueError, match="step 0"):
        ContextLengthSchedule(stages=[(5, 100)])
    with pytest.raises(ValueError, match="increase"):
        ContextLengthSchedule(stages=[(0, 100), (10, 200), (10, 300)])


def test_batch_size_warmup():
    warm = BatchSizeWarmup(start_size=8, target_size=64, warmup_steps=7, multiple_of=8)
    assert [warm.batch_size(s) for s in range(9)] == [8, 16, 24, 32, 40, 48, 56, 64, 64]
    assert BatchSizeWarmup(start_size=4, target_size=10, warmup_steps=0).batch_size(0) == 10
    with pytest.raises(ValueError, match="multiple"):
        BatchSizeWarmup(start_size=8, target_size=60, multiple_of=8)


def test_pipeline_stages_and_validation():
    pipe = PipelineConfig.from_dict(
        {
            "stages": [
                {"name": "sft_short", "kind": "sft", "steps": 100, "max_tokens": 4096},
                {"name": "sft_long", "kind": "sft", "steps": 50, "max_tokens": 32768},
                {
                    "name": "rl_short",
                    "kind": "rl",
                    "steps": 200,
                    "max_tokens": 8192,
                    "overrides": {"learner.lr": 1e-6},
                },
                {"name": "rl_long", "kind": "rl", "steps": 100, "max_tokens": 65536},
            ]
        }
    )
    assert pipe.total_steps == 450
    assert pipe.stage_at(0)[1].name == "sft_short"
    assert pipe.stage_at(149)[0] == 1 and pipe.stage_at(149)[2] == 49
    index, stage, local = pipe.stage_at(150)
    assert (index, stage.name, local, stage.overrides) == (2, "rl_short", 0, {"learner.lr": 1e-6})
    assert pipe.stage_at(1000)[1].name == "rl_long"
    with pytest.raises(ValueError, match="kind"):
        PipelineConfig(stages=[StageConfig("x", "ppo", 1, 10)])
    with pytest.raises(ValueError, match="unique"):
        PipelineConfig(stages=[StageConfig("x", "rl", 1, 10), StageConfig("x", "sft", 1, 10)])
    with pytest.raises(ValueError, match="missing keys"):
        PipelineConfig.from_dict({"stages": [{"name": "x", "kind": "rl"}]})
    with pytest.raises(ValueError, match="steps"):
        PipelineConfig.from_dict({"stages": [{"name": "x", "kind": "rl", "steps": 0, "max_tokens": 5}]})
    with pytest.raises(ValueError, match="at least one stage"):
        PipelineConfig(stages=[])
