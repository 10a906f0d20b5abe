"""Policies: ScriptedPolicy, LocalPolicy (batching, versions) and OpenAIPolicy (wire format, retries, errors).

OpenAIPolicy is tested against httpx.MockTransport handlers written from vLLM's OpenAI server responses,
and against a real uvicorn/FastAPI server over TCP for the retry and connection paths.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)

from agent_loop_doubles import CalculatorEnv, canonical_episode_texts, memorized_model, tiny_config
from m2rl.agent.local_policy import LocalPolicy
from m2rl.agent.openai_policy import (
    OpenAIPolicy,
    normalize_base_url,
    parse_chat,
    split_inline_reasoning,
)
from m2rl.agent.policy import (
    Policy,
    PolicyError,
    PolicyOutput,
    PolicyRequestError,
    PolicyResponseError,
    PolicyUnavailableError,
    SamplingParams,
)
from m2rl.agent.scripted_policy import ScriptedPolicy
from m2rl.model import M2ForCausalLM, M2Tokenizer, generate

TOK = M2Tokenizer.tiny()


def run(coro):
    return asyncio.run(coro)


# ---- PolicyOutput / protocol ---------------------------------------------------------------------------


def test_policy_output_validates():
    with pytest.raises(ValueError, match="2 ids but 1 logprobs"):
        PolicyOutput([1, 2], [0.0], "stop", 0)
    with pytest.raises(ValueError, match="finish_reason"):
        PolicyOutput([1], [0.0], "abort", 0)  # type: ignore[arg-type]


def test_all_policies_satisfy_the_protocol():
    model = M2ForCausalLM(tiny_config())
    for p in (ScriptedPolicy([], TOK), LocalPolicy(model, TOK), OpenAIPolicy("http://localhost:1", "m")):
        assert isinstance(p, Policy)


# ---- ScriptedPolicy ------------------------------------------------------------------------------------


def test_scripted_policy_replays_tokenized_texts():
    p = ScriptedPolicy(["hello world[e~[", "no end"], TOK, policy_version=3)
    out = run(p.generate([0, 1], SamplingParams(max_tokens=50)))
    assert out.ids == TOK.encode("hello world[e~[") and out.finish_reason == "stop"
    assert out.logprobs == [0.0] * len(out.ids) and out.policy_version == 3
    out2 = run(p.generate([0, 1, 2], SamplingParams(max_tokens=50)))
    assert out2.finish_reason == "length" and TOK.decode(out2.ids) == "no end"
    assert p.prompts == [[0, 1], [0, 1, 2]]
    with pytest.raises(PolicyError, match="ran out of script after 2"):
        run(p.generate([0], SamplingParams(max_tokens=5)))


def test_scripted_policy_honours_max_tokens_and_stop_ids():
    ids = TOK.encode("alpha beta gamma delta[e~[")
    p = ScriptedPolicy(["alpha beta gamma delta[e~["] * 2, TOK)
    cut = run(p.generate([0], SamplingParams(max_tokens=2)))
    assert cut.ids == ids[:2] and cut.finish_reason == "length"
    stopped = run(p.generate([0], SamplingParams(max_tokens=50, stop_ids=(ids[1],))))
    assert stopped.ids == ids[:2] and stopped.finish_reason == "stop"


def test_scripted_policy_rejects_bad_input():
    with pytest.raises(TypeError, match="list of texts"):
        ScriptedPolicy("one text", TOK)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        run(ScriptedPolicy(["x"], TOK).generate([], SamplingParams(max_tokens=1)))
    with pytest.raises(ValueError, match="out of range"):
        run(ScriptedPolicy(["x"], TOK).generate([10**9], SamplingParams(max_tokens=1)))
    with pytest.raises(TypeError, match="not an int token id"):
        run(ScriptedPolicy(["x"], TOK).generate([1, "2"], SamplingParams(max_tokens=1)))  # type: ignore[list-item]


# ---- LocalPolicy ---------------------------------------------------------------------------------------


def _model(seed: int = 0) -> M2ForCausalLM:
    return M2ForCausalLM(tiny_config()).init_weights(seed=seed).eval()


PROMPTS = [TOK.encode("]~!b[]~b]user\nhello[e~[\n]~b]ai\n<think>\n"), TOK.encode("]~!b[]~b]user\nhi[e~[\n"),
           TOK.encode("def f(x):"), TOK.encode("[e~[")]


def test_local_policy_batches_concurrent_requests_and_matches_generate():
    model = _model()
    policy = LocalPolicy(model, TOK, batch_window_s=0.05)
    params = SamplingParams(max_tokens=6, greedy=True)

    async def main():
        return await asyncio.gather(*[policy.generate(p, params) for p in PROMPTS])

    outs = run(main())
    assert policy.batch_sizes == [len(PROMPTS)]  # one generate() call served all four
    eos_params = SamplingParams(max_tokens=6, greedy=True, stop_ids=(TOK.eos_id,))
    for prompt, out in zip(PROMPTS, outs):
        [ref] = generate(model, [prompt], eos_params)  # oracle: each prompt alone
        assert out.ids == ref.ids and out.finish_reason == ref.finish_reason
        assert out.logprobs == pytest.approx(ref.raw_logprobs, abs=1e-4)


def test_local_policy_stops_at_eos():
    model, _, _ = memorized_model()  # trained to end its first turn with EOS
    env = CalculatorEnv()
    prompt = TOK.encode(env.reset()[0])
    out = run(LocalPolicy(model, TOK).generate(prompt, SamplingParams(max_tokens=200, greedy=True)))
    assert out.finish_reason == "stop" and out.ids[-1] == TOK.eos_id
    assert TOK.decode(out.ids) == canonical_episode_texts()[0]


def test_local_policy_reports_raw_or_processed_logprobs():
    model = _model()
    params = SamplingParams(max_tokens=8, temperature=0.5, seed=0)
    [ref] = generate(model, [PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0.5, seed=0,
                                                           stop_ids=(TOK.eos_id,)))
    raw = run(LocalPolicy(model, TOK).generate(PROMPTS[0], params))
    assert raw.ids == ref.ids and raw.finish_reason == ref.finish_reason
    # raw mode: temperature-1 log-probs (what vLLM reports and the learner recomputes), not the T=0.5 ones.
    assert raw.logprobs == pytest.approx(ref.raw_logprobs, abs=1e-5)
    assert raw.logprobs != pytest.approx(ref.logprobs, abs=1e-3)
    processed = run(LocalPolicy(model, TOK, logprobs_mode="processed").generate(PROMPTS[0], params))
    assert processed.logprobs == pytest.approx(ref.logprobs, abs=1e-5)


def test_local_policy_seeded_requests_are_not_batched():
    policy = LocalPolicy(_model(), TOK, batch_window_s=0.05)
    seeded = SamplingParams(max_tokens=3, seed=7)

    async def main():
        return await asyncio.gather(*[policy.generate(p, seeded) for p in PROMPTS[:3]])

    outs = run(main())
    assert policy.batch_sizes == [1, 1, 1]
    alone = run(LocalPolicy(policy.model, TOK).generate(PROMPTS[1], seeded))
    assert outs[1].ids == alone.ids  # a seeded request is reproducible whatever else is in flight


def test_local_policy_version_bumps_on_weight_update():
    model = _model(0)
    policy = LocalPolicy(model, TOK)
    params = SamplingParams(max_tokens=4, greedy=True)
    before = run(policy.generate(PROMPTS[0], params))
    assert before.policy_version == 0
    new_weights = _model(1).state_dict()
    assert policy.update_weights(new_weights) == 1
    after = run(policy.generate(PROMPTS[0], params))
    assert after.policy_version == 1
    [ref] = generate(_model(1), [PROMPTS[0]], SamplingParams(max_tokens=4, greedy=True, stop_ids=(TOK.eos_id,)))
    assert after.ids == ref.ids
    assert policy.load_state_dict(new_weights, version=10) == 10
    assert run(policy.generate(PROMPTS[0], params)).policy_version == 10
    with pytest.raises(RuntimeError):
        policy.update_weights({"nope": torch.zeros(1)})
    assert policy.policy_version == 10


def test_local_policy_errors_reach_the_caller_and_worker_survives(monkeypatch):
    policy = LocalPolicy(_model(), TOK)
    with pytest.raises(ValueError, match="out of range"):
        run(policy.generate([TOK.vocab_size + 5], SamplingParams(max_tokens=2)))
    with pytest.raises(ValueError, match="max_tokens"):
        run(policy.generate([1], SamplingParams(max_tokens=0)))
    with pytest.raises(ValueError, match="exceeds max_model_len 4096"):
        run(policy.generate([1] * 4000, SamplingParams(max_tokens=100)))
    with pytest.raises(ValueError, match="max_batch_size"):
        LocalPolicy(policy.model, TOK, max_batch_size=0)

    import m2rl.agent.local_policy as lp_module

    real_generate, calls = lp_module.generate, []

    def failing_once(model, prompts, params):
        calls.append(len(prompts))
        if len(calls) == 1:
            raise RuntimeError("simulated generate failure")
        return real_generate(model, prompts, params)

    monkeypatch.setattr(lp_module, "generate", failing_once)

    async def both():
        with pytest.raises(RuntimeError, match="simulated"):
            await policy.generate([1, 2], SamplingParams(max_tokens=2, greedy=True))
        return await policy.generate([1, 2, 3], SamplingParams(max_tokens=2, greedy=True))

    good = run(both())  # the failing batch failed its caller only; the worker kept serving
    assert len(good.ids) == 2 and calls == [1, 1]


# ---- OpenAIPolicy: wire format -------------------------------------------------------------------------


def completion_body(ids, logprobs, finish="stop"):
    """A `/v1/completions` response as vLLM writes it with logprobs=1 and return_tokens_as_token_ids."""
    return {
        "id": "cmpl-1", "object": "text_completion", "model": "m",
        "choices": [{"index": 0, "text": "…", "finish_reason": finish, "stop_reason": None,
                     "logprobs": {"text_offset": list(range(len(ids))), "token_logprobs": logprobs,
                                  "tokens": [f"token_id:{i}" for i in ids],
                                  "top_logprobs": [{f"token_id:{i}": lp} for i, lp in zip(ids, logprobs)]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": len(ids), "total_tokens": 3 + len(ids)},
    }


def mock_policy(handler, **kw) -> OpenAIPolicy:
    kw.setdefault("backoff_s", 0.001)
    return OpenAIPolicy("http://server:8000", "tiny", transport=httpx.MockTransport(handler), **kw)


def test_openai_policy_token_in_token_out():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["url"] = str(request.url)
        seen["body"] = json.loads(request.content)
        seen["auth"] = request.headers.get("authorization")
        return httpx.Response(200, json=completion_body([5, 6, 2], [-0.5, -1.25, -0.01]))

    policy = mock_policy(handler, api_key="sk-test", policy_version=4)
    out = run(policy.generate([0, 1, 7], SamplingParams(max_tokens=9, greedy=True, stop_ids=(2,), seed=3)))
    assert out == PolicyOutput([5, 6, 2], [-0.5, -1.25, -0.01], "stop", 4)
    assert seen["url"] == "http://server:8000/v1/completions"
    assert seen["auth"] == "Bearer sk-test"
    body = seen["body"]
    assert body["prompt"] == [0, 1, 7] and body["model"] == "tiny" and body["max_tokens"] == 9
    assert body["logprobs"] == 1 and body["return_tokens_as_token_ids"] is True
    assert body["temperature"] == 0.0 and body["stop_token_ids"] == [2] and body["seed"] == 3
    assert body["skip_special_tokens"] is False
    policy.set_policy_version(5)  # e.g. after the server was restarted on new weights
    assert run(policy.generate([0], SamplingParams(max_tokens=3))).policy_version == 5


def test_openai_policy_sampling_params_mapping():
    bodies = []

    def handler(request):
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=completion_body([1], [-0.1], "length"))

    policy = mock_policy(handler, extra_body={"min_tokens": 1})
    out = run(policy.generate([3], SamplingParams(max_tokens=1, temperature=0.7, top_k=20, top_p=0.9)))
    assert out.finish_reason == "length"
    b = bodies[0]
    assert (b["temperature"], b["top_k"], b["top_p"], b["min_tokens"]) == (0.7, 20, 0.9, 1)
    assert "seed" not in b and "stop_token_ids" not in b


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["choices"][0].update(logprobs=None), "no logprobs"),
    (lambda d: d["choices"][0]["logprobs"].update(tokens=["hello", "x"]), "return_tokens_as_token_ids"),
    (lambda d: d["choices"][0]["logprobs"].update(token_logprobs=[-1.0]), "log-probs"),
    (lambda d: d["choices"][0].update(finish_reason="abort"), "finish_reason"),
    (lambda d: d.update(choices=[]), "no choices"),
])
def test_openai_policy_rejects_incomplete_responses(mutate, message):
    def handler(request):
        body = completion_body([1, 2], [-0.1, -0.2])
        mutate(body)
        return httpx.Response(200, json=body)

    with pytest.raises(PolicyResponseError, match=message):
        run(mock_policy(handler).generate([3], SamplingParams(max_tokens=2)))


def test_openai_policy_non_json_200_is_a_response_error():
    with pytest.raises(PolicyResponseError, match="non-JSON"):
        run(mock_policy(lambda r: httpx.Response(200, text="<html>proxy</html>")).generate([3], SamplingParams(max_tokens=2)))


# ---- OpenAIPolicy: retries and errors ------------------------------------------------------------------


def test_openai_policy_retries_5xx_then_succeeds():
    calls = []

    def handler(request):
        calls.append(1)
        if len(calls) < 3:
            return httpx.Response(503, json={"error": {"message": "overloaded"}})
        return httpx.Response(200, json=completion_body([4], [-0.3]))

    policy = mock_policy(handler)
    out = run(policy.generate([1], SamplingParams(max_tokens=1)))
    assert out.ids == [4] and len(calls) == 3 and policy.stats["retries"] == 2


@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ReadTimeout, httpx.RemoteProtocolError])
def test_openai_policy_gives_up_after_max_retries(error):
    calls = []

    def handler(request):
        calls.append(1)
        raise error("boom", request=request)

    policy = mock_policy(handler, max_retries=3)
    with pytest.raises(PolicyUnavailableError, match=f"after 4 attempts.*{error.__name__}"):
        run(policy.generate([1], SamplingParams(max_tokens=1)))
    assert len(calls) == 4


def test_openai_policy_4xx_is_immediate_and_names_status_and_message():
    calls = []

    def handler(request):
        calls.append(1)
        return httpx.Response(400, json={"error": {"message": "max_tokens=5000 cannot be greater than "
                                                   "max_model_len=512", "type": "BadRequestError", "code": 400}})

    with pytest.raises(PolicyRequestError) as info:
        run(mock_policy(handler).generate([1], SamplingParams(max_tokens=5000)))
    assert info.value.status == 400 and "max_model_len=512" in str(info.value) and "HTTP 400" in str(info.value)
    assert len(calls) == 1  # a client error is never retried

    def fastapi_404(request):
        return httpx.Response(404, json={"detail": "Not Found"})

    with pytest.raises(PolicyRequestError, match="HTTP 404.*Not Found"):
        run(mock_policy(fastapi_404).generate([1], SamplingParams(max_tokens=1)))


def test_openai_policy_429_honours_retry_after():
    stamps = []

    def handler(request):
        stamps.append(time.monotonic())
        if len(stamps) == 1:
            return httpx.Response(429, headers={"Retry-After": "0.2"}, json={"error": {"message": "slow down"}})
        return httpx.Response(200, json=completion_body([4], [-0.3]))

    run(mock_policy(handler, backoff_s=0.0).generate([1], SamplingParams(max_tokens=1)))
    assert len(stamps) == 2 and stamps[1] - stamps[0] >= 0.19


def test_openai_policy_caps_requests_in_flight():
    state = {"now": 0, "peak": 0}

    async def handler(request):
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        await asyncio.sleep(0.02)
        state["now"] -= 1
        return httpx.Response(200, json=completion_body([4], [-0.3]))

    policy = mock_policy(handler, max_concurrency=2)

    async def main():
        return await asyncio.gather(*[policy.generate([1], SamplingParams(max_tokens=1)) for _ in range(8)])

    assert len(run(main())) == 8
    assert state["peak"] == 2


def test_openai_policy_config_errors():
    with pytest.raises(ValueError, match="http"):
        OpenAIPolicy("localhost:8000", "m")
    with pytest.raises(ValueError, match="model"):
        OpenAIPolicy("http://localhost:8000", "")
    with pytest.raises(ValueError, match="max_concurrency"):
        OpenAIPolicy("http://localhost:8000", "m", max_concurrency=0)
    assert normalize_base_url("http://h:1") == "http://h:1/v1"
    assert normalize_base_url("https://api.example.com/openai/v1/") == "https://api.example.com/openai/v1"


# ---- OpenAIPolicy: chat mode ---------------------------------------------------------------------------


def test_openai_policy_chat_with_native_tool_calls():
    seen = {}

    def handler(request):
        seen["url"], seen["body"] = str(request.url), json.loads(request.content)
        return httpx.Response(200, json={
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None, "reasoning_content": "Need the weather.",
                "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "get_weather", "arguments": "{\"location\": \"Paris\", \"days\": 2}"}},
                    {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{bad"}},
                ]}}],
            "usage": {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}})

    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    policy = mock_policy(handler)
    out = run(policy.chat([{"role": "user", "content": "Weather in Paris?"}], tools,
                          SamplingParams(max_tokens=64, temperature=0.6, seed=1)))
    assert seen["url"].endswith("/v1/chat/completions")
    assert seen["body"]["tools"] == tools and seen["body"]["max_tokens"] == 64 and seen["body"]["seed"] == 1
    assert out.reasoning == "Need the weather." and out.content == ""
    assert out.tool_calls[0].name == "get_weather" and out.tool_calls[0].arguments == {"location": "Paris", "days": 2}
    assert out.tool_calls[0].error is None and out.tool_calls[0].id == "call_1"
    assert out.tool_calls[1].arguments == {} and "not valid JSON" in out.tool_calls[1].error
    assert out.usage == {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}
    assert out.finish_reason == "tool_calls"
    with pytest.raises(ValueError, match="messages"):
        run(policy.chat([]))


def test_chat_inline_reasoning_is_split():
    assert split_inline_reasoning("Think hard.\n</think>\n\nIt is 21C.") == ("Think hard.", "It is 21C.")
    assert split_inline_reasoning("<think>\nA\n</think>\n\nB") == ("A", "B")
    assert split_inline_reasoning("plain") == ("", "plain")
    out = parse_chat({"choices": [{"message": {"content": "R\n</think>\n\nC"}, "finish_reason": "stop"}]})
    assert (out.reasoning, out.content, out.tool_calls) == ("R", "C", [])
    with pytest.raises(PolicyResponseError):
        parse_chat({"choices": []})


# ---- OpenAIPolicy against a real HTTP server -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def flaky_server():
    """A real uvicorn server: /v1/completions fails with 500 on every odd request, echoes the prompt otherwise."""
    app = FastAPI()
    count = {"n": 0}

    @app.post("/v1/completions")
    async def completions(request: Request):
        count["n"] += 1
        body = await request.json()
        if count["n"] % 2 == 1:
            return JSONResponse({"error": {"message": "engine hiccup"}}, status_code=500)
        if body.get("model") != "tiny":
            return JSONResponse({"error": {"message": f"model {body.get('model')} does not exist"}}, status_code=404)
        ids = [t + 1 for t in body["prompt"]][: body["max_tokens"]]
        return completion_body(ids, [-0.25] * len(ids), "length")

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", count
    server.should_exit = True
    thread.join(timeout=10)


def test_openai_policy_over_real_http_retries_500(flaky_server):
    url, _ = flaky_server
    policy = OpenAIPolicy(url, "tiny", backoff_s=0.01)

    async def main():
        async with policy:
            a = await policy.generate([1, 2, 3], SamplingParams(max_tokens=2))
            b = await policy.generate([10, 20], SamplingParams(max_tokens=5))
            return a, b

    a, b = run(main())
    assert a.ids == [2, 3] and b.ids == [11, 21] and policy.stats["retries"] == 2
    with pytest.raises(PolicyRequestError, match="HTTP 404.*does not exist"):
        run(OpenAIPolicy(url, "other", backoff_s=0.01).generate([1], SamplingParams(max_tokens=1)))


def test_openai_policy_connection_refused_is_unavailable():
    policy = OpenAIPolicy(f"http://127.0.0.1:{_free_port()}", "tiny", max_retries=2, backoff_s=0.01)
    with pytest.raises(PolicyUnavailableError, match="after 3 attempts"):
        run(policy.generate([1], SamplingParams(max_tokens=1)))
