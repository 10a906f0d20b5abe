import math

import pytest
import torch
from m2rl.model import ops
from m2rl.model.attention import apply_partial_rope, rope_cos_sin
from m2rl.model.router import route, routing_bias_update


def test_rms_norm_matches_formula():
    x = torch.randn(3, 5, 64)
    w = torch.randn(64)
    ref = w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), ref)


def test_partial_rope_against_complex_rotation():
    """NeoX layout: pair (i, i + R/2) rotates by angle pos * theta^(-2i/R); dims >= R pass through."""
    B, H, T, D, R, theta = 2, 3, 7, 32, 16, 10000.0
    x = torch.randn(B, H, T, D, dtype=torch.float64)
    pos = torch.randint(0, 1000, (B, T))
    cos, sin = rope_cos_sin(pos, R, theta, torch.float64)
    got = apply_partial_rope(x, cos, sin)
    ref = x.clone()
    for i in range(R // 2):
        angle = pos.double() * theta ** (-2 * i / R)  # [B, T]
        z = torch.complex(x[..., i], x[..., i + R // 2]) * torch.polar(torch.ones_like(angle), angle)[:, None]
        ref[..., i], ref[..., i + R // 2] = z.real, z.imag
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # fp32 angles (as transformers) at pos ~1e3
    assert torch.equal(got[..., R:], x[..., R:])


def naive_route(logits, bias, k, scoring):
    out_w, out_e = [], []
    for row in logits.tolist():
        if scoring == "sigmoid":
            s = [1 / (1 + math.exp(-v)) for v in row]
        else:
            m = max(row)
            z = sum(math.exp(v - m) for v in row)
            s = [math.exp(v - m) / z for v in row]
        choice = [s[i] + (bias[i] if bias is not None else 0.0) for i in range(len(s))]
        experts = sorted(range(len(s)), key=lambda i: -choice[i])[:k]
        total = sum(s[i] for i in experts)
        out_e.append(experts)
        out_w.append([s[i] / total for i in experts])
    return out_w, out_e


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_router_bias_chooses_but_does_not_weight(scoring, with_bias):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20, 8, generator=g, dtype=torch.float64)
    bias = torch.randn(8, generator=g, dtype=torch.float64) * 0.5 if with_bias else None
    w, e = route(logits, bias, 3, scoring)
    ref_w, ref_e = naive_route(logits, bias.tolist() if bias is not None else None, 3, scoring)
    for t in range(20):
        got = dict(zip(e[t].tolist(), w[t].tolist()))
        want = dict(zip(ref_e[t], ref_w[t]))
        assert got.keys() == want.keys()
        for i, value in want.items():
            assert got[i] == pytest.approx(value, rel=1e-6)


def test_strong_bias_flips_choice_but_weights_stay_unbiased():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    w, e = route(logits, bias, 2, "sigmoid")
    assert set(e[0].tolist()) == {0, 3}
    s = torch.sigmoid(logits[0])
    expected = {0: s[0] / (s[0] + s[3]), 3: s[3] / (s[0] + s[3])}
    for i, x in zip(e[0].tolist(), w[0].tolist()):
        assert x == pytest.approx(expected[i].item(), rel=1e-6)


def test_moe_experts_against_dense_reference():
    T, D, I, E, K = 11, 16, 24, 6, 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g)
    w1, w3 = torch.randn(E, I, D, generator=g), torch.randn(E, I, D, generator=g)
    w2 = torch.randn(E, D, I, generator=g)
    experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=g)
    ref = torch.zeros(T, D)
    for t in range(T):
        for k in range(K):
            e = experts[t, k]
            h = torch.nn.functional.silu(w1[e] @ x[t]) * (w3[e] @ x[t])
            ref[t] += weights[t, k] * (w2[e] @ h)
    torch.testing.assert_close(ops.moe_experts(x, w1, w3, w2, experts, weights), ref, rtol=1e-4, atol=1e-4)


def test_ops_registry_dispatch(tiny_model):
    calls = []

    def counting_rms_norm(x, w, eps):
        calls.append(x.shape[-1])
        return ops.rms_norm_torch(x, w, eps)

    ops.register("rms_norm", "counting_test_double", counting_rms_norm)
    assert "counting_test_double" in ops.available("rms_norm")
    ids = torch.randint(0, 4096, (1, 5))
    with torch.no_grad():
        base = tiny_model(ids)
        with ops.using(rms_norm="counting_test_double"):
            assert ops.selected("rms_norm") == "counting_test_double"
            out = tiny_model(ids)
    assert ops.selected("rms_norm") == "torch"
    assert torch.equal(out, base)
    # per layer: input, q_norm, k_norm, post-attention; plus the final norm
    assert sorted(calls) == sorted([128, 256, 128, 128] * 2 + [128])
    with pytest.raises(KeyError, match="no implementation"):
        ops.use("rms_norm", "nope")
    with pytest.raises(KeyError, match="unknown op"):
        ops.available("flash_everything")


def test_router_stays_fp32_under_dtype_cast(tiny_model):
    m = tiny_model.to(torch.bfloat16)
    gate = m.model.layers[0].block_sparse_moe.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert m.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert m(torch.randint(0, 4096, (1, 4))).dtype == torch.bfloat16


def test_routing_bias_update_moves_toward_balance(tiny_model):
    gate = tiny_model.model.layers[0].block_sparse_moe.gate
    gate.record_load = True
    with torch.no_grad():
        tiny_model(torch.randint(0, 4096, (2, 30), generator=torch.Generator().manual_seed(0)))
    load = gate.load_E
    assert int(load.sum()) == 2 * 30 * gate.top_k
    new = routing_bias_update(gate.e_score_correction_bias, load, rate=0.01)
    delta = new - gate.e_score_correction_bias
    mean = load.float().mean()
    assert torch.all(delta[load.float() > mean] < 0) and torch.all(delta[load.float() < mean] > 0)


@pytest.mark.parametrize("path", ["_moe_experts_dense", "_moe_experts_gathered", "moe_experts_torch"])
def test_every_moe_path_matches_a_plain_loop_with_gradients(path):
    T, D, I, E, K = 3, 16, 24, 8, 2  # T*K <= E so the gathered path applies too
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(T, D, generator=g), torch.randn(E, I, D, generator=g),
               torch.randn(E, I, D, generator=g), torch.randn(E, D, I, generator=g)]
    experts = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=g)

    def run(fn):
        leaves = [t.clone().requires_grad_(True) for t in tensors] + [weights.clone().requires_grad_(True)]
        out = fn(*leaves[:4], experts, leaves[4])
        grads = torch.autograd.grad((out * torch.arange(out.numel()).view_as(out)).sum(), leaves)
        return out, grads

    ref_out, ref_grads = run(_plain_loop)
    out, grads = run(getattr(ops, path))
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _plain_loop(x, w1, w3, w2, experts, weights):
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        rows, slots = (experts == e).nonzero(as_tuple=True)
        if rows.numel():
            h = torch.nn.functional.silu(x[rows] @ w1[e].t()) * (x[rows] @ w3[e].t())
            out = out.index_add(0, rows, (h @ w2[e].t()) * weights[rows, slots, None])
    return out
