"""Learner: micro-batch gradient accumulation equals the one-piece gradient, updates, metrics, options."""

from __future__ import annotations

import copy
import math

import m2rl.rl.logprobs as logprobs_module
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from m2rl.config import ConfigError, from_dict
from m2rl.rl.learner import Learner, LearnerConfig, RolloutBatch, pack_micro_batches
from m2rl.rl.logprobs import generic_token_logprobs, policy_token_logprobs
from m2rl.rl.losses import LossConfig, policy_loss
from m2rl.rl.lr_schedule import LRScheduleConfig, lr_multiplier
from rl_test_doubles import TinyCausalLM, random_batch


def manual_logprobs(model, ids):
    logits = model(ids)
    logp = F.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1)


def grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


# ------------------------------------------------------------------------------------------ logprobs


def test_generic_logprobs_match_log_softmax_and_are_chunk_invariant():
    torch.manual_seed(0)
    model = TinyCausalLM()
    ids = torch.randint(0, 13, (3, 9))
    expected = manual_logprobs(model, ids)
    for chunk in (1, 3, 100):
        lp, ent = generic_token_logprobs(model, ids, return_entropy=True, chunk_size=chunk)
        torch.testing.assert_close(lp, expected)
        p = F.softmax(model(ids)[:, :-1].double(), -1)
        torch.testing.assert_close(ent[:, 1:], -(p * p.log()).sum(-1))
        assert torch.all(lp[:, 0] == 0) and torch.all(ent[:, 0] == 0)

    class NotAnLM(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids.double()  # [B, T], not [B, T, V]

    with pytest.raises(ValueError, match="logits"):
        generic_token_logprobs(NotAnLM(), torch.zeros(1, 2, dtype=torch.long))


def test_m2_models_dispatch_to_model_logprobs(monkeypatch):
    calls = []

    def fake_m2(
        model, input_ids, attention_mask=None, return_entropy=False, chunk_size=1024, lm_head_fp32=True,
        target_mask=None,
    ):
        calls.append((chunk_size, lm_head_fp32, target_mask))
        return torch.zeros(input_ids.shape)

    monkeypatch.setattr(logprobs_module, "_is_m2_model", lambda model: True)
    monkeypatch.setattr(logprobs_module, "_m2_token_logprobs", lambda: fake_m2)
    mask = torch.tensor([[0, 1, 1, 0]])
    policy_token_logprobs(TinyCausalLM(), torch.zeros(1, 4, dtype=torch.long), chunk_size=7, target_mask=mask)
    assert calls == [(7, True, mask)]


# ------------------------------------------------------------------------------------- micro-batches


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 50), max_size=20), st.integers(1, 120))
def test_packing_covers_rows_and_respects_budget(lengths, budget):
    groups = pack_micro_batches(lengths, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) == 1 or len(g) * max(lengths[i] for i in g) <= budget


@pytest.mark.parametrize("kind", ["cispo", "grpo", "gspo"])
def test_micro_batched_gradients_equal_single_batch_gradients(kind):
    torch.manual_seed(0)
    batch = random_batch(torch.Generator().manual_seed(1), rows=7, max_len=12)
    base = TinyCausalLM()
    small_budget = 14  # rows are 4..12 tokens: 1-3 rows per micro-batch
    assert len(pack_micro_batches(batch.lengths(), small_budget)) >= 4
    loss_cfg = LossConfig(kind=kind, eps_low=0.2, eps_high=0.2)
    results = []
    for budget in (10_000, small_budget):
        model = copy.deepcopy(base)
        learner = Learner(
            model, LearnerConfig(micro_batch_tokens=budget, loss=loss_cfg, compute_entropy=False)
        )
        metrics = learner.compute_gradients(batch)
        results.append((grads(model), metrics["loss"]))
    # oracle: the loss of the whole padded batch in one piece
    model = copy.deepcopy(base)
    loss, _ = policy_loss(
        loss_cfg,
        manual_logprobs(model, batch.input_ids),
        batch.old_logprobs,
        batch.advantages,
        batch.loss_mask.double(),
    )
    loss.backward()
    for got, got_loss in results:
        assert got_loss == pytest.approx(loss.item(), rel=1e-10)
        for g, ref in zip(got, grads(model)):
            torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)


