"""Fused linear + log-softmax + gather (`linear_logprobs`) against a naive log_softmax(h @ W^T).gather, and the
torch implementation against the chunked code `token_logprobs` ran before it went through the op.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (conftest.py): small tiles make
several row blocks, vocabulary tiles, reduction steps and backward chunks at small shapes, and N, D, V are
not multiples of them. The `gpu` tests run the M2 head's shapes (D 3072, V 200064) in bf16 and check memory.
"""

from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from m2rl.model import ops

# 16-row blocks, 32-column vocabulary tiles, 16-wide reduction steps, 64-column backward chunks
SMALL = {"block_m": 16, "block_v": 32, "block_k": 16, "group_m": 2, "grad_chunk_columns": 64,
         "num_warps": 4, "num_stages": 2}
# (N, D, V): one row; odd D and V; several row blocks, tiles and backward chunks with ragged ends
SHAPES = [(1, 16, 50), (3, 72, 300), (17, 40, 100), (17, 33, 257)]


@pytest.fixture(scope="module")
def ll():
    pytest.importorskip("triton")
    module = importlib.import_module("m2rl.kernels.linear_logprob")  # conftest.py imported it interpreted
    if not (torch.cuda.is_available() or module._INTERPRETED):
        pytest.skip("Triton was imported without TRITON_INTERPRET=1 before these tests; run tests/kernels first")
    return module


@pytest.fixture
def small(ll):
    return ll.LogprobConfig(**SMALL)


def _problem(N, D, V, dtype, device, seed=0, scale=1.0):
    """hidden [N, D], weight [V, D] (normal, logits of std ~scale), targets [N], all leaves needing grad."""
    gen = torch.Generator(device).manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=gen, device=device) * scale / math.sqrt(D)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen, device=device)
    return hidden, weight, targets


