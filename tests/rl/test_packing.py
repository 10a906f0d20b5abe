"""Packed learner batches (rl/packing.py, M2 `cu_seqlens` attention): the padded computation is the oracle."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from m2rl.model import M2Config, M2ForCausalLM, token_logprobs
from m2rl.model import attention as attention_module
from m2rl.model.attention import PackedSegments, packed_attention
from m2rl.rl.batch import collate
from m2rl.rl.learner import Learner, LearnerConfig, pack_micro_batches
from m2rl.rl.packing import pack, packed_token_logprobs, unpack
from rl_test_doubles import TinyCausalLM, random_batch

LENGTHS = [1, 2, 17, 64]


@pytest.fixture(scope="module")
def tiny_m2() -> M2ForCausalLM:
    """fp32 tiny M2 with non-trivial norms and routing bias (bugs in them show up)."""
    model = M2ForCausalLM(M2Config.from_preset("tiny")).init_weights(std=0.1, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        for _, b in model.named_buffers():
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    return model.eval()


def batch_of(lengths: list[int], vocab: int, seed: int = 0, prompt: int = 3):
    """Right-padded rows of these lengths; tokens from position `prompt` on are loss tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
    masks = [[int(t >= prompt) for t in range(n)] for n in lengths]
    logprobs = [(-3 * torch.rand(n, generator=g)).tolist() for n in lengths]
    advantages = torch.randn(len(lengths), generator=g).tolist()
    return collate(ids, masks, logprobs, advantages)


def padded_logprobs(model, batch, target_mask=None, return_entropy=False):
    return token_logprobs(model, batch.input_ids, batch.attention_mask, return_entropy=return_entropy,
                          chunk_size=16, target_mask=target_mask)


# ---- attention ------------------------------------------------------------------------------------


def test_packed_attention_equals_block_diagonal_mask():
    lengths = (5, 1, 0, 12, 3)  # a zero-length segment is allowed and skipped
    n, g = sum(lengths), torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, n, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 4, n, 16, generator=g, dtype=torch.float64)
    v = torch.randn(1, 4, n, 16, generator=g, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    segments = PackedSegments.from_cu_seqlens(cu, n, torch.device("cpu"))
    seg = segments.segment_ids()
    idx = torch.arange(n)
    mask = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])  # the oracle: block-diagonal causal
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], enable_gqa=True)
    torch.testing.assert_close(packed_attention(q, k, v, segments, enable_gqa=True), ref)
    assert segments.positions()[0].tolist() == [*range(5), 0, *range(12), *range(3)]


def test_positions_restart_in_each_segment(tiny_m2, monkeypatch):
    # RoPE is relative, so a constant offset inside a segment barely changes the log-probs: check the positions
    import m2rl.model.m2 as m2_module

    seen = []

    def spy(positions, *args):
        seen.append(positions)
        return attention_module.rope_cos_sin(positions, *args)

    monkeypatch.setattr(m2_module, "rope_cos_sin", spy)
    with torch.no_grad():
        tiny_m2.hidden_states(torch.zeros(1, 6, dtype=torch.long), cu_seqlens=torch.tensor([0, 2, 6]))
    assert seen[0].tolist() == [[0, 1, 0, 1, 2, 3]]


def test_cu_seqlens_is_checked(tiny_m2):
    ids = torch.zeros(1, 6, dtype=torch.long)
    for bad in ([0, 3, 5], [1, 3, 6], [0, 4, 3, 6]):
        with pytest.raises(ValueError, match="cu_seqlens must rise"):
            tiny_m2.hidden_states(ids, cu_seqlens=torch.tensor(bad, dtype=torch.int32))
    with pytest.raises(ValueError, match="input_ids \\[1, N\\] alone"):
        tiny_m2.hidden_states(ids.expand(2, 6), cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="input_ids \\[1, N\\] alone"):
        tiny_m2.hidden_states(ids, attention_mask=torch.ones(1, 6), cu_seqlens=torch.tensor([0, 6]))


# ---- log-probs ------------------------------------------------------------------------------------


@torch.no_grad()
def test_packed_logprobs_equal_padded(tiny_m2):
    batch = batch_of(LENGTHS, tiny_m2.config.vocab_size)
    rows = [2, 0, 3, 1]  # any order
    packed = pack(batch, rows)
    assert packed.input_ids.shape == (1, sum(LENGTHS)) and packed.cu_seqlens.tolist() == [0, 17, 18, 82, 84]
    width = max(LENGTHS)
    # every position (no target mask) and loss positions only, with entropy
    lp = packed_token_logprobs(tiny_m2, packed, chunk_size=16)
    ref = padded_logprobs(tiny_m2, batch)[rows]
    torch.testing.assert_close(unpack(lp, packed, width), ref, rtol=0, atol=1e-5)
    lp, ent = packed_token_logprobs(tiny_m2, packed, return_entropy=True, chunk_size=16,
                                    target_mask=packed.loss_mask)
    ref, ref_ent = padded_logprobs(tiny_m2, batch, target_mask=batch.loss_mask, return_entropy=True)
    torch.testing.assert_close(unpack(lp, packed, width), ref[rows], rtol=0, atol=1e-5)
    torch.testing.assert_close(unpack(ent, packed, width), ref_ent[rows], rtol=0, atol=1e-5)
    assert (ref[rows].abs() > 0.1).sum() > 50  # the comparison is not between zeros