def test_padding_content_does_not_change_gradients():
    torch.manual_seed(0)
    batch = random_batch(torch.Generator().manual_seed(3), rows=4)
    noisy = copy.deepcopy(batch)
    pad = noisy.attention_mask == 0
    noisy.input_ids[pad] = 7
    noisy.advantages[pad] = 100.0  # outside the loss mask: must be ignored
    base = TinyCausalLM()
    out = []
    for b in (batch, noisy):
        model = copy.deepcopy(base)
        Learner(model, LearnerConfig(micro_batch_tokens=20)).compute_gradients(b)
        out.append(grads(model))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------- update


def test_update_metrics_steps_and_first_step_is_on_policy():
    torch.manual_seed(0)
    batch = random_batch(torch.Generator().manual_seed(4), rows=8)
    learner = Learner(TinyCausalLM(), LearnerConfig(lr=1e-3, mini_batches=1, epochs=1))
    m = learner.update(batch)
    for key in (
        "loss",
        "clip_frac_low",
        "clip_frac_high",
        "is_weight_mean",
        "is_weight_max",
        "is_weight_min",
        "entropy",
        "approx_kl",
        "logp_gap_gen_learner",
        "grad_norm",
        "tokens_per_s",
        "lr",
    ):
        assert key in m and math.isfinite(m[key]), key
    # pi_old recomputed by the learner before the step: the ratio is exactly 1 on the first pass
    assert m["is_weight_mean"] == pytest.approx(1.0) and m["approx_kl"] == pytest.approx(0.0, abs=1e-12)
    learner2 = Learner(TinyCausalLM(), LearnerConfig(lr=1e-3, mini_batches=2, epochs=3))
    m2 = learner2.update(batch)
    assert learner2.optimizer_steps == 6 and m2["optimizer_steps"] == 6
    assert m2["approx_kl"] > 0  # later passes are off-policy


def test_logprob_gap_metric_is_mean_abs_difference_on_loss_tokens():
    torch.manual_seed(0)
    model = TinyCausalLM()
    batch = random_batch(torch.Generator().manual_seed(5), rows=5)
    learner_lp = manual_logprobs(model, batch.input_ids).detach()
    mask = batch.loss_mask.double()
    expected = ((batch.old_logprobs - learner_lp).abs() * mask).sum() / mask.sum()
    m = Learner(model, LearnerConfig(lr=0.0)).update(batch)
    assert m["logp_gap_gen_learner"] == pytest.approx(expected.item(), rel=1e-9)


def test_updates_raise_logprob_of_positive_advantage_tokens():
    torch.manual_seed(0)
    model = TinyCausalLM()
    batch = random_batch(torch.Generator().manual_seed(6), rows=6)
    batch.advantages = batch.loss_mask.double() * torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])[:, None]
    batch.old_logprobs = manual_logprobs(model, batch.input_ids).detach() * batch.loss_mask
    mask = batch.loss_mask.double()
    before = (manual_logprobs(model, batch.input_ids) * mask).sum(-1).detach()
    learner = Learner(model, LearnerConfig(lr=3e-2, epochs=4, mini_batches=2))
    for _ in range(3):
        learner.update(batch)
    after = (manual_logprobs(model, batch.input_ids) * mask).sum(-1).detach()
    assert torch.all((after - before)[0::2] > 0) and torch.all((after - before)[1::2] < 0)


def test_grad_norm_metric_and_tis_option():
    torch.manual_seed(0)
    base = TinyCausalLM()
    batch = random_batch(torch.Generator().manual_seed(7), rows=4)
    model = copy.deepcopy(base)
    learner = Learner(model, LearnerConfig(shuffle=False))
    learner.compute_gradients(batch, old_logprobs=learner.recompute_logprobs(batch))
    expected = torch.sqrt(sum((g**2).sum() for g in grads(model)))
    m = Learner(copy.deepcopy(base), LearnerConfig(shuffle=False, max_grad_norm=1e-3)).update(batch)
    assert m["grad_norm"] == pytest.approx(expected.item(), rel=1e-9)
    m = Learner(copy.deepcopy(base), LearnerConfig(loss=LossConfig(tis=True, tis_cap=1.5))).update(batch)
    assert 0 < m["tis_weight_mean"] <= 1.5
    with pytest.raises(ValueError, match="recompute_old_logprobs"):
        LearnerConfig(recompute_old_logprobs=False, loss=LossConfig(tis=True))


