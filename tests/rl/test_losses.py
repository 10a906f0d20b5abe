"""Losses against hand-computed values, an explicit-loop reference of each paper formula, and autograd."""

from __future__ import annotations

import math

import pytest
import torch
from m2rl.rl.losses import (
    DEFAULT_EPS,
    LossConfig,
    cispo_loss,
    dapo_loss,
    grpo_loss,
    gspo_loss,
    k3_kl,
    policy_loss,
    tis_weights,
)

torch.set_num_threads(1)
LOG = math.log


def leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# Two sequences of different lengths: seq 0 has 3 loss tokens, seq 1 has 1 (then padding). N = 4 tokens.
MASK = f64([[1, 1, 1], [1, 0, 0]])
N = 4.0


# ------------------------------------------------------------------------------------------- CISPO


def test_cispo_defaults_documented():
    assert LossConfig().kind == "cispo"
    assert LossConfig().eps == DEFAULT_EPS["cispo"] == (1.0, 4.0)  # weight capped at 5, lower bound at 0


def test_cispo_hand_values_and_clipped_token_keeps_gradient():
    # ratios r = exp(logp - old): 2.0 (clipped to 1.2), 1.0, 0.5 (clipped to 0.8), 0.7 (clipped to 0.8)
    logp = leaf([[LOG(0.5), LOG(0.3), LOG(0.1)], [LOG(0.35), 0.0, 0.0]])
    old = f64([[LOG(0.25), LOG(0.3), LOG(0.2)], [LOG(0.5), 0.0, 0.0]])
    adv = f64([[1.5, 1.5, 1.5], [-2.0, -2.0, -2.0]])
    loss, metrics = cispo_loss(logp, old, adv, MASK, eps_low=0.2, eps_high=0.2)
    w = [1.2, 1.0, 0.8, 0.8]
    a = [1.5, 1.5, 1.5, -2.0]
    lp = [LOG(0.5), LOG(0.3), LOG(0.1), LOG(0.35)]
    expected = -sum(wi * ai * li for wi, ai, li in zip(w, a, lp)) / N
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    # every token, clipped or not, gets d(-J)/d logp = -w A / N  (per-token normaliser N over the batch)
    expected_grad = f64([[-1.2 * 1.5 / N, -1.0 * 1.5 / N, -0.8 * 1.5 / N], [0.8 * 2.0 / N, 0.0, 0.0]])
    torch.testing.assert_close(logp.grad, expected_grad, rtol=1e-12, atol=0)
    assert metrics["clip_frac_high"].item() == pytest.approx(1 / 4)
    assert metrics["clip_frac_low"].item() == pytest.approx(2 / 4)
    assert metrics["is_weight_max"].item() == pytest.approx(1.2)
    assert metrics["is_weight_min"].item() == pytest.approx(0.8)
    assert metrics["is_weight_mean"].item() == pytest.approx(sum(w) / 4)
    assert metrics["ratio_max"].item() == pytest.approx(2.0)


def test_cispo_token_level_not_sequence_level_normalisation():
    """The short sequence's token weighs 1/N (N = all tokens), not 1/(2 * its length) as a per-sequence mean."""
    logp = leaf([[-1.0, -1.0, -1.0], [-1.0, 0.0, 0.0]])
    old = logp.detach().clone()
    adv = torch.ones(2, 3, dtype=torch.float64)
    loss, _ = cispo_loss(logp, old, adv, MASK, 1.0, 4.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, -MASK / N)  # seq-mean would give -1/6 then -1/2
    # sequence aggregation exists for ablations and gives the per-sequence weights
    logp.grad = None
    loss, _ = cispo_loss(logp, old, adv, MASK, 1.0, 4.0, aggregation="sequence")
    loss.backward()
    torch.testing.assert_close(logp.grad, -f64([[1 / 6, 1 / 6, 1 / 6], [1 / 2, 0, 0]]))


