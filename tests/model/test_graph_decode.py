"""The static-shape decode step (model/graph_decode.py) against the model's own cached forward.

On the CPU the step runs eagerly (`use_graphs=False`): the math the CUDA graphs capture. The GPU tests
capture it and replay it."""

import pytest
import torch
from m2rl.model import SamplingParams, generate, ops
from m2rl.model.generation import _eager_decoder, _graph_decoder
from m2rl.model.graph_decode import MIN_WIDTH_BUCKET, GraphDecoder, bucket

PROMPTS = [[5, 17, 300, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]


def test_bucket_is_the_next_power_of_two_capped():
    assert [bucket(n, 1, 64) for n in (1, 2, 3, 5, 64, 65)] == [1, 2, 4, 8, 64, 64]
    assert bucket(3, MIN_WIDTH_BUCKET, 1000) == 128 and bucket(129, 128, 200) == 200


def _steps(make, model, prompts, tokens):
    """Logits of the prefill and of `tokens` decode steps fed the same (argmax) ids."""
    logits, step = make(model, prompts, tokens)
    out = [logits.clone()]
    for _ in range(tokens - 1):
        logits = step(torch.argmax(out[-1], dim=-1))
        out.append(logits.clone())
    return torch.stack(out, 1)


def test_static_decode_step_equals_the_cached_forward(tiny_model):
    eager = _steps(lambda m, p, t: _eager_decoder(m, p, t, "left"), tiny_model, PROMPTS, 6)
    static = _steps(lambda m, p, t: _graph_decoder(m, p, t, use_graphs=False), tiny_model, PROMPTS, 6)
    assert torch.allclose(static, eager, atol=1e-4, rtol=1e-4)


def test_rows_at_different_lengths_and_padding_rows(tiny_model):
    """A step over 3 of 4 cache rows, each at its own length, equals each sequence decoded alone."""
    c = tiny_model.config
    shape = (c.num_hidden_layers, 4, c.num_key_value_heads, 64, c.head_dim)
    k, v = torch.zeros(shape), torch.zeros(shape)
    decoder = GraphDecoder(tiny_model, k, v, use_graphs=False)
    lengths = torch.zeros(3, dtype=torch.long)
    per_row = []
    for b, prompt in enumerate(PROMPTS):  # fill each row token by token through the decoder itself
        lengths_b = torch.zeros(1, dtype=torch.long)
        for t in prompt:
            row_k, row_v = k[:, b:b + 1], v[:, b:b + 1]
            alone = GraphDecoder(tiny_model, row_k, row_v, use_graphs=False)
            last = alone.logits(torch.tensor([t]), lengths_b)
            lengths_b += 1
        lengths[b] = len(prompt)
        per_row.append(last[0])
    next_ids = torch.stack([torch.argmax(r) for r in per_row])
    together = decoder.logits(next_ids, lengths).clone()
    with torch.no_grad():
        for b, prompt in enumerate(PROMPTS):
            ref = tiny_model(torch.tensor([prompt + [int(next_ids[b])]]))[0, -1].float()
            assert torch.allclose(together[b], ref, atol=1e-4, rtol=1e-4)


def test_overflow_and_row_count_are_clear_errors(tiny_model):
    c = tiny_model.config
    shape = (c.num_hidden_layers, 2, c.num_key_value_heads, 8, c.head_dim)
    decoder = GraphDecoder(tiny_model, torch.zeros(shape), torch.zeros(shape), use_graphs=False)
    with pytest.raises(ValueError, match="overflow"):
        decoder.logits(torch.tensor([1]), torch.tensor([8]))
    with pytest.raises(ValueError, match="3 rows"):
        decoder.logits(torch.tensor([1, 2, 3]), torch.tensor([0, 0, 0]))


@pytest.mark.gpu
def test_cuda_graph_generate_equals_eager(tiny_model, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model.to("cuda")
    params = SamplingParams(max_tokens=12, greedy=True)
    monkeypatch.setenv("M2RL_CUDA_GRAPHS", "0")
    eager = generate(model, PROMPTS, params)
    monkeypatch.setenv("M2RL_CUDA_GRAPHS", "1")
    graphed = generate(model, PROMPTS, params)
    assert [o.ids for o in graphed] == [o.ids for o in eager]
    diff = max(abs(a - b) for g, e in zip(graphed, eager) for a, b in zip(g.logprobs, e.logprobs))
    assert diff < 1e-3


@pytest.mark.gpu
def test_cuda_graph_replays_new_inputs_and_weight_updates(tiny_model):
    """Captured once, replayed with other ids, lengths and (in-place loaded) weights: equals eager."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model.to("cuda")
    c = model.config
    shape = (c.num_hidden_layers, 4, c.num_key_value_heads, 256, c.head_dim)
    k = torch.randn(shape, device="cuda")
    v = torch.randn(shape, device="cuda")
    graphed = GraphDecoder(model, k, v)
    with torch.no_grad():
        for trial in range(3):
            ids = torch.randint(0, c.vocab_size, (3,), device="cuda")
            lengths = torch.randint(0, 100, (3,), device="cuda")
            if trial == 2:
                state = {n: p + 0.01 * torch.randn_like(p) for n, p in model.state_dict().items()}
                model.load_state_dict(state)
            kk, vv = k.clone(), v.clone()
            ref = GraphDecoder(model, kk, vv, use_graphs=False).logits(ids, lengths).clone()
            got = graphed.logits(ids, lengths).clone()
            assert torch.allclose(got, ref, atol=1e-3, rtol=1e-3), (trial, ops.selected("moe_experts"))
    assert graphed.captures >= 1


@pytest.mark.gpu
def test_cuda_scheduler_replays_graphs_and_equals_generate(monkeypatch):
    """`m2rl serve`'s continuous batching on CUDA: rows join and leave between replayed steps, yet each
    greedy output is eager `generate`'s for its prompt alone."""
    import asyncio
    from pathlib import Path

    from m2rl.model import load_pretrained
    from m2rl.model.serving.request import Request, Token
    from m2rl.model.serving.scheduler import Scheduler, SchedulerConfig

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    tiny = Path(__file__).resolve().parents[2] / "model" / "assets" / "tiny-python-sft"
    model = load_pretrained(tiny, device="cuda")
    prompts = [[int(t) for t in torch.randint(5, 4000, (n,), generator=torch.Generator().manual_seed(n))]
               for n in (3, 17, 40, 9, 64)]
    params = SamplingParams(max_tokens=24, greedy=True)

    async def run() -> tuple[list[list[int]], int]:
        scheduler = Scheduler(model, SchedulerConfig(max_batch=3, max_model_len=256))
        assert scheduler._graphs is not None
        await scheduler.start()

        async def one(i: int, prompt: list[int]) -> list[int]:
            await asyncio.sleep(0.003 * i)
            return [e.token_id async for e in scheduler.submit(Request(prompt, params)).events()
                    if isinstance(e, Token)]

        outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        captures = scheduler._graphs.captures
        await scheduler.stop()
        return list(outs), captures

    outs, captures = asyncio.run(run())
    monkeypatch.setenv("M2RL_CUDA_GRAPHS", "0")
    for prompt, ids in zip(prompts, outs):
        assert ids == generate(model, [prompt], params)[0].ids
    assert captures >= 1


@pytest.mark.gpu
def test_bf16_head_with_fp32_output_equals_the_cast_head(tiny_model):
    from m2rl.model.graph_decode import lm_head_fp32

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model.to("cuda", torch.bfloat16)
    hidden = torch.randn(5, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    ref = model.logits(hidden, fp32=True)
    got = lm_head_fp32(model, hidden)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
