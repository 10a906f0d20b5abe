"""benchmarks/kernels.py and benchmarks/learner_gpu.py: their pure pieces, and each script's `--smoke` run end
to end on the CPU (tiny config, Triton kernels under the interpreter), as the GPU run will go through them."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from m2rl.benchmarks import learner_gpu
from m2rl.benchmarks.kernels import base_name, bind, relative_error, smoke_config
from m2rl.rl.learner import LearnerConfig

HAS_TRITON = importlib.util.find_spec("triton") is not None


def run_smoke(module: str) -> tuple[str, dict]:
    """Run `python -m module --smoke` in its own process (Triton's interpreter must be on before Triton is
    first imported); (stdout, the JSON of its last line)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the script turns it on itself
    proc = subprocess.run([sys.executable, "-m", module, "--smoke"], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(proc.stdout.strip().splitlines()[-1])


# ---- pure pieces --------------------------------------------------------------------------------------
def test_bind_passes_inputs_by_name_without_shape_suffix_and_keeps_defaults() -> None:
    def op(x_TD, weight_D, eps=1e-6, scale=2.0, *, fused=True):
        return x_TD, weight_D, eps, scale, fused

    assert base_name("x_TD") == "x" and base_name("lm_head_weight") == "lm_head_weight"
    assert bind(op, {"x": 1, "weight": 2}) == (1, 2)  # trailing defaults left to the function
    assert bind(op, {"x": 1, "weight": 2, "scale": 3, "fused": False}) == (1, 2, 1e-6, 3)  # keyword-only: default
    with pytest.raises(TypeError, match="weight_D"):
        bind(op, {"x": 1})


def test_relative_error_ignores_top_k_order_but_not_a_wrong_expert() -> None:
    weights = torch.tensor([[0.7, 0.3], [0.6, 0.4]])
    experts = torch.tensor([[3, 1], [0, 2]])
    swapped = (weights.flip(-1), experts.flip(-1))
    assert relative_error(swapped, (weights, experts)) == 0.0
    wrong = (weights, torch.tensor([[3, 1], [0, 5]]))
    assert relative_error(wrong, (weights, experts)) > 0.1


def test_model_flops_count_causal_attention_between_tokens_of_a_row() -> None:
    c = smoke_config()
    n = 100
    # Splitting a row of 2n tokens in two removes exactly the n x n query-key pairs across the halves:
    # 4 FLOPs per pair and q dim (QK^T and AV) per layer, x3 forward+backward.
    across = learner_gpu.model_flops(c, [2 * n]) - learner_gpu.model_flops(c, [n, n])
    assert across == pytest.approx(3 * 4 * c.num_hidden_layers * c.q_dim * n * n)


@pytest.mark.parametrize(("durations", "times", "note"), [
    ([5.0] + [0.1] * 4, [0.1] * 3, ""),  # a slow first step (compiling) is free: the whole schedule runs
    ([5.0, 6.0, 6.0], [6.0, 6.0], "2 steps timed after 1 warm-up (15 s budget)"),  # a third would end at 18 s
    ([100.0], [], "not timed: the first step took 100 s (limit 90 s)"),
])
def test_time_steps_fits_the_schedule_to_the_budget(monkeypatch: pytest.MonkeyPatch, durations: list[float],
                                                    times: list[float], note: str) -> None:
    clock = [0.0]
    left = list(durations)

    def fake_timed(step: object, device: str) -> float:
        clock[0] += left[0]
        return left.pop(0)

    monkeypatch.setattr(learner_gpu, "timed", fake_timed)
    monkeypatch.setattr(learner_gpu.time, "perf_counter", lambda: clock[0])
    got = learner_gpu.time_steps(lambda: None, "cpu", warmup=2, steps=3, budget_s=15.0, first_step_limit_s=90.0)
    assert got == (times, note) and not left


# ---- the scripts, end to end ---------------------------------------------------------------------------
def test_kernels_smoke_runs_every_registered_implementation_and_matches_the_reference() -> None:
    stdout, result = run_smoke("m2rl.benchmarks.kernels")
    rows = result["rows"]
    impls = {op: {r["implementation"] for r in rows if r["op"] == op} for op in {r["op"] for r in rows}}
    assert {"moe_experts", "rms_norm"} <= set(impls) and {"torch", "grouped_mm"} <= impls["moe_experts"]
    if HAS_TRITON:
        assert all("triton" in names for names in impls.values()), impls
    for r in rows:
        assert math.isfinite(r["ms"]) and r["ms"] > 0 and not r["note"].startswith(("error", "skipped")), r
        assert r["rel_err"] < 1e-4, r  # fp32: every implementation computes what the torch one does
    assert {(r["op"], r["mode"]) for r in rows} == {(op, mode) for op in impls for mode in ("fwd", "fwd+bwd")}
    assert "| op | impl | mode |" in stdout


def test_learner_smoke_times_every_row_on_the_same_weights_as_transformers() -> None:
    stdout, result = run_smoke("m2rl.benchmarks.learner_gpu")
    ours, theirs = map(float, re.search(r"m2rl (-?[\d.]+), transformers (-?[\d.]+)", stdout).groups())
    assert abs(ours - theirs) < 1e-3  # the same model under both
    rows = {(r["implementation"], r["layout"]): r for r in result["rows"]}
    packing = "packing" in {f.name for f in dataclasses.fields(LearnerConfig)}
    expected = {("transformers", "full"), ("transformers", "padded")} | {
        (f"m2rl {impl}", layout) for impl in ("torch", "fast_torch", *(("triton",) if HAS_TRITON else ()), "default")
        for layout in ("full", "padded", "packed")}
    assert set(rows) == expected
    for (name, layout), r in rows.items():
        if layout == "packed" and not packing:
            assert r["note"].startswith("skipped"), r
            continue
        assert math.isfinite(r["step_ms"]) and r["steps_timed"] >= 1 and not r["note"].startswith("error"), r
        assert r["tok_per_s"] == pytest.approx(r["tokens"] / (r["step_ms"] / 1e3))
    padded, packed = rows[("m2rl torch", "padded")], rows[("m2rl torch", "packed")]
    if packing:  # the same rows: packed computes their real tokens, padded rows x the longest
        assert packed["tokens"] == packed["padded_tokens"] == padded["tokens"] <= padded["padded_tokens"]
    assert rows[("transformers", "full")]["vs_transformers"] == 1.0