def reference_cispo(logp, old, adv, mask, eps_low, eps_high):
    """The M1 formula with explicit loops (objective J, to maximise)."""
    total, count = 0.0, 0
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if mask[i, t]:
                r = math.exp(float(logp[i, t].detach()) - float(old[i, t]))
                w = min(max(r, 1 - eps_low), 1 + eps_high)
                total = total + w * adv[i, t] * logp[i, t]
                count += 1
    return total / count


def test_cispo_matches_reference_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(4, 7, generator=g, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + torch.randn(4, 7, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = (torch.rand(4, 7, generator=g) > 0.3).double()
    loss, _ = cispo_loss(logp, old, adv, mask, 0.3, 0.4)
    (grad,) = torch.autograd.grad(loss, logp)
    ref_logp = logp.detach().clone().requires_grad_()
    ref = -reference_cispo(ref_logp, old, adv, mask, 0.3, 0.4)
    (ref_grad,) = torch.autograd.grad(ref, ref_logp)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(grad, ref_grad)


def test_cispo_gradient_through_a_model_parameter():
    """The sg(.) must hold inside a graph too: d/dtheta of the loss = -(w A / N) d logp/dtheta."""
    theta = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    logp = torch.stack([theta * 2.0 - 1.0, theta - 0.5]).reshape(1, 2)
    old = f64([[-2.0, -1.5]])  # ratios e^{0.6}=1.82 -> clipped to 1.5 with eps_high=0.5; e^{1.3}=3.67 -> 1.5
    adv = f64([[1.0, 1.0]])
    loss, _ = cispo_loss(logp, old, adv, torch.ones(1, 2, dtype=torch.float64), 1.0, 0.5)
    loss.backward()
    assert theta.grad.item() == pytest.approx(-(1.5 * 2.0 + 1.5 * 1.0) / 2)


# -------------------------------------------------------------------------------------------- GRPO


def test_grpo_clipped_token_gets_no_gradient():
    # token 0: r=2, A>0 -> clipped branch is the min -> no gradient
    # token 1: r=1, A>0 -> gradient -r A / N on logp (d r / d logp = r)
    # token 2: r=0.5, A>0 -> unclipped branch 0.5A < 0.8A is the min -> gradient
    # token 3: r=0.7, A<0 -> clip(0.7)*A = -1.6 < -1.4 -> clipped branch is the min -> no gradient
    logp = leaf([[LOG(0.5), LOG(0.3), LOG(0.1)], [LOG(0.35), 0.0, 0.0]])
    old = f64([[LOG(0.25), LOG(0.3), LOG(0.2)], [LOG(0.5), 0.0, 0.0]])
    adv = f64([[1.5, 1.5, 1.5], [-2.0, -2.0, -2.0]])
    loss, metrics = grpo_loss(logp, old, adv, MASK, 0.2, 0.2)
    expected = -(1.2 * 1.5 + 1.0 * 1.5 + 0.5 * 1.5 + 0.8 * -2.0) / N
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, f64([[0.0, -1.0 * 1.5 / N, -0.5 * 1.5 / N], [0.0, 0.0, 0.0]]))
    assert metrics["clip_frac_effective"].item() == pytest.approx(2 / 4)


def test_grpo_negative_advantage_high_ratio_is_not_clipped():
    # r = 2 with A < 0: min(2A, 1.2A) = 2A, the unclipped branch: gradient flows (PPO's pessimism)
    logp = leaf([[LOG(0.5)]])
    loss, _ = grpo_loss(logp, f64([[LOG(0.25)]]), f64([[-1.0]]), f64([[1.0]]), 0.2, 0.2)
    loss.backward()
    assert loss.item() == pytest.approx(2.0)
    assert logp.grad.item() == pytest.approx(2.0)  # d(-rA)/dlogp = -A r = 2


def test_grpo_matches_cispo_gradient_on_policy():
    """At r = 1 nothing is clipped and both objectives have gradient A grad logp."""
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(3, 5, generator=g, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.float64)
    (g1,) = torch.autograd.grad(grpo_loss(logp, logp.detach(), adv, mask)[0], logp)
    (g2,) = torch.autograd.grad(cispo_loss(logp, logp.detach(), adv, mask)[0], logp)
    torch.testing.assert_close(g1, g2)


def test_cispo_trust_mask_drops_the_tokens_ppo_clips_and_matches_grpo_off_policy():
    """Off policy, plain CISPO keeps a gradient on every token; with M1's mask M_it it drops exactly the
    tokens whose gradient PPO's clip removes, and where the remaining ratios lie inside the clip range the
    two objectives (same per-token normalisation) have the same gradient."""
    old = f64([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    # r: 1.5 (A>0: masked), 1.1 (inside), 0.5 (A<0 in row 1: masked), 0.9 (inside)
    logp = leaf([[LOG(1.5), LOG(1.1), 0.0], [LOG(0.5), 0.0, 0.0]])
    adv = f64([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    mask = f64([[1, 1, 0], [1, 0, 0]])
    (plain,) = torch.autograd.grad(cispo_loss(logp, old, adv, mask, 0.2, 0.2)[0], logp)
    loss, metrics = cispo_loss(logp, old, adv, mask, 0.2, 0.2, trust_mask=True)
    (masked,) = torch.autograd.grad(loss, logp)
    (ppo,) = torch.autograd.grad(grpo_loss(logp, old, adv, mask, 0.2, 0.2)[0], logp)
    assert plain[0, 0] != 0 and plain[1, 0] != 0  # CISPO: capped weight 1.2 / 0.8, gradient kept
    assert masked[0, 0] == 0 and masked[1, 0] == 0
    torch.testing.assert_close(masked, ppo)
    assert float(metrics["trust_masked_frac"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="trust_mask"):
        LossConfig(kind="grpo", trust_mask=True)
    cfg = LossConfig(kind="cispo", eps_low=0.2, eps_high=0.2, trust_mask=True)
    (via_config,) = torch.autograd.grad(policy_loss(cfg, logp, old, adv, mask)[0], logp)
    torch.testing.assert_close(via_config, masked)


# -------------------------------------------------------------------------------------------- DAPO


def test_dapo_clip_higher_hand_values():
    assert DEFAULT_EPS["dapo"] == (0.2, 0.28)
    # r = 1.25 (inside 1.28: gradient), r = 1.3 (clipped at 1.28: none), r = 0.75 with A<0 (clipped at 0.8: none)
    logp = leaf([[LOG(1.25 * 0.2), LOG(1.3 * 0.2), LOG(0.75 * 0.4)]])
    old = f64([[LOG(0.2), LOG(0.2), LOG(0.4)]])
    adv = f64([[2.0, 2.0, -1.0]])
    mask = torch.ones(1, 3, dtype=torch.float64)
    loss, metrics = dapo_loss(logp, old, adv, mask)
    expected = -(1.25 * 2.0 + 1.28 * 2.0 + 0.8 * -1.0) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, f64([[-1.25 * 2.0 / 3, 0.0, 0.0]]))
    assert metrics["clip_frac_high"].item() == pytest.approx(1 / 3)
    assert metrics["clip_frac_low"].item() == pytest.approx(1 / 3)


# -------------------------------------------------------------------------------------------- GSPO


def test_gspo_hand_values():
    # seq 0: token ratios 1.1 and 0.9 -> s0 = sqrt(0.99) = 0.99499, below 1 - 3e-4: with A > 0 the min is the
    #        unclipped s0*A, so gradient flows: d/dlogp_t (s0 A / G) = s0 A / (G |o_0|)
    # seq 1: token ratio 1.5 -> s1 = 1.5 > 1 + 4e-4, A > 0: clipped, no gradient
    logp = leaf([[LOG(1.1 * 0.3), LOG(0.9 * 0.4)], [LOG(1.5 * 0.2), 0.0]])
    old = f64([[LOG(0.3), LOG(0.4)], [LOG(0.2), 0.0]])
    adv = f64([[1.0, 1.0], [0.5, 0.5]])
    mask = f64([[1, 1], [1, 0]])
    loss, metrics = gspo_loss(logp, old, adv, mask)
    s0 = math.sqrt(1.1 * 0.9)
    expected = -(s0 * 1.0 + (1 + 4e-4) * 0.5) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    torch.testing.assert_close(logp.grad, f64([[-s0 / 4, -s0 / 4], [0.0, 0.0]]))
    assert metrics["ratio_min"].item() == pytest.approx(s0)
    assert metrics["ratio_max"].item() == pytest.approx(1.5)
    assert metrics["clip_frac_low"].item() == pytest.approx(0.5)
    assert metrics["clip_frac_high"].item() == pytest.approx(0.5)


def reference_gspo(logp, old, adv_seq, lengths, eps_low, eps_high):
    """The GSPO paper's sequence objective: 1/G sum_i min(s_i A_i, clip(s_i) A_i)."""
    terms = []
    for i, n in enumerate(lengths):
        s = torch.exp((logp[i, :n] - old[i, :n]).sum() / n)
        terms.append(torch.minimum(s * adv_seq[i], s.clamp(1 - eps_low, 1 + eps_high) * adv_seq[i]))
    return torch.stack(terms).mean()


def test_gspo_matches_sequence_reference_on_random_inputs():
    g = torch.Generator().manual_seed(2)
    lengths = [5, 2, 4, 1]
    mask = torch.zeros(4, 5, dtype=torch.float64)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    logp = (-torch.rand(4, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    old = logp.detach() + torch.randn(4, 5, generator=g, dtype=torch.float64) * 0.05
    adv_seq = torch.randn(4, generator=g, dtype=torch.float64)
    adv = adv_seq.unsqueeze(-1).expand(4, 5) * mask
    for eps in [(3e-4, 4e-4), (0.2, 0.2)]:
        loss, _ = gspo_loss(logp, old, adv, mask, *eps)
        (grad,) = torch.autograd.grad(loss, logp)
        ref = -reference_gspo(logp, old, adv_seq, lengths, *eps)
        (ref_grad,) = torch.autograd.grad(ref, logp)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
        torch.testing.assert_close(grad, ref_grad)


# ------------------------------------------------------------------------------------ KL, TIS, misc


def test_k3_kl_hand_values_and_penalty():
    logp, ref = f64([[LOG(0.5)]]), f64([[LOG(0.25)]])
    # k3 = e^{ref-logp} - (ref - logp) - 1 = 0.5 + ln 2 - 1
    assert k3_kl(logp, ref).item() == pytest.approx(0.5 + math.log(2) - 1)
    lp = leaf([[LOG(0.5)]])
    loss0, _ = cispo_loss(lp, lp.detach(), f64([[1.0]]), f64([[1.0]]))
    loss1, m = cispo_loss(lp, lp.detach(), f64([[1.0]]), f64([[1.0]]), ref_logprobs=ref, kl_coef=0.1)
    assert loss1.item() - loss0.item() == pytest.approx(0.1 * (0.5 + math.log(2) - 1))
    assert m["kl_ref"].item() == pytest.approx(0.5 + math.log(2) - 1)
    with pytest.raises(ValueError, match="ref_logprobs"):
        cispo_loss(lp, lp.detach(), f64([[1.0]]), f64([[1.0]]), kl_coef=0.1)


def test_approx_kl_metric_between_new_and_old():
    logp = leaf([[LOG(0.5), LOG(0.2)]])
    old = f64([[LOG(0.25), LOG(0.2)]])
    _, m = cispo_loss(
        logp, old, torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    )
    assert m["approx_kl"].item() == pytest.approx((0.5 + math.log(2) - 1) / 2)


def test_tis_weight_truncates_and_scales_gradient():
    old = f64([[LOG(0.4), LOG(0.1)]])
    gen = f64([[LOG(0.1), LOG(0.2)]])  # learner/generator ratios 4 (capped at 2) and 0.5
    torch.testing.assert_close(tis_weights(old, gen, 2.0), f64([[2.0, 0.5]]))
    logp = leaf([[LOG(0.4), LOG(0.1)]])
    adv, mask = f64([[1.0, 1.0]]), f64([[1.0, 1.0]])
    cfg = LossConfig(kind="cispo", tis=True, tis_cap=2.0)
    loss, m = policy_loss(cfg, logp, old, adv, mask, generator_logprobs=gen)
    loss.backward()
    torch.testing.assert_close(logp.grad, f64([[-2.0 / 2, -0.5 / 2]]))
    assert m["tis_weight_mean"].item() == pytest.approx(1.25)
    with pytest.raises(ValueError, match="generator_logprobs"):
        policy_loss(cfg, logp, old, adv, mask)


def test_entropy_metric_and_global_normalizer():
    logp = leaf([[-1.0, -2.0]])
    mask = f64([[1.0, 1.0]])
    _, m = cispo_loss(logp, logp.detach(), f64([[1.0, 1.0]]), mask, entropy=f64([[0.3, 0.5]]))
    assert m["entropy"].item() == pytest.approx(0.4)
    loss, _ = cispo_loss(logp, logp.detach(), f64([[1.0, 1.0]]), mask, normalizer=10.0)
    assert loss.item() == pytest.approx(3.0 / 10)


def test_empty_mask_gives_zero_loss_with_graph():
    logp = leaf([[-1.0, -2.0]])
    for fn in (cispo_loss, grpo_loss, dapo_loss, gspo_loss):
        loss, _ = fn(logp, logp.detach(), f64([[1.0, 1.0]]), torch.zeros(1, 2, dtype=torch.float64))
        loss.backward()
        assert loss.item() == 0.0 and torch.all(logp.grad == 0)
        logp.grad = None


def test_bad_inputs_raise_clear_errors():
    logp = leaf([[-1.0, -2.0]])
    with pytest.raises(ValueError, match="advantages has shape"):
        cispo_loss(logp, logp.detach(), f64([1.0, 1.0]), f64([[1.0, 1.0]]))
    with pytest.raises(ValueError, match=r"\[batch, tokens\]"):
        cispo_loss(f64([1.0]), f64([1.0]), f64([1.0]), f64([1.0]))
    with pytest.raises(ValueError, match="kind"):
        LossConfig(kind="ppo")
    with pytest.raises(ValueError, match="eps_high"):
        LossConfig(eps_high=-1.0)


def test_policy_loss_dispatch_uses_kind_defaults():
    logp = leaf([[LOG(0.26)]])
    old, adv, mask = f64([[LOG(0.2)]]), f64([[1.0]]), f64([[1.0]])  # r = 1.3
    for kind, weight in [("cispo", 1.3), ("dapo", 1.28), ("grpo", 1.2)]:
        loss, _ = policy_loss(LossConfig(kind=kind), logp, old, adv, mask)
        expected = -weight * LOG(0.26) if kind == "cispo" else -weight
        assert loss.item() == pytest.approx(expected), kind


def test_per_sequence_advantages_are_broadcast_over_tokens():
    logp = leaf([[-1.0, -2.0, -0.5], [-1.5, -0.3, 0.0]])
    old = logp.detach() + 0.1
    per_token = f64([[2.0, 2.0, 2.0], [-1.0, -1.0, -1.0]])
    for fn in (cispo_loss, grpo_loss, gspo_loss):
        a, _ = fn(logp, old, per_token, MASK)
        b, _ = fn(logp, old, f64([2.0, -1.0]), MASK)
        assert a.item() == pytest.approx(b.item())