def _naive(hidden, weight, targets, temperature=1.0):
    """The whole [N, V] fp32 log-softmax: (logprob, entropy)."""
    logp = torch.log_softmax(F.linear(hidden.float(), weight.float()) / temperature, dim=-1)
    return logp.gather(1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def _grads(lp, ent, hidden, weight, seed=1):
    """d/d(hidden, weight) of sum(a * logprob + b * entropy), random per-row a and b (a token-weighted loss)."""
    gen = torch.Generator(lp.device).manual_seed(seed)
    a = torch.randn(lp.shape, generator=gen, device=lp.device)
    loss = (a * lp).sum()
    if ent is not None:
        loss = loss + (torch.randn(lp.shape, generator=gen, device=lp.device) * ent).sum()
    return torch.autograd.grad(loss, (hidden, weight))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---- interpreted on CPU (or on the GPU), small shapes -------------------------------------------------------
@pytest.mark.parametrize("N,D,V", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp32_matches_naive_forward_entropy_backward(ll, small, device, N, D, V, temperature):
    hidden, weight, targets = _problem(N, D, V, torch.float32, device, seed=N + V)
    lp, ent = ll.linear_logprobs_triton(hidden, weight, targets, True, temperature=temperature, config=small)
    ref_lp, ref_ent = _naive(hidden, weight, targets, temperature)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (N,)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    for got, ref, name in zip(_grads(lp, ent, hidden, weight), _grads(ref_lp, ref_ent, hidden, weight),
                              ("hidden", "weight")):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("N,D,V", SHAPES[1:3])
def test_half_precision_matches_naive(ll, small, device, dtype, tol, N, D, V):
    """fp32 logits from half inputs are exact products: forward as tight as fp32; the gradient goes through
    dz in the inputs' dtype (the reference's stays fp32), so it is looser."""
    hidden, weight, targets = _problem(N, D, V, dtype, device, seed=5)
    lp, ent = ll.linear_logprobs_triton(hidden, weight, targets, True, config=small)
    ref_lp, ref_ent = _naive(hidden, weight, targets)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    grads = _grads(lp, ent, hidden, weight)
    assert [g.dtype for g in grads] == [dtype, dtype]
    for got, ref in zip(grads, _grads(ref_lp, ref_ent, hidden, weight)):
        assert _rel_err(got, ref) < tol


def test_half_precision_logits_round_like_the_reference(ll, small, device):
    """fp32_logits=False rounds each logit through bf16 as F.linear(h, w).float() does: off the reference
    by at most a rounding flip of a logit (one bf16 ulp, ~0.016 at |z| ~ 3), far from the fp32 head."""
    hidden, weight, targets = _problem(17, 40, 100, torch.bfloat16, device, seed=6, scale=3.0)
    lp, _ = ll.linear_logprobs_triton(hidden, weight, targets, fp32_logits=False, config=small)
    ref, _ = ops.linear_logprobs_torch(hidden, weight, targets, fp32_logits=False)
    fp32_head, _ = _naive(hidden, weight, targets)
    assert (lp - ref).abs().max() < 0.05
    assert (lp - ref).abs().mean() < 0.2 * (ref - fp32_head).abs().mean()


def test_without_entropy_and_partial_grads(ll, small, device):
    hidden, weight, targets = _problem(17, 40, 100, torch.float32, device, seed=7)
    lp, ent = ll.linear_logprobs_triton(hidden, weight, targets, config=small)
    assert ent is None
    ref_lp, _ = _naive(hidden, weight, targets)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    for got, ref in zip(_grads(lp, None, hidden, weight), _grads(ref_lp, None, hidden, weight)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # only one input needs a gradient: the other gets none
    frozen = weight.detach()
    lp, _ = ll.linear_logprobs_triton(hidden, frozen, targets, config=small)
    (grad_h,) = torch.autograd.grad(lp.sum(), (hidden,))
    torch.testing.assert_close(grad_h, torch.autograd.grad(_naive(hidden, frozen, targets)[0].sum(), hidden)[0],
                               rtol=1e-4, atol=1e-5)
    # entropy alone carries the gradient
    lp, ent = ll.linear_logprobs_triton(hidden, weight, targets, True, config=small)
    got = torch.autograd.grad(ent.sum(), (hidden, weight))
    ref = torch.autograd.grad(_naive(hidden, weight, targets)[1].sum(), (hidden, weight))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        assert ll.linear_logprobs_triton(hidden, weight, targets, config=small)[0].grad_fn is None


def test_strided_inputs_peaked_logits_and_bad_targets(ll, small, device):
    """A transposed weight and a column-sliced hidden (strides, not copies); logits of std 30 (a peaked
    softmax: entropy near 0, log-probs down to -100s); a target out of range gives NaN, not a wrong number."""
    hidden, weight, targets = _problem(17, 40, 100, torch.float32, device, seed=8, scale=30.0)
    wide = torch.cat([hidden.detach(), torch.randn(17, 9, device=device)], dim=1)[:, :40]
    weight_t = weight.detach().t().contiguous().t()
    lp, ent = ll.linear_logprobs_triton(wide, weight_t, targets, True, config=small)
    ref_lp, ref_ent = _naive(hidden, weight, targets)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-4, atol=1e-4)
    bad = targets.clone()
    bad[3], bad[5] = 100, -1
    lp_bad, _ = ll.linear_logprobs_triton(wide, weight_t, bad, config=small)
    assert lp_bad[3].isnan() and lp_bad[5].isnan()
    keep = torch.ones(17, dtype=torch.bool)
    keep[[3, 5]] = False
    torch.testing.assert_close(lp_bad[keep], lp[keep])


def test_default_config_and_no_rows(ll, device):
    """The default (GPU-sized) tiles under the interpreter, and no rows at all (the torch path)."""
    hidden, weight, targets = _problem(5, 24, 300, torch.float32, device, seed=9)
    lp, ent = ll.linear_logprobs_triton(hidden, weight, targets, True)
    ref_lp, ref_ent = _naive(hidden, weight, targets)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    lp, ent = ll.linear_logprobs_triton(hidden[:0], weight, targets[:0], True)
    assert lp.shape == ent.shape == (0,)


def test_registered_not_selected_and_dispatches(ll, small, device):
    assert ("linear_logprobs", "triton") in importlib.import_module("m2rl.kernels").register_all()
    assert ops.available("linear_logprobs") == ["chunked", "torch", "triton"]
    assert ops.PREFERRED["cuda"]["linear_logprobs"] == ("triton", "chunked", "torch")
    with ops.using(linear_logprobs="torch"):
        assert ll.register() == [("linear_logprobs", "triton")]
        assert ops.selected("linear_logprobs") == "torch"  # registering never selects
    hidden, weight, targets = _problem(3, 72, 300, torch.float32, device, seed=10)
    with ops.using(linear_logprobs="triton"):
        lp, ent = ops.linear_logprobs(hidden, weight, targets, True)
    ref_lp, ref_ent = ops.linear_logprobs_torch(hidden, weight, targets, True)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)


# ---- the large-N design (cuBLAS GEMMs, Triton row kernels), forced at small shapes ----------------------------
# every row count takes it; 32-column row tiles make several tiles and a ragged last one
LARGE_N = {**SMALL, "cublas_min_rows": 1, "row_block_v": 32}


@pytest.fixture
def large_n(ll):
    return ll.LogprobConfig(**LARGE_N)


@pytest.mark.parametrize("N,D,V,chunk_size", [(1, 16, 50, 4), (17, 40, 100, 5), (17, 33, 257, 1024)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_large_n_fp32_matches_naive(ll, large_n, device, monkeypatch, N, D, V, chunk_size, temperature):
    """Values and gradients (log-prob and entropy in the loss) through the chunk driver and the row kernels,
    and nothing through the fused kernels."""
    monkeypatch.setattr(ll, "_forward", None)  # the fused design would fail loudly
    hidden, weight, targets = _problem(N, D, V, torch.float32, device, seed=N + V)
    lp, ent = ll.linear_logprobs_triton(hidden, weight, targets, True, temperature=temperature,
                                        chunk_size=chunk_size, config=large_n)
    ref_lp, ref_ent = _naive(hidden, weight, targets, temperature)
    assert lp.dtype == ent.dtype == torch.float32 and lp.shape == ent.shape == (N,)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    for got, ref, name in zip(_grads(lp, ent, hidden, weight), _grads(ref_lp, ref_ent, hidden, weight),
                              ("hidden", "weight")):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("dtype,fp32_logits", [(torch.bfloat16, True), (torch.bfloat16, False),
                                               (torch.float16, True)])
def test_large_n_half_precision_matches_the_reference(ll, large_n, device, dtype, fp32_logits):
    """Forward as the torch reference (fp32 products, or cuBLAS's logits in bf16 read by the row kernel);
    gradients within a few roundings of it (dz in the inputs' dtype, in place for bf16 logits; dW summed over
    4 chunks in bf16)."""
    hidden, weight, targets = _problem(17, 40, 100, dtype, device, seed=6, scale=3.0)
    kwargs = {"fp32_logits": fp32_logits, "temperature": 0.9, "chunk_size": 5}
    lp, ent = ll.linear_logprobs_triton(hidden, weight, targets, True, config=large_n, **kwargs)
    ref_lp, ref_ent = ops.linear_logprobs_torch(hidden, weight, targets, True, **kwargs)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    grads = _grads(lp, ent, hidden, weight)
    assert [g.dtype for g in grads] == [dtype, dtype]
    for got, ref in zip(grads, _grads(ref_lp, ref_ent, hidden, weight)):
        assert _rel_err(got, ref) < 1e-2


def test_large_n_partial_grads_strides_and_bad_targets(ll, large_n, device):
    """Only one input needing a gradient, the entropy alone carrying it, strided inputs and int32 targets,
    and an out-of-range target giving NaN (as the fused kernels)."""
    hidden, weight, targets = _problem(17, 40, 100, torch.float32, device, seed=7, scale=5.0)
    frozen = weight.detach()
    lp, ent = ll.linear_logprobs_triton(hidden, frozen, targets, config=large_n, chunk_size=6)
    assert ent is None
    (grad_h,) = torch.autograd.grad(lp.sum(), (hidden,))
    torch.testing.assert_close(grad_h, torch.autograd.grad(_naive(hidden, frozen, targets)[0].sum(), hidden)[0],
                               rtol=1e-4, atol=1e-5)
    _, ent = ll.linear_logprobs_triton(hidden, weight, targets, True, config=large_n, chunk_size=6)
    for g, r in zip(torch.autograd.grad(ent.sum(), (hidden, weight)),
                    torch.autograd.grad(_naive(hidden, weight, targets)[1].sum(), (hidden, weight))):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    wide = torch.cat([hidden.detach(), torch.randn(17, 9, device=device)], dim=1)[:, :40]
    weight_t = weight.detach().t().contiguous().t()
    lp, ent = ll.linear_logprobs_triton(wide, weight_t, targets.int(), True, config=large_n, chunk_size=6)
    ref_lp, ref_ent = _naive(hidden, weight, targets)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-4, atol=1e-4)
    bad = targets.clone()
    bad[3], bad[5] = 100, -1
    lp_bad, _ = ll.linear_logprobs_triton(wide, weight_t, bad, config=large_n, chunk_size=6)
    assert lp_bad[3].isnan() and lp_bad[5].isnan()
    keep = torch.ones(17, dtype=torch.bool)
    keep[[3, 5]] = False
    torch.testing.assert_close(lp_bad[keep], lp[keep])


def test_threshold_picks_the_design(ll, device, monkeypatch):
    """Rows below `cublas_min_rows` run the fused kernels, from it the chunk driver (with `chunk_size`)."""
    calls = []
    real = ll.chunked.linear_logprobs_rows

    def spy(*args):
        calls.append(args[6])  # chunk_size
        return real(*args)

    monkeypatch.setattr(ll.chunked, "linear_logprobs_rows", spy)
    hidden, weight, targets = _problem(9, 16, 50, torch.float32, device, seed=11)
    config = ll.LogprobConfig(**{**LARGE_N, "cublas_min_rows": 9})
    below, _ = ll.linear_logprobs_triton(hidden[:8], weight, targets[:8], config=config)
    assert calls == []
    at, _ = ll.linear_logprobs_triton(hidden, weight, targets, chunk_size=4, config=config)
    assert calls == [4]
    torch.testing.assert_close(at[:8], below, rtol=1e-5, atol=1e-5)


def test_cost_model_and_chunks(ll):
    N, D, V = 16384, 3072, 200064
    assert ll.flops(N, D, V) == 2 * N * D * V and ll.flops(N, D, V, backward=True) == 8 * N * D * V
    config = ll.default_config(N)
    columns = ll.grad_chunk_columns(N, V, 2, config)
    assert columns % config.block_v == 0 and N * columns * 2 <= config.grad_chunk_bytes
    assert ll.grad_chunk_columns(3, 50, 2, config) == 50  # never past the vocabulary
    assert ll.grad_chunk_columns(10**9, V, 2, config) == config.block_v  # never below a tile
    fused = ll.LogprobConfig(cublas_min_rows=N + 1)  # the fused design at the same shape
    forward = ll.bytes_moved(N, D, V, 2, config=fused)
    assert V * D * 2 < forward < ll.bytes_moved(N, D, V, 2, backward=True, config=fused)
    assert ll.bytes_moved(N, D, V, 2, backward=True, config=fused) > 3 * N * V * 2  # dz written and read twice
    # large N: W read by each chunk's GEMM (768-row chunks at this vocabulary in bf16) and the logits' round
    # trip through HBM (fp32: twice the bytes of bf16 ones); backward repeats it and adds dz and dW's updates
    assert ll.default_config(N).cublas_min_rows <= N
    chunks = -(-N // 768)
    for fp32_logits, logit_bytes in [(True, 4), (False, 2)]:
        split = ll.bytes_moved(N, D, V, 2, fp32_logits=fp32_logits)
        assert chunks * V * D * 2 + 2 * N * V * logit_bytes < split < (chunks + 1) * V * D * 2 + 2 * N * V * logit_bytes
        split_bwd = ll.bytes_moved(N, D, V, 2, backward=True, fp32_logits=fp32_logits)
        assert split_bwd > 2 * split + 3 * N * V * 2 + (2 * chunks - 1) * V * D * 2


@pytest.mark.parametrize("elem_bytes", [2, 4])
@pytest.mark.parametrize("rows", [1, 64, 1024, 16384])
def test_default_tiles_fit_hopper_shared_memory(ll, rows, elem_bytes):
    config = ll.default_config(rows, elem_bytes)
    assert ll.shared_memory_bytes(config, elem_bytes) <= 232448


# ---- the torch implementation is the code token_logprobs ran before (CPU bit for bit) -----------------------
def _old_chunk_logprobs(hidden_ND, weight_VD, targets_N, fp32, temperature):
    """model/logprobs.py's _chunk_logprobs before the op (commit dfe3843), verbatim."""
    if fp32:
        logits_NV = F.linear(hidden_ND.float(), weight_VD.float())
    else:
        logits_NV = F.linear(hidden_ND, weight_VD).float()
    if temperature != 1.0:
        logits_NV = logits_NV / temperature
    lse_N = torch.logsumexp(logits_NV, dim=-1)
    logprob_N = logits_NV.gather(1, targets_N[:, None])[:, 0] - lse_N
    entropy_N = lse_N - (torch.softmax(logits_NV, dim=-1) * logits_NV).sum(-1)
    return logprob_N, entropy_N


def _old_logprobs_from_hidden(hidden_BTD, lm_head_weight, input_ids, chunk_size, lm_head_fp32, temperature,
                              target_mask):
    """The old logprobs_from_hidden and _masked_logprobs_from_hidden, folded into one, same ops in order."""
    from torch.utils.checkpoint import checkpoint

    B, T, D = hidden_BTD.shape
    h_ND = hidden_BTD[:, :-1].reshape(-1, D)
    targets_N = input_ids[:, 1:].reshape(-1)
    if target_mask is not None:
        rows_M = target_mask[:, 1:].reshape(-1).to(device=hidden_BTD.device).bool().nonzero()[:, 0]
        h_ND = h_ND.index_select(0, rows_M)
        targets_N = targets_N.index_select(0, rows_M)
    recompute = torch.is_grad_enabled() and (hidden_BTD.requires_grad or lm_head_weight.requires_grad)
    lps, ents = [], []
    for s in range(0, h_ND.shape[0], chunk_size):
        args = (h_ND[s:s + chunk_size], lm_head_weight, targets_N[s:s + chunk_size], lm_head_fp32, temperature)
        lp, ent = checkpoint(_old_chunk_logprobs, *args, use_reentrant=False) if recompute \
            else _old_chunk_logprobs(*args)
        lps.append(lp)
        ents.append(ent)
    zeros = torch.zeros(B, 1, dtype=torch.float32)
    if target_mask is None:
        return (torch.cat([zeros, torch.cat(lps).view(B, T - 1)], dim=1),
                torch.cat([zeros, torch.cat(ents).view(B, T - 1)], dim=1))
    flat_lp = torch.zeros(B * (T - 1), dtype=torch.float32)
    flat_ent = torch.zeros_like(flat_lp)
    if lps:
        flat_lp = flat_lp.index_put((rows_M,), torch.cat(lps))
        flat_ent = flat_ent.index_put((rows_M,), torch.cat(ents))
    return torch.cat([zeros, flat_lp.view(B, T - 1)], dim=1), torch.cat([zeros, flat_ent.view(B, T - 1)], dim=1)


@pytest.mark.parametrize("chunk_size,lm_head_fp32,temperature,masked,entropy", [
    (7, True, 1.0, False, True), (1024, True, 1.0, True, True), (5, False, 0.8, True, True),
    (7, True, 1.0, False, False), (5, True, 1.0, True, False),
])
def test_cpu_logprobs_from_hidden_bit_identical_to_before(chunk_size, lm_head_fp32, temperature, masked, entropy):
    """On CPU `logprobs_from_hidden` runs `ops.linear_logprobs_torch`: values and gradients equal, bit for bit,
    what it computed before it went through the op (skipping the entropy when not asked changes nothing)."""
    from m2rl.model.logprobs import logprobs_from_hidden

    gen = torch.Generator().manual_seed(chunk_size)
    hidden = torch.randn(3, 13, 64, generator=gen, dtype=torch.float32 if lm_head_fp32 else torch.bfloat16)
    hidden.requires_grad_()
    weight = (torch.randn(1000, 64, generator=gen) / 8).to(hidden.dtype).requires_grad_()
    ids = torch.randint(0, 1000, (3, 13), generator=gen)
    target = (torch.rand(3, 13, generator=gen) < 0.5).long() if masked else None
    a, b = torch.randn(3, 13, generator=gen), torch.randn(3, 13, generator=gen)

    def loss(lp, ent):
        return (lp * a).sum() + ((ent * b).sum() if entropy else 0)

    old_lp, old_ent = _old_logprobs_from_hidden(hidden, weight, ids, chunk_size, lm_head_fp32, temperature, target)
    old_grads = torch.autograd.grad(loss(old_lp, old_ent), (hidden, weight))
    lp, ent = logprobs_from_hidden(hidden, weight, ids, chunk_size, lm_head_fp32, temperature,
                                   target_mask=target, return_entropy=entropy)
    assert torch.equal(lp, old_lp)
    assert torch.equal(ent, old_ent) if entropy else ent is None
    new_grads = torch.autograd.grad(loss(lp, ent), (hidden, weight))
    assert torch.equal(new_grads[0], old_grads[0]) and torch.equal(new_grads[1], old_grads[1])


def test_cpu_token_logprobs_bit_identical_to_before():
    """The tiny M2 end to end, left padding, entropy in the loss: parameters' gradients equal bit for bit."""
    from m2rl.model import M2Config, M2ForCausalLM
    from m2rl.model.logprobs import token_logprobs

    model = M2ForCausalLM(M2Config.from_preset("tiny")).init_weights(std=0.1, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=gen)
    attention = torch.ones_like(ids)
    attention[1, :3] = 0
    a = torch.randn(2, 11, generator=gen)
    params = list(model.parameters())

    hidden = model.hidden_states(ids, attention_mask=attention)
    old_lp, old_ent = _old_logprobs_from_hidden(hidden, model.lm_head.weight, ids, 7, True, 1.0, None)
    old_lp, old_ent = old_lp * attention.bool(), old_ent * attention.bool()
    old_grads = torch.autograd.grad((old_lp * a).sum() + old_ent.sum() * 0.1, params)
    lp, ent = token_logprobs(model, ids, attention_mask=attention, return_entropy=True, chunk_size=7)
    assert torch.equal(lp, old_lp) and torch.equal(ent, old_ent)
    for (name, _), new, old in zip(model.named_parameters(),
                                   torch.autograd.grad((lp * a).sum() + ent.sum() * 0.1, params), old_grads):
        assert torch.equal(new, old), name


# ---- GPU: the M2 head's shapes in bf16, memory -----------------------------------------------------------
M2_HEAD = {"D": 3072, "V": 200064}


def _reference_in_chunks(hidden, weight, targets, a, b, rows=1024):
    """Naive fp32 log-softmax.gather, entropy and their gradients for the loss sum(a lp + b ent), 1024 rows at
    a time (the whole [N, V] fp32 would not fit twice): (lp, ent, grad_hidden fp32, grad_weight fp32)."""
    w32 = weight.detach().float().requires_grad_()
    lps, ents, grad_h = [], [], []
    for s in range(0, hidden.shape[0], rows):
        h32 = hidden[s:s + rows].detach().float().requires_grad_()
        lp, ent = _naive(h32, w32, targets[s:s + rows])
        ((a[s:s + rows] * lp).sum() + (b[s:s + rows] * ent).sum()).backward()
        lps.append(lp.detach())
        ents.append(ent.detach())
        grad_h.append(h32.grad)
    return torch.cat(lps), torch.cat(ents), torch.cat(grad_h), w32.grad


def _m2_config(ll, N, design):
    """The default config for N rows, or it with the design forced: "fused" kernels or "large" N's."""
    config = ll.default_config(N)
    return dataclasses.replace(config, cublas_min_rows={"fused": N + 1, "large": min(N, 512)}[design])


# 256 and 1024 rows both ways (256: decode-sized, the fused design's default; 1024: the learner's chunk), 8192 the
# learner's step through the default (large N) design
M2_CASES = [(256, "fused"), (1024, "fused"), (1024, "large"), (8192, "large")]


@pytest.mark.gpu
@pytest.mark.parametrize("N,design", M2_CASES)
def test_m2_head_bf16_forward_backward(ll, N, design):
    hidden, weight, targets = _problem(N, M2_HEAD["D"], M2_HEAD["V"], torch.bfloat16, "cuda", seed=N, scale=4.0)
    gen = torch.Generator("cuda").manual_seed(N + 1)
    a = torch.randn(N, generator=gen, device="cuda") / N
    b = torch.randn(N, generator=gen, device="cuda") / N
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        lp, ent = ll.linear_logprobs_triton(hidden, weight, targets, True, config=_m2_config(ll, N, design))
        ((a * lp).sum() + (b * ent).sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref_lp, ref_ent, ref_gh, ref_gw = _reference_in_chunks(hidden, weight, targets, a, b)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-4, atol=2e-3)  # fp32 accumulation, other orders
    torch.testing.assert_close(ent, ref_ent, rtol=1e-4, atol=2e-3)
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    assert _rel_err(hidden.grad, ref_gh) < 1e-2  # dz in bf16
    assert _rel_err(weight.grad, ref_gw) < 1e-2  # large N: also summed over 11 chunks in bf16


@pytest.mark.gpu
@pytest.mark.parametrize("N,design", M2_CASES)
def test_m2_head_peak_memory(ll, N, design):
    """Forward + backward allocate beyond inputs and gradients: fused, < 5% of the naive head's [N, V] fp32
    logits and log-softmax (which autograd keeps: 2 x N x V x 4 bytes, 12 GiB at N=8192); large N, one
    chunk's fp32 logits and dz, under the driver's 1 GiB budget (plus cuBLAS's workspace)."""
    hidden, weight, targets = _problem(N, M2_HEAD["D"], M2_HEAD["V"], torch.bfloat16, "cuda", seed=N)
    config = _m2_config(ll, N, design)

    def step():
        lp, ent = ll.linear_logprobs_triton(hidden, weight, targets, True, config=config)
        (lp.sum() + ent.sum()).backward()

    step()  # compile, cuBLAS workspaces
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    grads = hidden.grad.nbytes + weight.grad.nbytes
    extra = torch.cuda.max_memory_allocated() - before - grads
    naive = 2 * N * M2_HEAD["V"] * 4
    limit = 0.05 * naive if design == "fused" else ll.chunked.CHUNK_BUDGET_BYTES + (64 << 20)
    assert extra < limit, f"{extra / 2**20:.0f} MiB beyond the gradients, naive {naive / 2**20:.0f} MiB"


@pytest.mark.gpu
def test_m2_head_large_n_half_logits_temperature_matches_chunked_torch(ll):
    """The large-N design with fp32_logits=False (cuBLAS's bf16 logits, dz in place), a temperature and int32
    targets, against the torch `chunked` implementation on the same cuBLAS GEMMs and the reference."""
    N = 2048
    hidden, weight, targets = _problem(N, M2_HEAD["D"], M2_HEAD["V"], torch.bfloat16, "cuda", seed=3, scale=4.0)
    kwargs = {"fp32_logits": False, "temperature": 0.8}
    lp, ent = ll.linear_logprobs_triton(hidden, weight, targets.int(), True, **kwargs)
    grads = _grads(lp, ent, hidden, weight)
    with ops.using(linear_logprobs="chunked"):
        ref_lp, ref_ent = ops.linear_logprobs(hidden, weight, targets, True, **kwargs)
    ref_grads = _grads(ref_lp, ref_ent, hidden, weight)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-4, atol=1e-3)  # other chunkings: maybe other cuBLAS kernels
    torch.testing.assert_close(ent, ref_ent, rtol=1e-4, atol=1e-3)
    for got, ref in zip(grads, ref_grads):
        assert _rel_err(got, ref) < 1e-2
    slow_lp, _ = ops.linear_logprobs_torch(hidden.detach()[:512], weight.detach(), targets[:512], True, **kwargs)
    torch.testing.assert_close(lp[:512], slow_lp, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
def test_token_logprobs_on_cuda_kernel_matches_torch(ll):
    """A CUDA model's token_logprobs through the Triton op (its CUDA default, PREFERRED) agrees with the torch
    one, gradients of the parameters included (bf16 model, fp32 head)."""
    from m2rl.model import M2Config, M2ForCausalLM
    from m2rl.model.logprobs import token_logprobs

    model = M2ForCausalLM(M2Config.from_preset("tiny")).init_weights(std=0.1, seed=0).to("cuda", torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (4, 300), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    results = {}
    for impl in ("triton", "chunked", "torch"):  # 1196 rows: the large-N design
        model.zero_grad()
        with ops.using(linear_logprobs=impl):
            lp, ent = token_logprobs(model, ids, return_entropy=True)
        lp.sum().backward()
        results[impl] = (lp.detach(), ent.detach(), model.lm_head.weight.grad.clone(),
                         model.model.embed_tokens.weight.grad.clone())
    ref_lp, ref_ent, ref_head, ref_embed = results["torch"]
    for impl in ("triton", "chunked"):
        lp, ent, g_head, g_embed = results[impl]
        torch.testing.assert_close(lp, ref_lp, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ent, ref_ent, rtol=1e-4, atol=1e-4)
        assert _rel_err(g_head, ref_head) < 1e-2 and _rel_err(g_embed, ref_embed) < 2e-2, impl
