"""The pure pieces of benchmarks/cispo_vs_baselines.py and the single-turn reward of the TRL peer (no training)."""

from __future__ import annotations

import math
import random
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from m2rl.agent.format import render
from m2rl.benchmarks.cispo_vs_baselines import (
    QUICK,
    Budget,
    ClipStats,
    RunResult,
    eval_curve,
    format_steps,
    format_table,
    make_budget,
    mean_std,
    merge_records,
    offpolicy_metrics,
    parse_args,
    parse_custom,
    regime_overrides,
    steps_to_target,
    summarize,
    token_ratios,
)
from m2rl.benchmarks.trl_single_turn import (
    SingleTurnReward,
    TRLSettings,
    arith_value,
    printed_value,
    single_turn_reward,
    single_turn_tasks,
)
from m2rl.envs.experts import action_text
from m2rl.envs.tasks.python_tasks import PythonTaskSet, arith_expression, eval_arith
from m2rl.model import M2Tokenizer

REASONING = "I will compute this with the python tool."


def completion(code: str, name: str = "python") -> str:
    """What the warm-started policy writes as its first turn (the expert's rendering, ending in `[e~[`)."""
    return action_text([(name, {"code": code} if name == "python" else {"answer": code})], reasoning=REASONING)


@pytest.fixture(scope="module")
def tasks_and_tools() -> tuple[list, list]:
    return single_turn_tasks("m2rl/Python-v0", "test", 6, ["arith"])


# ------------------------------------------------------------------------------------------ steps to target


def test_steps_to_target_is_the_first_eval_reaching_it() -> None:
    curve = [(0, 0.25), (10, 0.4), (20, 0.5), (30, 0.45), (40, 0.6)]
    assert steps_to_target(curve, 0.45) == 20
    assert steps_to_target(curve, 0.5) == 20  # reaching counts, exceeding is not needed
    assert steps_to_target(curve, 0.6) == 40
    assert steps_to_target(curve, 0.2) == 0  # already there at the start
    assert steps_to_target(curve, 0.61) is None
    assert steps_to_target([], 0.1) is None


def test_eval_curve_reads_eval_records_in_step_order() -> None:
    records = [
        {"step": 0, "eval/success_rate": 0.25},
        {"step": 1, "train/success_rate": 0.9, "learner/loss": 0.1},
        {"step": 20, "eval/success_rate": 0.5},
        {"step": 10, "eval/success_rate": 0.375, "train/success_rate": 0.3},
    ]
    assert eval_curve(records) == [(0, 0.25), (10, 0.375), (20, 0.5)]


def test_summary_over_seeds_and_the_steps_column() -> None:
    runs = [
        RunResult("cispo", 0, [(0, 0.25), (10, 0.5), (20, 0.5)], 0.5, 100.0, 20),
        RunResult("cispo", 1, [(0, 0.25), (10, 0.25), (20, 0.5)], 0.25, 120.0, 19),
        RunResult("cispo", 2, [(0, 0.25), (10, 0.25), (20, 0.25)], 0.0, 110.0, 18),
    ]
    s = summarize(runs, target=0.45)
    assert s["steps_to_target"] == [10, 20, None]
    assert s["reached"] == 2 and s["steps_to_target_mean"] == 15.0
    assert s["initial_mean"] == 0.25
    assert s["final_mean"] == pytest.approx(1.25 / 3)
    assert s["final_std"] == pytest.approx(math.sqrt(((0.5 - 1.25 / 3) ** 2 * 2 + (0.25 - 1.25 / 3) ** 2) / 2))
    assert s["wall_s_mean"] == 110.0 and s["optimizer_steps_mean"] == 19.0
    assert format_steps(s) == "15.0 (2/3 reached)"
    assert format_steps(summarize(runs[2:], target=0.45)) == "not reached (0/1)"
    table = format_table({"cispo": s}, 0.45, initial_single_turn=0.125)
    assert "| cispo | 0.250 | 0.417 ± 0.144 | 15.0 (2/3 reached) | 0.250 ± 0.250 | 19.0 | 110 ± 10 |" in table
    assert mean_std([2.0]) == (2.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))


