"""How the learner combines a metric over micro-batches and optimizer steps: named per metric."""

from __future__ import annotations

import pytest
from m2rl.rl.learner import METRIC_EXTREMES, _MetricMean


def test_extremes_are_named_and_everything_else_is_a_weighted_mean() -> None:
    """Before: any key ending in _max or _min was reduced as an extreme, whatever it measured."""
    acc = _MetricMean()
    acc.add({"ratio_max": 1.5, "ratio_min": 0.5, "window_max": 2.0, "entropy": 1.0}, weight=1.0)
    acc.add({"ratio_max": 1.2, "ratio_min": 0.7, "window_max": 4.0, "entropy": 4.0}, weight=3.0)
    out = acc.result()
    assert out["ratio_max"] == 1.5 and out["ratio_min"] == 0.5
    assert out["window_max"] == pytest.approx((2.0 + 3 * 4.0) / 4)  # not in METRIC_EXTREMES: a mean
    assert out["entropy"] == pytest.approx((1.0 + 3 * 4.0) / 4)


def test_every_extreme_metric_the_losses_report_is_named() -> None:
    import torch
    from m2rl.rl.losses import LossConfig, policy_loss

    logprobs = torch.tensor([[-1.0, -0.5, -2.0]])
    old = torch.tensor([[-1.2, -0.4, -1.0]])
    mask = torch.ones(1, 3)
    for kind in ("cispo", "grpo", "dapo", "gspo"):
        _, metrics = policy_loss(LossConfig(kind=kind), logprobs, old, torch.ones(1, 3), mask,
                                 generator_logprobs=old)
        extremes = {k for k in metrics if k.endswith(("_max", "_min"))}
        assert extremes <= set(METRIC_EXTREMES), (kind, extremes - set(METRIC_EXTREMES))


def test_the_ratio_percentiles_are_those_of_every_loss_token() -> None:
    """One optimizer step against the generator's log-probs: the ratios are exp(learner - generator) before the
    step, so the reported percentiles are numpy's of those tokens (the mean and extremes alone hide the tails)."""
    import numpy as np
    import torch
    from m2rl.rl.learner import Learner, LearnerConfig
    from m2rl.rl.logprobs import policy_token_logprobs
    from rl_test_doubles import TinyCausalLM, random_batch

    torch.manual_seed(0)
    model = TinyCausalLM()
    batch = random_batch(torch.Generator().manual_seed(1), rows=8, max_len=16)
    with torch.no_grad():
        current = policy_token_logprobs(model, batch.input_ids, attention_mask=batch.attention_mask)
    mask = batch.loss_mask.bool()
    expected = np.percentile(torch.exp(current - batch.old_logprobs)[mask].numpy(), [1, 99])
    learner = Learner(model, LearnerConfig(lr=1e-3, recompute_old_logprobs=False, packing=False,
                                           compute_entropy=False))
    out = learner.update(batch)
    assert out["ratio_p1"] == pytest.approx(expected[0], rel=1e-6)
    assert out["ratio_p99"] == pytest.approx(expected[1], rel=1e-6)
    assert out["ratio_min"] <= out["ratio_p1"] <= out["ratio_p99"] <= out["ratio_max"]
