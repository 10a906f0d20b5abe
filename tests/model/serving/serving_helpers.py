"""Helpers of the server tests: the oracle (`generate` alone), a Service over a model, an in-process ASGI
client with the app's lifespan, and the Python env's tool-using prompt."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import torch
from m2rl.model import M2Tokenizer
from m2rl.model.generation import GenerationOutput, SamplingParams, generate
from m2rl.model.m2 import M2ForCausalLM
from m2rl.model.serving.app import build_app
from m2rl.model.serving.scheduler import Scheduler, SchedulerConfig
from m2rl.model.serving.service import Service

TINY_DIR = Path(__file__).resolve().parents[3] / "model" / "assets" / "tiny-python-sft"
MODEL_NAME = "tiny"

# The Python env's first prompt: the SFT checkpoint answers it with tool calls when sampled.
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "python", "description": "Run Python code in a persistent interpreter: "
     "variables, imports and functions survive calls.", "parameters": {"type": "object", "properties": {
         "code": {"type": "string", "description": "Python source to execute."}}, "required": ["code"]}}},
    {"type": "function", "function": {"name": "submit", "description": "Submit your final answer and end the episode. "
     "Call it once, when you are done.", "parameters": {"type": "object", "properties": {"answer": {
         "type": "string", "description": "The final answer exactly as asked (e.g. just the number), or \"done\" "
         "for tasks graded on files."}}, "required": ["answer"]}}},
]
MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a careful assistant that solves problems by running code. Use the "
     "`python` tool to compute (it keeps variables between calls), then call `submit` with only the final answer."},
    {"role": "user", "content": "With F(0) = 0 and F(1) = 1, what is the Fibonacci number F(20382) modulo "
     "753064488? Compute it with the python tool, then submit just the number."},
]


def reference(model: M2ForCausalLM, prompt: list[int], params: SamplingParams) -> GenerationOutput:
    """The oracle: `generate` on this prompt alone."""
    return generate(model, [prompt], params)[0]


def make_service(model: M2ForCausalLM, tokenizer: M2Tokenizer, **config: Any) -> Service:
    config.setdefault("max_model_len", 512)
    return Service(model, tokenizer, Scheduler(model, SchedulerConfig(**config)), MODEL_NAME, str(TINY_DIR))


@asynccontextmanager
async def asgi_client(service: Service, api_key: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """The app in this event loop, lifespan included (the scheduler runs), behind an httpx client."""
    app = build_app(service, api_key)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            yield client


async def wait_until(condition: Any, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def perturbed_copy(model: M2ForCausalLM, scale: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's state dict with noise on every matrix: a different policy of the same shape."""
    gen = torch.Generator().manual_seed(seed)
    return {name: (t + scale * t.std() * torch.randn(t.shape, generator=gen)) if t.dim() >= 2 else t.clone()
            for name, t in model.state_dict().items()}