def test_budget_and_arguments() -> None:
    assert make_budget(parse_args(["--quick"])) == QUICK
    budget = make_budget(parse_args(["--steps", "7", "--group-size", "4"]))
    assert (budget.steps, budget.group_size, budget.prompts) == (7, 4, Budget().prompts)
    overrides = budget.overrides(init=Path("/ckpt"), run_root=Path("/r"), name="dapo-seed1", seed=1, kind="dapo")
    assert "learner.loss.kind=dapo" in overrides and "seed=1" in overrides
    # constant batch = prompts x G for every variant
    assert f"rollout.batch_warmup.start_size={budget.prompts * 4}" in overrides
    assert f"rollout.batch_warmup.target_size={budget.prompts * 4}" in overrides
    # held-out success is avg@k at the training temperature, as in the main job
    assert "eval.greedy=false" in overrides and f"eval.samples_per_task={Budget().eval_samples}" in overrides
    assert make_budget(parse_args(["--eval-samples", "2"])).eval_samples == 2
    for bad in (["--variants", "cispo,ppo"], ["--seeds", "0"], ["--steps", "-1"], ["--target", "1.5"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    with pytest.raises(ValueError, match="group size"):
        Budget(group_size=1)


# ------------------------------------------------------------------------------------------ off-policy regimes


def test_clip_stats_counts_clipped_tokens_by_generator_probability() -> None:
    # bins [0,.01) [.01,.1) [.1,.5) [.5,.9) [.9,1]; one token per bin in row 0, row 1 masked after 2 tokens
    probs = torch.tensor([[0.005, 0.05, 0.3, 0.7, 0.95], [0.95, 0.3, 0.5, 0.5, 0.5]])
    ratio = torch.tensor([[3.0, 0.5, 1.0, 1.1, 1.0], [0.7, 1.5, 9.0, 9.0, 9.0]])
    adv = torch.tensor([1.0, -1.0])  # per sequence, broadcast
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    stats = ClipStats()
    stats.add(ratio, probs.log(), adv, mask, low=0.8, high=1.2)
    out = stats.result()
    assert out["tokens"] == 7 and out["tokens_per_bin"] == [1, 1, 2, 1, 2]
    # clipped: 3.0 (high, A>0: gradient removed), 0.5 (low, A>0: kept), 0.7 (low, A<0: removed), 1.5 (high, A<0: kept)
    assert out["clipped_per_bin"] == [1, 1, 1, 0, 1]
    assert out["clip_frac_low"] == pytest.approx(2 / 7) and out["clip_frac_high"] == pytest.approx(2 / 7)
    assert out["zeroed_frac"] == pytest.approx(2 / 7)
    assert out["gen_prob_mean_clipped"] == pytest.approx((0.005 + 0.05 + 0.95 + 0.3) / 4)
    assert out["gen_prob_mean_all"] == pytest.approx((0.005 + 0.05 + 0.3 + 0.7 + 0.95 + 0.95 + 0.3) / 7)
    assert out["clip_rate_per_bin"] == pytest.approx([1.0, 1.0, 0.5, 0.0, 0.5])
    stats.add(ratio, probs.log(), adv, mask, low=0.8, high=1.2)  # accumulates
    assert stats.result()["tokens"] == 14 and stats.result()["clip_frac"] == pytest.approx(4 / 7)
    assert ClipStats().result()["gen_prob_mean_clipped"] is None


def test_token_ratios_per_token_and_gspo_sequence_ratio() -> None:
    old = torch.zeros(1, 3)
    new = torch.tensor([[0.2, -0.2, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert torch.allclose(token_ratios("cispo", new, old, mask)[0, :2], torch.exp(new[0, :2]))
    assert torch.allclose(token_ratios("gspo", new, old, mask), torch.ones(1, 3))  # geometric mean over 2 tokens


def test_regimes_and_custom_rows() -> None:
    assert regime_overrides("onpolicy") == []
    assert regime_overrides("minibatch") == ["learner.mini_batches=4", "learner.epochs=2"]
    assert "rollout.max_staleness=3" in regime_overrides("stale-3")
    assert "learner.recompute_old_logprobs=false" in regime_overrides("bf16-gen")
    for bad in ("stale-0", "stale-5", "stale-x", "offpolicy"):
        with pytest.raises(ValueError):
            regime_overrides(bad)
    assert parse_custom("cispo-eh0.28:cispo:learner.loss.eps_high=0.28,learner.lr=2.5e-4") == (
        "cispo-eh0.28", "cispo", ["learner.loss.eps_high=0.28", "learner.lr=2.5e-4"])
    assert parse_custom("g:grpo") == ("g", "grpo", [])
    for bad in ("x:ppo:a=1", "x", "x:cispo:eps", "a/b:cispo"):
        with pytest.raises(ValueError):
            parse_custom(bad)
    args = parse_args(["--regime", "onpolicy,minibatch", "--custom", "c:cispo:learner.loss.eps_low=0.2"])
    assert args.custom == [("c", "cispo", ["learner.loss.eps_low=0.2"])]
    with pytest.raises(SystemExit):
        parse_args(["--regime", "minibatch,stale-9"])


def test_merge_records_regroups_runs_of_separate_invocations_under_one_target() -> None:
    def record(variant: str, regime: str, seed: int, curve: list[tuple[int, float]]) -> dict:
        run = RunResult(variant, seed, curve, 0.5, 10.0, 3, {"clip_stats": {"clip_frac": 0.01}}, regime)
        return {"machine": "m", "budget": {"steps": 3}, "init": "/i", "initial_single_turn": 0.25,
                "runs": [{**asdict(run), "initial": run.initial, "final": run.final}]}

    merged = merge_records([record("grpo", "minibatch", 0, [(0, 0.3), (3, 0.6)]),
                            record("cispo", "minibatch", 0, [(0, 0.4), (3, 0.5)]),
                            record("cispo", "minibatch", 1, [(0, 0.3), (3, 0.7)])], target=None)
    assert merged["target"] == pytest.approx(1 / 3 + 0.2)
    assert sorted(merged["summaries"]) == ["minibatch/cispo", "minibatch/grpo"]
    assert merged["summaries"]["minibatch/cispo"]["steps_to_target"] == [None, 3]
    assert merged["summaries"]["minibatch/cispo"]["clip_frac_mean"] == pytest.approx(0.01)
    assert merge_records([record("grpo", "onpolicy", 0, [(0, 0.3)])], target=0.9)["target"] == 0.9


def test_offpolicy_metrics_average_steps_and_keep_extremes() -> None:
    records = [
        {"step": 1, "learner/clip_frac_high": 0.1, "learner/ratio_max": 1.5, "learner/ratio_min": 0.8,
         "learner/loss": 3.0, "eval/success_rate": 0.5},
        {"step": 2, "learner/clip_frac_high": 0.3, "learner/ratio_max": 1.2, "learner/ratio_min": 0.6,
         "rollout/staleness_mean": 1.0},
    ]
    out = offpolicy_metrics(records)
    assert out == pytest.approx({"learner/clip_frac_high": 0.2, "learner/ratio_max": 1.5, "learner/ratio_min": 0.6,
                                 "rollout/staleness_mean": 1.0})


# ------------------------------------------------------------------------------------------ single-turn reward


def test_correct_call_scores_one(tasks_and_tools: tuple[list, list]) -> None:
    tasks, tools = tasks_and_tools
    for task in tasks:
        assert single_turn_reward(completion(f"print({task.expr})"), task.answer, tools) == 1.0
        # whitespace and an equivalent expression print the same number
        squeezed = task.expr.replace(" ", "")
        assert single_turn_reward(completion(f"print({squeezed})\n"), task.answer, tools) == 1.0
        assert single_turn_reward(completion(f"print({task.answer})"), task.answer, tools) == 1.0


def test_wrong_expression_scores_zero(tasks_and_tools: tuple[list, list]) -> None:
    tasks, tools = tasks_and_tools
    for task in tasks:
        assert single_turn_reward(completion(f"print({task.expr} + 1)"), task.answer, tools) == 0.0
        if task.answer != "6":
            assert single_turn_reward(completion("print(6)"), task.answer, tools) == 0.0


@pytest.mark.parametrize("text", [
    "",
    "no reasoning close and no call",
    f"{REASONING}\n</think>\n\nThe answer is 5.[e~[",  # no tool call
    (f"{REASONING}\n</think>\n\n<minimax:tool_call>\n<invoke name=\"python\">\n"
     "<parameter name=\"code\">print(2 + 3)</parameter>\n</invoke>\n"),  # block never closed
    (f"{REASONING}\n</think>\n\n<invoke name=\"python\">\n<parameter name=\"code\">print(2 + 3)</parameter>\n"
     "</invoke>[e~["),  # invoke outside a tool-call block
])
def test_malformed_completion_scores_zero(text: str) -> None:
    assert single_turn_reward(text, "5", None) == 0.0


def test_other_calls_and_code_forms_score_zero() -> None:
    assert single_turn_reward(completion("5", name="submit"), "5", None) == 0.0  # answer without computing
    for code in ["x = 2 + 3\nprint(x)", "print(2 + 3, 1)", "print(2 ** 2 + 1)", "print(10 // 2)",
                 "print(__import__('os').getpid())", "print(2 + 3); print(0)", "print('5')", "print(5.0)",
                 "print(2 +)"]:
        assert single_turn_reward(completion(code), "5", None) == 0.0, code
    with pytest.raises(ValueError, match="integer answer"):
        single_turn_reward(completion("print(5)"), "five", None)


def test_reward_reads_token_ids_with_markers(tasks_and_tools: tuple[list, list]) -> None:
    """TRL's decoded text lost the markers (skip_special_tokens); the reward must decode the ids itself."""
    tokenizer = M2Tokenizer.tiny()
    good, bad = completion("print(7 * 6)"), completion("print(7 * 7)")
    reward = SingleTurnReward(tokenizer, tools=tasks_and_tools[1])
    ids = [tokenizer.encode(good), tokenizer.encode(bad)]
    assert reward(prompts=["p", "p"], completions=["", ""], completion_ids=ids, answer=["42", "42"]) == [1.0, 0.0]


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=10**6))
def test_printed_value_matches_the_task_generators_evaluator(seed: int) -> None:
    expr = arith_expression(random.Random(seed))
    assert arith_value(expr) == eval_arith(expr)
    assert printed_value(f"print({expr})") == eval_arith(expr)


def test_arith_value_rejects_anything_but_integer_arithmetic() -> None:
    assert arith_value("-(3 - 10) * 2") == 14
    for source in ["2 ** 3", "1 / 2", "x + 1", "abs(-1)", "1 if 1 else 2", "'a' * 3", "True + 1", "1e3", "2 +"]:
        assert arith_value(source) is None, source


# ------------------------------------------------------------------------------------------ tasks and TRL config


def test_single_turn_prompts_are_the_envs_first_prompt(tasks_and_tools: tuple[list, list]) -> None:
    tasks, tools = tasks_and_tools
    expected = PythonTaskSet().tasks("test", 6, kinds=("arith",))
    assert [t.task_id for t in tasks] == [t.id for t in expected]
    assert [t.answer for t in tasks] == [str(eval_arith(t.meta["expr"])) for t in expected]
    assert {spec["function"]["name"] for spec in tools} == {"python", "submit"}
    task = expected[0]
    messages = [{"role": "system", "content": PythonTaskSet.system_prompt}, {"role": "user", "content": task.prompt}]
    assert tasks[0].prompt == render(messages, tools=tools, add_generation_prompt=True)
    assert tasks[0].prompt.endswith("]~b]ai\n<think>\n")


def test_grpo_config_gives_trl_our_cap_and_optimizer(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    from m2rl.benchmarks.trl_single_turn import grpo_config

    s = TRLSettings(loss_type="cispo", seed=3, steps=5, prompts_per_step=2, group_size=4, lr=2e-4,
                    max_new_tokens=64, temperature=1.0, epsilon=1.0, epsilon_high=5.0, max_grad_norm=1.0,
                    betas=(0.9, 0.95), adam_eps=1e-15, weight_decay=0.0, threads=1)
    c = grpo_config(s, tmp_path)
    assert (c.loss_type, c.epsilon_high, c.beta, c.num_generations, c.num_iterations) == ("cispo", 5.0, 0.0, 4, 1)
    assert (c.per_device_train_batch_size, c.gradient_accumulation_steps, c.max_steps) == (8, 1, 5)
    assert (c.learning_rate, c.adam_beta2, c.adam_epsilon, c.max_completion_length) == (2e-4, 0.95, 1e-15, 64)
    assert c.use_cpu and not c.bf16 and c.report_to == [] and c.seed == 3


def test_recommended_offpolicy_config_is_the_main_job_with_the_masked_cispo_learner() -> None:
    """configs/train_offpolicy.yaml (benchmarks/results/cispo_offpolicy-2026-11-30.md) changes only the learner."""
    from m2rl.config import load_config, to_dict
    from m2rl.rl.trainer import TrainConfig

    repo = Path(__file__).resolve().parents[2]
    main, off = (load_config(TrainConfig, repo / "configs" / name) for name in ("train.yaml", "train_offpolicy.yaml"))
    assert (off.learner.mini_batches, off.learner.epochs) == (4, 2)
    assert off.learner.loss.kind == "cispo" and off.learner.loss.trust_mask and off.learner.loss.eps == (0.2, 0.28)
    differing = {k for k, v in to_dict(off).items() if to_dict(main)[k] != v}
    assert differing == {"learner"}
