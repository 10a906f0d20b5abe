"""The `chunked` linear_logprobs (model/linear_logprobs_chunked.py) against the torch reference
`ops.linear_logprobs_torch`: values and gradients w.r.t. hidden and weight, at odd sizes (no rows, one row,
chunks that do not divide N, vocabularies that are multiples of nothing), both logits precisions, temperature,
entropy, partial gradients, strided inputs; its chunk sizing; and on a GPU the M2 head's shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from m2rl.model import linear_logprobs_chunked as chunked
from m2rl.model import ops

# (N, D, V, chunk_size): no rows, one row, chunks of 3 over 7 rows, 17 rows in chunks of 5, one chunk
SHAPES = [(0, 16, 50, 4), (1, 16, 50, 4), (7, 33, 257, 3), (17, 40, 300, 5), (17, 24, 101, 1024)]


def _problem(N, D, V, dtype, seed=0, scale=1.0):
    """hidden [N, D], weight [V, D] (logits of std ~scale), targets [N], the first two leaves needing grad."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=gen) * scale / math.sqrt(D)).to(dtype).requires_grad_()
    return hidden, weight, torch.randint(0, V, (N,), generator=gen)


def _loss(lp, ent, seed=1):
    """sum(a * logprob + b * entropy) with random per-row a and b: a token-weighted loss."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(lp.shape, generator=gen), torch.randn(lp.shape, generator=gen)
    return (a * lp).sum() + ((b * ent).sum() if ent is not None else 0)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("N,D,V,chunk_size", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", [True, False])
def test_fp32_matches_reference(N, D, V, chunk_size, temperature, entropy):
    hidden, weight, targets = _problem(N, D, V, torch.float32, seed=N + V)
    kwargs = {"temperature": temperature, "chunk_size": chunk_size}
    lp, ent = chunked.linear_logprobs_chunked(hidden, weight, targets, entropy, **kwargs)
    ref_lp, ref_ent = ops.linear_logprobs_torch(hidden, weight, targets, entropy, **kwargs)
    assert lp.dtype == torch.float32 and lp.shape == (N,) and (ent is None) == (not entropy)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    if entropy:
        torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(_loss(lp, ent), (hidden, weight))
    if N == 0:  # the reference's empty output has no graph; ours gives zero gradients
        assert grads[0].shape == (0, D) and torch.equal(grads[1], torch.zeros(V, D))
        return
    for got, ref, name in zip(grads, torch.autograd.grad(_loss(ref_lp, ref_ent), (hidden, weight)),
                              ("hidden", "weight")):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("fp32_logits", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_half_precision_matches_reference(fp32_logits, dtype, temperature):
    """Forward as the reference (fp32 products, or logits rounded through the inputs' dtype, then the same fp32
    softmax). Gradients go through dz in the inputs' dtype and dW is summed over 4 chunks in it, so they sit
    within a few roundings of the fp32 truth (the reference's own half-precision gradients are off it too)."""
    hidden, weight, targets = _problem(17, 40, 300, dtype, seed=5, scale=3.0)
    kwargs = {"fp32_logits": fp32_logits, "temperature": temperature, "chunk_size": 5}
    lp, ent = chunked.linear_logprobs_chunked(hidden, weight, targets, True, **kwargs)
    ref_lp, ref_ent = ops.linear_logprobs_torch(hidden, weight, targets, True, **kwargs)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(_loss(lp, ent), (hidden, weight))
    assert [g.dtype for g in grads] == [dtype, dtype]
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    truth = torch.autograd.grad(_loss(*ops.linear_logprobs_torch(h32, w32, targets, True, **kwargs)), (h32, w32))
    half_ref = torch.autograd.grad(_loss(ref_lp, ref_ent), (hidden, weight))
    for got, ref, true in zip(grads, half_ref, truth):
        if fp32_logits:  # fp32_logits=False: the logits' rounding moves the truth for both alike
            assert _rel_err(got, true) < 1e-2
        assert _rel_err(got, ref) < 1e-2


def test_partial_gradients_and_entropy_alone():
    hidden, weight, targets = _problem(17, 40, 100, torch.float32, seed=7)
    frozen_w, frozen_h = weight.detach(), hidden.detach()
    lp, _ = chunked.linear_logprobs_chunked(hidden, frozen_w, targets, chunk_size=5)
    ref, _ = ops.linear_logprobs_torch(hidden, frozen_w, targets, chunk_size=5)
    torch.testing.assert_close(torch.autograd.grad(lp.sum(), hidden)[0], torch.autograd.grad(ref.sum(), hidden)[0],
                               rtol=1e-4, atol=1e-6)
    lp, _ = chunked.linear_logprobs_chunked(frozen_h, weight, targets, chunk_size=5)
    ref, _ = ops.linear_logprobs_torch(frozen_h, weight, targets, chunk_size=5)
    torch.testing.assert_close(torch.autograd.grad(lp.sum(), weight)[0], torch.autograd.grad(ref.sum(), weight)[0],
                               rtol=1e-4, atol=1e-6)
    # the entropy alone carries the gradient (the log-probs' is None)
    _, ent = chunked.linear_logprobs_chunked(hidden, weight, targets, True, chunk_size=5)
    _, ref_ent = ops.linear_logprobs_torch(hidden, weight, targets, True, chunk_size=5)
    for got, ref in zip(torch.autograd.grad(ent.sum(), (hidden, weight)),
                        torch.autograd.grad(ref_ent.sum(), (hidden, weight))):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        assert chunked.linear_logprobs_chunked(hidden, weight, targets)[0].grad_fn is None


def test_strided_inputs_int32_targets_peaked_logits():
    """A column-sliced hidden, a transposed weight (strides, not copies), int32 targets taken every other
    element, logits of std 30 (entropy near 0, log-probs down to -100s)."""
    hidden, weight, targets = _problem(17, 40, 100, torch.float32, seed=8, scale=30.0)
    wide = torch.cat([hidden.detach(), torch.randn(17, 9)], dim=1)[:, :40].requires_grad_()
    weight_t = weight.detach().t().contiguous().t().requires_grad_()
    every_other = torch.stack([targets, targets], dim=1).int().reshape(-1)[::2]
    assert not wide.is_contiguous() and not weight_t.is_contiguous() and not every_other.is_contiguous()
    lp, ent = chunked.linear_logprobs_chunked(wide, weight_t, every_other, True, chunk_size=4)
    ref_lp, ref_ent = ops.linear_logprobs_torch(hidden, weight, targets, True)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(_loss(lp, ent), (wide, weight_t))
    for got, ref in zip(grads, torch.autograd.grad(_loss(ref_lp, ref_ent), (hidden, weight))):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_chunks_bound_every_gemm(monkeypatch):
    """Forward and backward GEMMs see at most chunk_size rows; every row is covered."""
    seen = []
    real = chunked.chunk_logits

    def spy(hidden_CD, weight_VD, fp32_logits):
        seen.append(hidden_CD.shape[0])
        return real(hidden_CD, weight_VD, fp32_logits)

    monkeypatch.setattr(chunked, "chunk_logits", spy)
    hidden, weight, targets = _problem(17, 16, 50, torch.float32)
    lp, _ = chunked.linear_logprobs_chunked(hidden, weight, targets, chunk_size=5)
    lp.sum().backward()
    assert seen == [5, 5, 5, 2] * 2


def test_chunk_rows_budget():
    V = 200064
    assert chunked.chunk_rows(1024, V, 2, fp32_blocks=2) == 512  # torch pass, bf16: 10 bytes a logit
    assert chunked.chunk_rows(1024, V, 2, fp32_blocks=1) == 768  # Triton row kernels: fp32 logits + bf16 dz
    for rows, elem, blocks in [(512, 2, 2), (768, 2, 1), (256, 4, 2)]:
        assert rows * V * (4 * blocks + elem) <= chunked.CHUNK_BUDGET_BYTES
        assert chunked.chunk_rows(10**6, V, elem, blocks) == rows
    assert chunked.chunk_rows(300, V, 2, 2) == 300  # within the budget: the caller's
    assert chunked.chunk_rows(7, 50, 4, 2) == 7
    assert chunked.chunk_rows(1000, 10**9, 2, 2) == 1  # never none
    assert chunked.chunk_rows(1000, 10**7, 2, 2) == 10  # below one GEMM tile: not rounded to nothing
    with pytest.raises(ValueError):
        chunked.chunk_rows(0, V, 2, 2)


def test_registered_dispatches_mixed_dtypes_and_autocast():
    assert "chunked" in ops.available("linear_logprobs")
    hidden, weight, targets = _problem(7, 33, 257, torch.float32, seed=3)
    with ops.using(linear_logprobs="chunked"):
        lp, ent = ops.linear_logprobs(hidden, weight, targets, True, chunk_size=3)
    ref_lp, ref_ent = ops.linear_logprobs_torch(hidden, weight, targets, True)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    # different dtypes run the reference; autocast does not lower the fp32 head's GEMMs
    mixed, _ = chunked.linear_logprobs_chunked(hidden.bfloat16(), weight, targets)
    torch.testing.assert_close(mixed, ops.linear_logprobs_torch(hidden.bfloat16(), weight, targets)[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, _ = chunked.linear_logprobs_chunked(hidden, weight, targets, chunk_size=3)
        grads = torch.autograd.grad(lp.sum(), (hidden, weight))
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    assert grads[0].dtype == torch.float32
    torch.testing.assert_close(grads[0], torch.autograd.grad(ref_lp.sum(), hidden)[0], rtol=1e-4, atol=1e-6)


def _float64_truth(hidden, weight, targets, temperature, fp32_logits):
    """(logprob, entropy) in float64 from the same logits (rounded through the inputs' dtype for
    fp32_logits=False), differentiable w.r.t. hidden and weight."""
    logits = F.linear(hidden.double(), weight.double()) if fp32_logits else F.linear(hidden, weight).double()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


@settings(max_examples=30, deadline=None)
@given(N=st.integers(0, 12), D=st.integers(1, 20), V=st.integers(1, 70), chunk_size=st.integers(1, 8),
       temperature=st.floats(0.25, 4.0), entropy=st.booleans(), fp32_logits=st.booleans(),
       seed=st.integers(0, 2**16))
def test_matches_reference_at_any_shape(N, D, V, chunk_size, temperature, entropy, fp32_logits, seed):
    """Values as the reference's; gradients as float64's: at peaked logits (std 3 / T 0.25) the reference's
    own entropy gradient is off by ~1e-4 (its entropy is lse - sum p z, which cancels), ours by ~1e-6."""
    hidden, weight, targets = _problem(N, D, V, torch.float32, seed=seed, scale=3.0)
    kwargs = {"fp32_logits": fp32_logits, "temperature": temperature, "chunk_size": chunk_size}
    lp, ent = chunked.linear_logprobs_chunked(hidden, weight, targets, entropy, **kwargs)
    ref_lp, ref_ent = ops.linear_logprobs_torch(hidden, weight, targets, entropy, **kwargs)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=1e-5)
    if entropy:
        torch.testing.assert_close(ent, ref_ent, rtol=1e-5, atol=1e-5)
    if N:
        true_lp, true_ent = _float64_truth(hidden, weight, targets, temperature, fp32_logits)
        truth = torch.autograd.grad(_loss(true_lp, true_ent if entropy else None), (hidden, weight))
        for got, true in zip(torch.autograd.grad(_loss(lp, ent), (hidden, weight)), truth):
            torch.testing.assert_close(got, true.float(), rtol=1e-4, atol=1e-5)


# ---- GPU: the M2 head's shapes in bf16 --------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("fp32_logits", [True, False])
def test_m2_head_bf16_on_cuda(fp32_logits):
    """N=2048 in 512-row chunks (the 1 GiB budget cuts the default 1024) at D 3072, V 200064: values as the
    reference's, gradients within bf16 roundings of its fp32-input ones, extra memory under the budget."""
    N, D, V = 2048, 3072, 200064
    gen = torch.Generator("cuda").manual_seed(0)
    hidden = torch.randn(N, D, generator=gen, device="cuda").bfloat16().requires_grad_()
    weight = (torch.randn(V, D, generator=gen, device="cuda") * 4 / math.sqrt(D)).bfloat16().requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen, device="cuda")
    a = torch.randn(N, generator=gen, device="cuda") / N
    b = torch.randn(N, generator=gen, device="cuda") / N
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        lp, ent = chunked.linear_logprobs_chunked(hidden, weight, targets, True, fp32_logits=fp32_logits)
        ((a * lp).sum() + (b * ent).sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - hidden.grad.nbytes - weight.grad.nbytes
    assert extra < chunked.CHUNK_BUDGET_BYTES + (64 << 20), f"{extra / 2**20:.0f} MiB beyond the gradients"
    ref_lp, ref_ent, ref_gh = [], [], []
    h32, w32 = hidden.detach().float(), weight.detach().float().requires_grad_()
    for s in range(0, N, 512):  # the reference's fp32 gradients, 512 rows at a time
        h = h32[s:s + 512].requires_grad_()
        lp_c, ent_c = ops.linear_logprobs_torch(h, w32, targets[s:s + 512], True, fp32_logits=fp32_logits)
        ((a[s:s + 512] * lp_c).sum() + (b[s:s + 512] * ent_c).sum()).backward()
        ref_lp.append(lp_c.detach())
        ref_ent.append(ent_c.detach())
        ref_gh.append(h.grad)
    if fp32_logits:  # fp32_logits=False: bf16 logits here, fp32 ones in the fp32-input reference
        torch.testing.assert_close(lp, torch.cat(ref_lp), rtol=1e-4, atol=2e-3)
        torch.testing.assert_close(ent, torch.cat(ref_ent), rtol=1e-4, atol=2e-3)
    assert _rel_err(hidden.grad, torch.cat(ref_gh)) < 2e-2 and _rel_err(weight.grad, w32.grad) < 2e-2
