import pytest
import torch
from m2rl.model import SamplingParams, generate
from m2rl.model.sampling import sample_from_logits, sampling_logits, top_k_filter, top_p_filter

PROMPTS = [[5, 17, 300, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]


def full_forward_logprobs(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids)[0].float()
    lp = torch.log_softmax(logits, -1)
    return [lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(completion)], logits


@pytest.mark.parametrize("side", ["left", "right"])
def test_kv_cache_decode_equals_full_forward(tiny_model, side):
    outs = generate(tiny_model, PROMPTS, SamplingParams(max_tokens=6, seed=0), padding_side=side)
    for prompt, out in zip(PROMPTS, outs):
        assert len(out.ids) == 6 and out.finish_reason == "length"
        ref, _ = full_forward_logprobs(tiny_model, prompt, out.ids)
        assert out.raw_logprobs == pytest.approx(ref, abs=1e-4)
        assert out.logprobs == pytest.approx(ref, abs=1e-4)  # T=1, no filtering: same distribution


def test_greedy_matches_argmax_of_full_forward(tiny_model):
    outs = generate(tiny_model, PROMPTS, SamplingParams(max_tokens=5, greedy=True))
    for prompt, out in zip(PROMPTS, outs):
        _, logits = full_forward_logprobs(tiny_model, prompt, out.ids)
        argmax = logits[len(prompt) - 1:-1].argmax(-1).tolist() + [logits[-1].argmax().item()]
        assert out.ids == argmax[:5]
    single = generate(tiny_model, [PROMPTS[1]], SamplingParams(max_tokens=5, greedy=True))[0]
    assert single.ids == outs[1].ids  # batching with padding changes nothing


def test_kv_cache_chunked_prefill_equals_full(tiny_model):
    ids = torch.randint(0, 4096, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = tiny_model(ids)
        cache = tiny_model.new_kv_cache(2, 16)
        parts = [tiny_model(ids[:, a:b], kv_cache=cache) for a, b in ((0, 5), (5, 6), (6, 12))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="overflow"):
        tiny_model(ids[:, :5], kv_cache=cache)


def test_padded_forward_matches_unpadded(tiny_model):
    prompt = [7, 8, 9, 10, 11]
    with torch.no_grad():
        ref = tiny_model(torch.tensor([prompt]))[0]
        left = tiny_model(torch.tensor([[0, 0, 0] + prompt]), attention_mask=torch.tensor([[0, 0, 0] + [1] * 5]))[0, 3:]
        right = tiny_model(torch.tensor([prompt + [0, 0]]), attention_mask=torch.tensor([[1] * 5 + [0, 0]]))[0, :5]
    torch.testing.assert_close(left, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(right, ref, rtol=1e-5, atol=1e-5)


def test_seed_is_deterministic(tiny_model):
    p = SamplingParams(max_tokens=8, temperature=1.3, top_k=50, top_p=0.95, seed=123)
    a, b = generate(tiny_model, PROMPTS, p), generate(tiny_model, PROMPTS, p)
    assert [o.ids for o in a] == [o.ids for o in b] and [o.logprobs for o in a] == [o.logprobs for o in b]
    c = generate(tiny_model, PROMPTS, SamplingParams(max_tokens=8, temperature=1.3, top_k=50, top_p=0.95, seed=7))
    assert [o.ids for o in a] != [o.ids for o in c]


def test_sampling_logprobs_are_under_the_filtered_distribution(tiny_model):
    p = SamplingParams(max_tokens=5, temperature=0.7, top_k=20, top_p=0.8, seed=1)
    out = generate(tiny_model, [PROMPTS[0]], p)[0]
    raw, logits = full_forward_logprobs(tiny_model, PROMPTS[0], out.ids)
    assert out.raw_logprobs == pytest.approx(raw, abs=1e-4)
    for i, tok in enumerate(out.ids):
        row = logits[len(PROMPTS[0]) - 1 + i][None]
        dist = torch.log_softmax(sampling_logits(row, 0.7, 20, 0.8), -1)[0]
        assert dist[tok].item() == pytest.approx(out.logprobs[i], abs=1e-4)
        assert out.logprobs[i] > out.raw_logprobs[i]  # filtering + T<1 concentrate the mass


def test_stop_ids_and_max_tokens(tiny_model):
    greedy = generate(tiny_model, [PROMPTS[0]], SamplingParams(max_tokens=6, greedy=True))[0]
    stop_tok = greedy.ids[2]
    first = greedy.ids.index(stop_tok)
    out = generate(tiny_model, [PROMPTS[0], PROMPTS[1]], SamplingParams(max_tokens=6, greedy=True, stop_ids=(stop_tok,)))
    assert out[0].ids == greedy.ids[:first + 1] and out[0].finish_reason == "stop"
    assert len(out[0].logprobs) == len(out[0].raw_logprobs) == first + 1
    assert generate(tiny_model, [PROMPTS[0]], SamplingParams(max_tokens=0))[0].ids == []


def test_bad_inputs(tiny_model):
    with pytest.raises(ValueError, match="empty"):
        generate(tiny_model, [[]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="outside"):
        generate(tiny_model, [[1, 99999]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(max_tokens=2, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(max_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(tiny_model, [[1, 2]], SamplingParams(max_tokens=10_000))
    with pytest.raises(ValueError, match="batch, tokens"):
        tiny_model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="out of range"):
        tiny_model(torch.tensor([[1, 4096]]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        tiny_model(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3))


# ---- pure sampling math against references -----------------------------------------------------------
def ref_top_k(row: list[float], k: int) -> set[int]:
    kth = sorted(row, reverse=True)[k - 1]
    return {i for i, v in enumerate(row) if v >= kth}


def ref_top_p(row: list[float], p: float) -> set[int]:
    probs = torch.softmax(torch.tensor(row, dtype=torch.float64), 0).tolist()
    kept, mass = set(), 0.0
    for i in sorted(range(len(row)), key=lambda i: -probs[i]):
        if mass >= p:
            break
        kept.add(i)
        mass += probs[i]
    return kept


@pytest.mark.parametrize("seed", range(5))
def test_top_k_top_p_against_reference(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 50, generator=g) * 3
    for k in (1, 5, 17):
        kept = torch.isfinite(top_k_filter(logits, k))
        for b in range(4):
            assert set(kept[b].nonzero()[:, 0].tolist()) == ref_top_k(logits[b].tolist(), k)
    for p in (0.1, 0.5, 0.9, 0.999):
        kept = torch.isfinite(top_p_filter(logits, p))
        for b in range(4):
            assert set(kept[b].nonzero()[:, 0].tolist()) == ref_top_p(logits[b].tolist(), p)


def test_sampler_frequencies_match_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    probs = torch.softmax(logits, -1)[0]
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = sample_from_logits(logits.expand(n, -1), g)
    freq = torch.bincount(draws, minlength=5).double() / n
    assert freq[4] == 0
    # 5 sigma of a binomial proportion
    assert ((freq - probs.double()).abs() <= 5 * (probs.double() * (1 - probs.double()) / n).sqrt() + 1e-9).all()