@torch.no_grad()
def test_segments_do_not_see_each_other(tiny_m2):
    batch = batch_of(LENGTHS, tiny_m2.config.vocab_size, seed=1)
    packed = pack(batch, [0, 1, 2, 3])
    lp = packed_token_logprobs(tiny_m2, packed)
    starts = packed.cu_seqlens[:-1].long()
    assert (lp[0, starts] == 0).all()  # nothing in its own segment predicts a first token
    assert (lp[0, 1:] != 0).sum() == sum(LENGTHS) - len(LENGTHS)
    # new tokens in segments 0-2 leave segment 3 (tokens 20..83) as it was
    changed = copy.deepcopy(packed)
    changed.input_ids[0, :20] = (changed.input_ids[0, :20] + 7) % tiny_m2.config.vocab_size
    lp_changed = packed_token_logprobs(tiny_m2, changed)
    assert not torch.allclose(lp_changed[0, :20], lp[0, :20])
    torch.testing.assert_close(lp_changed[0, 20:], lp[0, 20:], rtol=0, atol=1e-6)


def test_pack_unpack_round_trip():
    batch = random_batch(torch.Generator().manual_seed(3), rows=5, max_len=11)
    batch.ref_logprobs = torch.randn(batch.input_ids.shape, dtype=torch.float64)
    packed = pack(batch, [4, 1, 3])
    lengths = batch.lengths()
    assert packed.lengths == [lengths[4], lengths[1], lengths[3]] and packed.num_tokens == sum(packed.lengths)
    width = max(packed.lengths)
    attn = batch.attention_mask[[4, 1, 3], :width].bool()
    for name in ("input_ids", "loss_mask", "old_logprobs", "advantages", "ref_logprobs"):
        padded = getattr(batch, name)[[4, 1, 3], :width]
        torch.testing.assert_close(unpack(getattr(packed, name), packed), torch.where(attn, padded, 0), msg=name)


def test_packed_gradients_equal_padded(tiny_m2):
    batch = batch_of(LENGTHS, tiny_m2.config.vocab_size, seed=2)
    weights = torch.randn(batch.input_ids.shape, generator=torch.Generator().manual_seed(0)) * batch.loss_mask
    grads = []
    for packed_path in (False, True):
        model = copy.deepcopy(tiny_m2).train()
        if packed_path:
            packed = pack(batch, list(range(len(LENGTHS))))
            lp = unpack(packed_token_logprobs(model, packed, target_mask=packed.loss_mask), packed)
        else:
            lp = padded_logprobs(model, batch, target_mask=batch.loss_mask)
        (lp * weights).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


# ---- micro-batches and the learner ------------------------------------------------------------------


def test_micro_batches_cut_by_real_tokens():
    lengths = [64, 1, 17, 2, 40, 30, 100, 5]
    groups = pack_micro_batches(lengths, 70, packed=True)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [6] in groups  # longer than the budget: on its own
    for g in groups:
        assert g == [6] or sum(lengths[i] for i in g) <= 70
    # first fit by real tokens needs fewer forwards than the padded rule (rows x longest row <= 70)
    assert groups == [[6], [0, 7, 1], [4, 5], [2, 3]]  # longest first, each into the first group with room
    assert len(pack_micro_batches(lengths, 70)) == 5
    assert pack_micro_batches([3, 3, 3], 9, packed=True) == [[0, 1, 2]]
    assert pack_micro_batches([3, 3, 3], 8, packed=True) == [[0, 1], [2]]


def update_once(model, batch, packing: bool, **overrides):
    config = LearnerConfig(lr=1e-3, packing=packing, micro_batch_tokens=40, mini_batches=2, shuffle=False,
                           **overrides)
    learner = Learner(model, config)
    assert learner.packing is packing
    return learner.update(batch)