def test_bf16_autocast_runs_and_batch_without_loss_tokens_skips_step():
    torch.manual_seed(0)
    model = TinyCausalLM(dtype=torch.float32)
    batch = random_batch(torch.Generator().manual_seed(8), rows=4)
    m = Learner(model, LearnerConfig(bf16=True, lr=1e-3)).update(batch)
    assert math.isfinite(m["loss"]) and m["skipped_steps"] == 0
    empty = copy.deepcopy(batch)
    empty.loss_mask = torch.zeros_like(batch.loss_mask)
    before = [p.detach().clone() for p in model.parameters()]
    m = Learner(model, LearnerConfig(lr=1e-3, weight_decay=0.1)).update(empty)
    assert m["skipped_steps"] == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_gradient_checkpointing_flag_and_bad_batches():
    model = TinyCausalLM()
    Learner(model, LearnerConfig(gradient_checkpointing=True))
    assert model.gradient_checkpointing is True

    class NoCheckpointing(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

    with pytest.raises(ValueError, match="gradient_checkpointing"):
        Learner(NoCheckpointing(), LearnerConfig(gradient_checkpointing=True))
    learner = Learner(TinyCausalLM())
    batch = random_batch(torch.Generator().manual_seed(9), rows=2)
    with pytest.raises(ValueError, match="missing"):
        learner.update({"input_ids": batch.input_ids})
    with pytest.raises(ValueError, match="advantages has shape"):
        learner.update(
            {
                "input_ids": batch.input_ids,
                "loss_mask": batch.loss_mask,
                "old_logprobs": batch.old_logprobs,
                "advantages": batch.advantages[:, :3],
            }
        )
    bad = copy.deepcopy(batch)
    bad.old_logprobs[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        learner.update(bad)
    assert isinstance(RolloutBatch.from_mapping(vars(batch)), RolloutBatch)


def test_lr_schedules():
    const = LRScheduleConfig(kind="constant", warmup_steps=4)
    assert [lr_multiplier(s, const) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    cos = LRScheduleConfig(kind="warmup_cosine", warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    got = [lr_multiplier(s, cos) for s in range(8)]
    assert got[:2] == pytest.approx([0.5, 1.0])
    assert got[2] == pytest.approx(1.0) and got[4] == pytest.approx(0.1 + 0.9 * 0.5)
    assert got[6] == pytest.approx(0.1) and got[7] == pytest.approx(0.1)
    learner = Learner(TinyCausalLM(), LearnerConfig(lr=1.0, lr_schedule=const))
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="total_steps"):
        LRScheduleConfig(kind="warmup_cosine", warmup_steps=5, total_steps=5)


def test_config_from_yaml_style_mappings():
    # YAML mappings become a LearnerConfig through m2rl.config, the one loader (keys and types checked there).
    cfg = from_dict(LearnerConfig, {
        "loss": {"kind": "dapo"}, "lr_schedule": {"kind": "warmup_cosine", "total_steps": 10}, "betas": [0.9, 0.95]
    })
    assert cfg.loss.eps == (0.2, 0.28) and cfg.lr_schedule.total_steps == 10 and cfg.betas == (0.9, 0.95)
    with pytest.raises(ConfigError, match=r"unknown config key 'loss\.name' \(in learner\.yaml\); known keys here: "
                                          r"aggregation, eps_high, eps_low, kind"):
        from_dict(LearnerConfig, {"loss": {"name": "grpo"}}, source="learner.yaml")
    with pytest.raises(ConfigError, match=r"invalid config \(in learner\.yaml\) at 'learner\.': .*micro_batch_tokens"):
        from_dict(LearnerConfig, {"micro_batch_tokens": 0}, source="learner.yaml", prefix="learner.")
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        LearnerConfig(micro_batch_tokens=0)
    learner = Learner(TinyCausalLM())
    group = learner.optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.95) and group["eps"] == 1e-15
