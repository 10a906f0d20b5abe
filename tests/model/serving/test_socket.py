"""Over a real socket (uvicorn in a thread): the official `openai` SDK and the project's OpenAIPolicy work
unchanged against `m2rl serve`, and a client that goes away frees its rows of the running batch."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import uvicorn
from m2rl.agent.openai_policy import OpenAIPolicy
from m2rl.model.generation import SamplingParams
from m2rl.model.serving.app import build_app
from m2rl.model.serving.service import Service
from serving_helpers import MESSAGES, MODEL_NAME, TOOLS, make_service, reference

API_KEY = "sekret"


@pytest.fixture(scope="module")
def server(sft_model, tokenizer) -> Iterator[tuple[str, Service]]:
    service = make_service(sft_model, tokenizer, max_batch=4, max_model_len=2048)
    config = uvicorn.Config(build_app(service, API_KEY), host="127.0.0.1", port=0, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = uv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", service
    uv.should_exit = True
    thread.join(timeout=30)


def wait_idle(service: Service, timeout_s: float = 10.0) -> float:
    started = time.monotonic()
    while service.scheduler.batch_size or service.scheduler.reserved_tokens:
        assert time.monotonic() - started < timeout_s, "the request was not cancelled"
        time.sleep(0.01)
    return time.monotonic() - started


def test_openai_sdk_and_openai_policy_work_unchanged(server, sft_model, tokenizer, prompts) -> None:
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL_NAME]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()

    greedy = SamplingParams(max_tokens=10, greedy=True, stop_ids=(tokenizer.eos_id,))
    ref = reference(sft_model, prompts[0], greedy)
    done = client.completions.create(model=MODEL_NAME, prompt=prompts[0], max_tokens=10, temperature=0, logprobs=1,
                                     extra_body={"return_tokens_as_token_ids": True})
    assert done.choices[0].logprobs.tokens == [f"token_id:{t}" for t in ref.ids]
    assert done.choices[0].logprobs.token_logprobs == pytest.approx(ref.raw_logprobs, abs=1e-4)

    chat = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=24, seed=3)
    streamed = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, tools=TOOLS, max_tokens=24, seed=3,
                                              stream=True)
    chunks = list(streamed)
    message = chat.choices[0].message
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert reasoning and reasoning == message.reasoning_content  # vLLM's extra field reaches the SDK's objects
    assert content == (message.content or "")
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    async def policy_generate() -> list[int]:
        async with OpenAIPolicy(url, MODEL_NAME, api_key=API_KEY) as policy:
            outs = await asyncio.gather(*[policy.generate(p, greedy) for p in prompts[:4]])
        return [o.ids for o in outs]

    assert asyncio.run(policy_generate()) == [reference(sft_model, p, greedy).ids for p in prompts[:4]]


def test_a_client_that_goes_away_frees_its_rows(server, prompts) -> None:
    url, service = server
    headers = {"Authorization": f"Bearer {API_KEY}"}
    long = {"model": MODEL_NAME, "prompt": prompts[0], "max_tokens": 2000, "temperature": 1.0, "ignore_eos": True}
    before = service.scheduler.stats.generated_tokens
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json={**long, "stream": True}) as stream:
            lines = stream.iter_lines()
            while not next(lines).startswith("data: "):
                pass
            assert service.scheduler.batch_size == 1
        assert wait_idle(service) < 5  # closing the stream cancelled the request
        with pytest.raises(httpx.ReadTimeout):  # the whole answer is not waited for: the client leaves
            client.post("/v1/completions", json=long, timeout=httpx.Timeout(30, read=0.5))
        wait_idle(service)
    assert service.scheduler.stats.generated_tokens - before < 2 * 2000
    assert service.scheduler.stats.requests_aborted >= 2
