"""The HTTP API in process (httpx over ASGI, the app's lifespan running the scheduler): bad requests name
their field, the key is required, overload is 429, many clients are all answered exactly, streams agree with
whole answers, and weight updates change the policy or are refused leaving it as it was."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

import pytest
import torch
from m2rl.agent.format import parse
from m2rl.model import load_pretrained, save_pretrained
from m2rl.model.generation import SamplingParams
from m2rl.model.serving.app import VERSION_HEADER
from serving_helpers import (
    MESSAGES,
    MODEL_NAME,
    TINY_DIR,
    TOOLS,
    asgi_client,
    make_service,
    perturbed_copy,
    reference,
    wait_until,
)

COMPLETION = {"model": MODEL_NAME, "prompt": [1, 2, 3], "max_tokens": 2}
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def sse_data(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


BAD_REQUESTS = [
    ("/v1/completions", {"model": MODEL_NAME}, "prompt"),
    ("/v1/completions", {**COMPLETION, "temperature": -1}, "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, "top_p"),
    ("/v1/completions", {**COMPLETION, "n": 0}, "n"),
    ("/v1/completions", {**COMPLETION, "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "logprobs": 50}, "logprobs"),
    ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [5, 99999]}, "prompt"),  # outside the vocabulary
    ("/v1/completions", {**COMPLETION, "prompt": ""}, "prompt"),
    ("/v1/completions", {**COMPLETION, "stop": [""]}, "stop"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 10_000}, "max_tokens"),  # past the context
    ("/v1/completions", {**COMPLETION, "n": 9}, "n"),  # more choices than rows
    ("/v1/completions", {**COMPLETION, "presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {**COMPLETION, "seed": -3}, "seed"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {}}]}, "tools.0.function"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "42"}]}, "messages"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ("/v1/chat/completions", {**CHAT, "tool_choice": {"type": "function", "function": {"name": "x"}}}, "tool_choice"),
    ("/v1/completions", {**COMPLETION, "best_of": 3}, "best_of"),
    ("/v1/weights", {"version": 3}, "path"),
    ("/v1/weights", {"path": "x", "version": -1}, "version"),
]


def test_bad_requests_are_4xx_naming_the_field(sft_model, tokenizer) -> None:
    async def main() -> None:
        async with asgi_client(make_service(sft_model, tokenizer, max_batch=8)) as client:
            for path, body, param in BAD_REQUESTS:
                resp = await client.post(path, json=body)
                assert resp.status_code == 400, (path, body, resp.text)
                error = resp.json()["error"]
                assert error["param"] == param, (body, error)
                assert param is None or param.split(".")[0] in error["message"]
            resp = await client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
            assert resp.status_code == 400 and "JSON" in resp.json()["error"]["message"]
            resp = await client.post("/v1/completions", json={**COMPLETION, "model": "gpt-4"})
            assert resp.status_code == 404 and resp.json()["error"]["param"] == "model"
            assert (await client.get("/health")).status_code == 200  # and the server is still up

    asyncio.run(main())


def test_api_key_guards_every_endpoint_but_health(sft_model, tokenizer) -> None:
    async def main() -> None:
        async with asgi_client(make_service(sft_model, tokenizer), api_key="sekret") as client:
            assert (await client.get("/health")).status_code == 200
            for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                                 ("POST", "/v1/chat/completions"), ("POST", "/v1/weights"), ("GET", "/docs")]:
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
                    resp = await client.request(method, path, json=COMPLETION, headers=headers)
                    assert resp.status_code == 401 and resp.json()["error"]["param"] == "authorization"
            ok = {"Authorization": "Bearer sekret"}
            assert (await client.get("/v1/models", headers=ok)).json()["data"][0]["id"] == MODEL_NAME
            assert (await client.post("/v1/completions", json=COMPLETION, headers=ok)).status_code == 200

    asyncio.run(main())


def test_overload_is_429_and_the_queue_recovers(sft_model, tokenizer) -> None:
    service = make_service(sft_model, tokenizer, max_batch=1, max_queue=1)

    async def main() -> None:
        async with asgi_client(service) as client:
            long = asyncio.create_task(client.post("/v1/completions", json={**COMPLETION, "max_tokens": 400,
                                                                             "temperature": 1.0, "ignore_eos": True}))
            await wait_until(lambda: service.scheduler.batch_size == 1)
            queued = asyncio.create_task(client.post("/v1/completions", json=COMPLETION))
            await wait_until(lambda: service.scheduler.queue_depth == 1)
            refused = await client.post("/v1/completions", json=COMPLETION)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["type"] == "RateLimitError"
            long.cancel()  # the client goes away: its row is freed and the queued request runs
            assert (await queued).status_code == 200
            await wait_until(lambda: service.scheduler.batch_size == 0 and service.scheduler.reserved_tokens == 0)
            metrics = (await client.get("/metrics")).text
            assert 'm2rl_serve_requests_total{endpoint="/v1/completions",status="429"} 1.0' in metrics

    asyncio.run(main())


def test_many_concurrent_clients_get_generates_answers(sft_model, tokenizer, prompts) -> None:
    """16 clients at once through 6 rows: every greedy answer is `generate`'s for that prompt alone."""
    service = make_service(sft_model, tokenizer, max_batch=6)
    clients = [(p, 6 + i % 5) for i, p in enumerate(prompts * 2)]

    async def main() -> list[dict[str, Any]]:
        async with asgi_client(service) as client:
            bodies = [{"model": MODEL_NAME, "prompt": p, "max_tokens": m, "temperature": 0, "logprobs": 0,
                       "return_tokens_as_token_ids": True} for p, m in clients]
            responses = await asyncio.gather(*[client.post("/v1/completions", json=b) for b in bodies])
            assert all(r.status_code == 200 for r in responses)
            assert service.scheduler.stats.decode_steps < sum(m for _, m in clients)  # they shared steps
            return [r.json() for r in responses]

    for (prompt, max_tokens), answer in zip(clients, asyncio.run(main())):
        ref = reference(sft_model, prompt, SamplingParams(max_tokens=max_tokens, greedy=True,
                                                          stop_ids=(tokenizer.eos_id,)))
        [choice] = answer["choices"]
        assert choice["token_ids"] == ref.ids and choice["finish_reason"] == ref.finish_reason
        assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in ref.ids]
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(ref.raw_logprobs, abs=1e-4)
        assert choice["text"] == tokenizer.backend.decode(ref.ids, skip_special_tokens=True)
        assert answer["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(ref.ids),
                                   "total_tokens": len(prompt) + len(ref.ids)}