@pytest.mark.parametrize("kind", ["cispo", "grpo"])
def test_learner_update_same_with_and_without_packing(tiny_m2, kind, monkeypatch):
    from m2rl.rl.losses import LossConfig

    batch = batch_of([1, 2, 17, 64, 9, 30], tiny_m2.config.vocab_size, seed=4)
    calls = []
    hidden_states = M2ForCausalLM.hidden_states

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("cu_seqlens") is not None)
        return hidden_states(self, *args, **kwargs)

    monkeypatch.setattr(M2ForCausalLM, "hidden_states", spy)
    out = {}
    for packing in (False, True):
        model = copy.deepcopy(tiny_m2)
        calls.clear()
        metrics = update_once(model, batch, packing, loss=LossConfig(kind=kind))
        assert calls and all(c == packing for c in calls)
        out[packing] = metrics, dict(model.named_parameters())
    (m_pad, w_pad), (m_pack, w_pack) = out[False], out[True]
    timing = {"tokens_per_s", "update_time_s"}
    assert m_pad.keys() == m_pack.keys()
    for key in m_pad.keys() - timing:
        assert m_pack[key] == pytest.approx(m_pad[key], rel=1e-5, abs=1e-5), key
    assert m_pad["optimizer_steps"] == 2 and m_pad["entropy"] > 0
    changed = 0
    for name, p in w_pad.items():
        torch.testing.assert_close(w_pack[name], p, rtol=0, atol=1e-5, msg=name)
        changed += int(not torch.equal(p, tiny_m2.get_parameter(name)))
    assert changed > 10  # the update moved the weights being compared


def test_non_m2_models_keep_the_padded_path():
    learner = Learner(TinyCausalLM(), LearnerConfig(packing=True))
    assert not learner.packing
    metrics = learner.update(random_batch(torch.Generator().manual_seed(0)))
    assert metrics["optimizer_steps"] == 1


def test_a_flex_failure_falls_back_for_its_kind_of_call_only(monkeypatch):
    """A FlexAttention lowering failure (say, a head size its templates refuse) sends that kind of call to
    SDPA per segment, exactly, and leaves FlexAttention on for the others."""
    calls = []

    def flaky_flex(q, k, v, block_mask, enable_gqa):
        calls.append(q.shape[-1])
        if q.shape[-1] == 16:
            raise RuntimeError("LoweringException: head_dim 16")
        return torch.zeros_like(q)

    monkeypatch.setitem(attention_module._FLEX, "fn", flaky_flex)
    monkeypatch.setattr(attention_module, "_FLEX_FAILED", set())
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    segments = PackedSegments(cu, (3, 5), block_mask=object())
    g = torch.Generator().manual_seed(0)
    q16, k16, v16 = (torch.randn(1, 2, 8, 16, generator=g) for _ in range(3))
    exact = packed_attention(q16, k16, v16, PackedSegments(cu, (3, 5)), enable_gqa=False)
    for _ in range(2):  # the failing kind: SDPA's exact result, FlexAttention tried once only
        torch.testing.assert_close(packed_attention(q16, k16, v16, segments, enable_gqa=False), exact)
    q32 = torch.randn(1, 2, 8, 32, generator=g)
    assert packed_attention(q32, q32, q32, segments, enable_gqa=False).abs().sum() == 0  # still Flex
    assert calls == [16, 32]


# ---- CUDA: FlexAttention vs SDPA per segment ---------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_attention_matches_sdpa_per_segment(dtype):
    lengths = (300, 1, 17, 700, 2, 128)
    n, device = sum(lengths), torch.device("cuda")
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    flex = PackedSegments.from_cu_seqlens(cu, n, device)
    assert flex.block_mask is not None, "FlexAttention was not available (see the log warning)"
    sdpa = PackedSegments(flex.cu_seqlens, flex.lengths)
    g = torch.Generator(device).manual_seed(0)
    qkv = [torch.randn(1, h, n, 128, generator=g, device=device, dtype=dtype).requires_grad_()
           for h in (8, 2, 2)]
    grad_out = torch.randn(1, 8, n, 128, generator=g, device=device, dtype=dtype)
    results = []
    for segments in (flex, sdpa):
        out = packed_attention(*qkv, segments, enable_gqa=True)
        grads = torch.autograd.grad(out, qkv, grad_out)
        results.append((out, *grads))
    kind = (8, 2, 128, dtype, qkv[0].device)
    assert attention_module._FLEX["fn"] is not None and kind not in attention_module._FLEX_FAILED, \
        "FlexAttention failed and fell back to SDPA (see the log warning)"
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-4}
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_packed_logprobs_equal_padded_on_cuda(tiny_m2):
    model = copy.deepcopy(tiny_m2).cuda()
    batch = batch_of([1, 2, 17, 64, 300], model.config.vocab_size, seed=5)
    batch = type(batch)(**{k: (v.cuda() if v is not None else None) for k, v in vars(batch).items()})
    packed = pack(batch, list(range(5)))
    with torch.no_grad():
        lp = unpack(packed_token_logprobs(model, packed), packed)
        ref = padded_logprobs(model, batch)
    torch.testing.assert_close(lp, ref, rtol=0, atol=1e-4)