def test_chat_answers_in_openai_shape_and_its_stream_agrees(sft_model, tokenizer) -> None:
    """The Python env's prompt with a seed for which the checkpoint calls a tool: the answer is the parse of
    the sampled ids, and the stream's deltas add up to the same message."""
    tool_seed = next(s for s in range(12) if parse(tokenizer.decode(reference(
        sft_model, chat_prompt_ids(tokenizer), SamplingParams(max_tokens=60, seed=s, stop_ids=(tokenizer.eos_id,))).ids),
        TOOLS).tool_calls)
    body = {"model": MODEL_NAME, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 60, "seed": tool_seed,
            "logprobs": True, "top_logprobs": 2}

    async def main() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with asgi_client(make_service(sft_model, tokenizer)) as client:
            whole = await client.post("/v1/chat/completions", json=body)
            streamed = await client.post("/v1/chat/completions", json={**body, "stream": True,
                                                                         "stream_options": {"include_usage": True}})
            assert streamed.headers["content-type"].startswith("text/event-stream")
            data = sse_data(streamed.text)
            assert data[-1] == "[DONE]"
            return whole.json(), [json.loads(d) for d in data[:-1]]

    whole, chunks = asyncio.run(main())
    [choice] = whole["choices"]
    text = tokenizer.decode(choice["token_ids"])
    parsed = parse(text, TOOLS, enable_thinking=True)
    message = choice["message"]
    assert parsed.tool_calls and choice["finish_reason"] == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == \
        [(c.name, c.arguments) for c in parsed.tool_calls]
    assert message["reasoning_content"] == parsed.reasoning and message.get("content") in (None, parsed.content or None)
    assert [e["token"] for e in choice["logprobs"]["content"]] == [tokenizer.decode([t]) for t in choice["token_ids"]]
    assert all(len(e["top_logprobs"]) == 2 for e in choice["logprobs"]["content"])

    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert "".join(d.get("reasoning_content", "") for d in deltas) == parsed.reasoning
    assert "".join(d.get("content", "") for d in deltas) == parsed.content
    [calls] = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert [(c["index"], c["function"]["name"]) for c in calls] == [(i, c.name) for i, c in enumerate(parsed.tool_calls)]
    assert [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]][-1] == "tool_calls"
    assert [t for c in chunks if c["choices"] for t in c["choices"][0].get("token_ids", [])] == choice["token_ids"]
    assert chunks[-1]["usage"]["completion_tokens"] == len(choice["token_ids"])


def chat_prompt_ids(tokenizer: Any) -> list[int]:
    from m2rl.agent.format import render

    return tokenizer.encode(render(MESSAGES, TOOLS, add_generation_prompt=True))


def test_stop_strings_cut_the_text_and_streams_end_with_done(sft_model, tokenizer, prompts) -> None:
    async def main() -> None:
        async with asgi_client(make_service(sft_model, tokenizer)) as client:
            free = (await client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompts[0],
                                                                "max_tokens": 30, "temperature": 0})).json()
            text = free["choices"][0]["text"]
            stop = text[len(text) // 2:len(text) // 2 + 3]
            assert len(stop) == 3
            body = {"model": MODEL_NAME, "prompt": prompts[0], "max_tokens": 30, "temperature": 0, "stop": stop}
            cut = (await client.post("/v1/completions", json=body)).json()["choices"][0]
            assert cut["text"] == text[:text.index(stop)] and cut["finish_reason"] == "stop"
            assert cut["stop_reason"] == stop and len(cut["token_ids"]) < len(free["choices"][0]["token_ids"])
            streamed = await client.post("/v1/completions", json={**body, "stream": True})
            data = sse_data(streamed.text)
            chunks = [json.loads(d)["choices"][0] for d in data[:-1]]
            assert data[-1] == "[DONE]" and "".join(c["text"] for c in chunks) == cut["text"]
            assert chunks[-1]["finish_reason"] == "stop"

    asyncio.run(main())


def test_weight_update_changes_outputs_and_bad_checkpoints_are_refused(tokenizer, prompts, tmp_path) -> None:
    model = load_pretrained(TINY_DIR)
    service = make_service(model, tokenizer)
    new_model = load_pretrained(TINY_DIR)
    new_model.load_state_dict(perturbed_copy(model))
    save_pretrained(new_model, tmp_path / "new")
    bad = make_bad_checkpoints(tmp_path, new_model)
    body = {"model": MODEL_NAME, "prompt": prompts[1], "max_tokens": 16, "temperature": 0, "ignore_eos": True}

    async def main() -> None:
        async with asgi_client(service) as client:
            async def answer() -> tuple[list[int], int, str]:
                resp = await client.post("/v1/completions", json=body)
                return resp.json()["choices"][0]["token_ids"], resp.json()["policy_version"], resp.headers[VERSION_HEADER]

            before = await answer()
            assert before[1:] == (0, "0")
            for name, path in bad.items():
                resp = await client.post("/v1/weights", json={"path": str(path), "version": 5})
                assert resp.status_code == 400, (name, resp.text)
                assert resp.json()["error"]["param"] == "path" and "unchanged" in resp.json()["error"]["message"]
                assert await answer() == before, name  # still the old weights, the old version
            resp = await client.post("/v1/weights", json={"path": str(tmp_path / "new")})
            assert resp.status_code == 200 and resp.json()["policy_version"] == 1
            after = await answer()
            assert after[0] != before[0] and after[1:] == (1, "1")
            ref = reference(new_model, prompts[1], SamplingParams(max_tokens=16, greedy=True))
            assert after[0] == ref.ids
            resp = await client.post("/v1/weights", json={"path": str(TINY_DIR / "model.safetensors"), "version": 9})
            assert resp.status_code == 200 and resp.json()["policy_version"] == 9  # a single file works too
            assert await answer() == (before[0], 9, "9")
            assert (await client.get("/health")).json()["policy_version"] == 9
            metrics = (await client.get("/metrics")).text
            assert 'm2rl_serve_weight_updates_total{result="refused"} ' + f"{len(bad)}.0" in metrics
            assert "m2rl_serve_policy_version 9.0" in metrics

    asyncio.run(main())


def make_bad_checkpoints(root: Any, model: Any) -> dict[str, Any]:
    """Checkpoints the server must refuse: each is broken in one way."""
    from m2rl.model import M2ForCausalLM
    from safetensors.torch import save_file

    truncated = root / "truncated.safetensors"
    truncated.write_bytes((TINY_DIR / "model.safetensors").read_bytes()[:100_000])
    nan_state = {name: t.clone() for name, t in model.state_dict().items()}
    nan_state["lm_head.weight"][0, 0] = float("nan")
    nan_model = load_pretrained(TINY_DIR)
    nan_model.load_state_dict(nan_state)
    save_pretrained(nan_model, root / "nan")
    save_pretrained(M2ForCausalLM(replace(model.config, num_hidden_layers=1)), root / "fewer_layers")
    same_shapes = load_pretrained(TINY_DIR)  # the same tensors, but positions would mean something else
    same_shapes.config = replace(model.config, rope_theta=500_000.0)
    save_pretrained(same_shapes, root / "other_rope")
    wrong = dict(__import__("safetensors.torch", fromlist=["load_file"]).load_file(str(TINY_DIR / "model.safetensors")))
    wrong["model.norm.weight"] = torch.ones(7)
    save_file(wrong, str(root / "wrong_shape.safetensors"))
    return {"truncated": truncated, "nan": root / "nan", "fewer layers": root / "fewer_layers",
            "other rope": root / "other_rope",
            "wrong shape": root / "wrong_shape.safetensors", "missing": root / "nowhere"}


def test_prompt_logprobs_score_the_prompt_as_the_learner_does(sft_model, tokenizer, prompts) -> None:
    """vLLM's `prompt_logprobs` (the weight-sync parity probe reads it) and `echo` + `logprobs`."""
    from m2rl.model.logprobs import token_logprobs

    prompt = prompts[3]
    learner = token_logprobs(sft_model, torch.tensor([prompt]))[0, 1:].tolist()

    async def main() -> dict[str, Any]:
        async with asgi_client(make_service(sft_model, tokenizer)) as client:
            resp = await client.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 1,
                                                               "temperature": 0, "prompt_logprobs": 2, "echo": True,
                                                               "logprobs": 1})
            return resp.json()["choices"][0]

    choice = asyncio.run(main())
    entries = choice["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(prompt)
    assert [entries[t][str(prompt[t])]["logprob"] for t in range(1, len(prompt))] == pytest.approx(learner, abs=1e-4)
    assert all(len(e) in (2, 3) for e in entries[1:])  # the token itself and the top 2 (it may be one of them)
    echoed = choice["logprobs"]
    assert echoed["token_logprobs"][0] is None and len(echoed["tokens"]) == len(prompt) + 1
    assert echoed["token_logprobs"][1:len(prompt)] == pytest.approx(learner, abs=1e-4)
    assert choice["text"].startswith(tokenizer.backend.decode(prompt, skip_special_tokens=True))


def test_a_failing_model_call_is_a_500_and_serving_goes_on(sft_model, tokenizer, prompts, monkeypatch) -> None:
    service = make_service(sft_model, tokenizer)
    real_step = service.scheduler._decode_step
    calls = {"n": 0}

    def flaky(rows: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected failure")
        return real_step(rows)

    monkeypatch.setattr(service.scheduler, "_decode_step", flaky)
    body = {"model": MODEL_NAME, "prompt": prompts[0], "max_tokens": 6, "temperature": 0}

    async def main() -> None:
        async with asgi_client(service) as client:
            failed = await client.post("/v1/completions", json=body)
            assert failed.status_code == 500 and "injected failure" in failed.json()["error"]["message"]
            streamed = await client.post("/v1/completions", json={**body, "stream": True})
            assert sse_data(streamed.text)[-1] == "[DONE]"
            ok = await client.post("/v1/completions", json=body)
            assert ok.status_code == 200 and len(ok.json()["choices"][0]["token_ids"]) == 6
            assert (await client.get("/health")).status_code == 200
            assert service.scheduler.batch_size == 0 and service.scheduler.reserved_tokens == 0
            assert "m2rl_serve_step_errors_total 1.0" in (await client.get("/metrics")).text

    asyncio.run(main())
