"""Serving benchmark: decode tokens/s and time to first token of OpenAI-compatible servers, one row per
(backend, concurrency).

The `m2rl` backend is `m2rl serve` on a checkpoint (default: the shipped tiny one, on CPU), started here in
its own process. The `generate` rows are the baseline of the same run: `m2rl.model.generate` in process on
a batch of the same prompts (concurrency = batch size), what the model gives with no serving at all. Any
other server speaking the same API is another row: `--external vllm=http://host:port` (the same checkpoint
served by `vllm serve`, say) is measured by the same client, with the same prompts.

Each client streams `/v1/completions` with a token-id prompt and `ignore_eos`, so every request decodes
exactly --new-tokens tokens. Time to first token (TTFT) is from sending the request to its first token
chunk; decode tok/s is all tokens over the wall time of the whole run (what the server sustains); per
stream tok/s is each request's tokens after its first over the time since its first. Prints a table, then
one JSON line.

    python -m m2rl.benchmarks.serving [--concurrency 1 16 --prompt-len 64 --new-tokens 64 --threads 1]
    python -m m2rl.benchmarks.serving --external vllm=http://127.0.0.1:8001   # a second row per level
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

TINY_CHECKPOINT = Path(__file__).resolve().parent.parent / "model" / "assets" / "tiny-python-sft"


@dataclass(frozen=True)
class Backend:
    name: str
    base_url: str  # ends in /v1


@dataclass
class Row:
    backend: str
    concurrency: int
    requests: int
    new_tokens: int
    ttft_p50_ms: float
    ttft_p90_ms: float
    decode_tok_per_s: float  # all requests' tokens / wall time
    per_stream_tok_per_s: float  # median over requests of (tokens - 1) / (last - first token)
    wall_s: float


async def _one(client: httpx.AsyncClient, backend: Backend, model: str, prompt: list[int],
               new_tokens: int) -> tuple[float, float, int]:
    """(TTFT, seconds from first to last token, tokens) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    started = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async with client.stream("POST", f"{backend.base_url}/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            got = len(choices[0].get("token_ids") or []) or int(bool(choices[0].get("text")))
            if got:
                last = time.perf_counter()
                first = first or last
                tokens += got
    return first - started, last - first, tokens


async def _level(backend: Backend, model: str, prompts: list[list[int]], concurrency: int, new_tokens: int) -> Row:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await _one(client, backend, model, prompts[0], 4)  # warm-up: connections, first-call allocations
        gate = asyncio.Semaphore(concurrency)

        async def limited(prompt: list[int]) -> tuple[float, float, int]:
            async with gate:
                return await _one(client, backend, model, prompt, new_tokens)

        started = time.perf_counter()
        results = await asyncio.gather(*[limited(p) for p in prompts])
        wall = time.perf_counter() - started
    ttfts = sorted(r[0] for r in results)
    p90 = ttfts[math.ceil(0.9 * len(ttfts)) - 1]  # nearest rank
    per_stream = [(n - 1) / span for _, span, n in results if n > 1 and span > 0]
    return Row(backend.name, concurrency, len(prompts), new_tokens,
               ttft_p50_ms=1000 * statistics.median(ttfts), ttft_p90_ms=1000 * p90,
               decode_tok_per_s=sum(r[2] for r in results) / wall,
               per_stream_tok_per_s=statistics.median(per_stream) if per_stream else 0.0, wall_s=wall)


def _served_model(backend: Backend) -> str:
    return httpx.get(f"{backend.base_url}/models", timeout=10).json()["data"][0]["id"]


@contextmanager
def m2rl_server(checkpoint: Path, port: int, threads: int, max_batch: int) -> Iterator[Backend]:
    """`m2rl serve` in its own process (the client's work does not share its interpreter)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "m2rl.cli", "serve", "--model", str(checkpoint), "--port", str(port),
           "--max-batch", str(max_batch), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    backend = Backend("m2rl", f"http://127.0.0.1:{port}/v1")
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log = proc.stderr.read() if proc.stderr else ""
                raise RuntimeError(f"m2rl serve exited with {proc.returncode}: {log[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("m2rl serve did not become healthy in 120 s")
            time.sleep(0.2)
        yield backend
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_rows(backend: Backend, levels: list[int], prompt_len: int, new_tokens: int, vocab: int,
             rounds: int, min_requests: int) -> list[Row]:
    model = _served_model(backend)
    rows = []
    for concurrency in levels:
        rng = random.Random(concurrency)  # the same prompts for every backend at this level
        count = max(concurrency * rounds, min_requests)
        prompts = [[rng.randrange(7, vocab) for _ in range(prompt_len)] for _ in range(count)]
        rows.append(asyncio.run(_level(backend, model, prompts, concurrency, new_tokens)))
    return rows


def generate_rows(checkpoint: Path, levels: list[int], prompt_len: int, new_tokens: int, vocab: int,
                  threads: int) -> list[Row]:
    """The baseline, measured in the same run: `m2rl.model.generate` in this process on batches of the same
    prompts, no HTTP and no scheduler. TTFT here is a 1-token generate (the prefill and one sample)."""
    import torch
    from m2rl.model import load_pretrained
    from m2rl.model.generation import SamplingParams, generate

    torch.set_num_threads(threads)
    model = load_pretrained(checkpoint)
    rows = []
    for batch in levels:
        rng = random.Random(batch)
        prompts = [[rng.randrange(7, vocab) for _ in range(prompt_len)] for _ in range(batch)]
        generate(model, prompts, SamplingParams(max_tokens=4, greedy=True))  # warm-up

        def timed(max_tokens: int, prompts: list[list[int]] = prompts) -> float:  # median of 3: one run is noise
            times = []
            for _ in range(3):
                started = time.perf_counter()
                generate(model, prompts, SamplingParams(max_tokens=max_tokens, greedy=True))
                times.append(time.perf_counter() - started)
            return statistics.median(times)

        ttft, wall = timed(1), timed(new_tokens)
        tokens = batch * new_tokens  # random prompts, greedy: EOS is not met (stop_ids is empty anyway)
        rows.append(Row("generate", batch, batch, new_tokens, ttft_p50_ms=1000 * ttft, ttft_p90_ms=1000 * ttft,
                        decode_tok_per_s=tokens / wall, per_stream_tok_per_s=(new_tokens - 1) / (wall - ttft),
                        wall_s=wall))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=TINY_CHECKPOINT)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rounds", type=int, default=4,
                    help="requests per level = concurrency x rounds, at least --min-requests")
    ap.add_argument("--min-requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    # 1: on a small shared CPU, OpenMP threads of the server, its event loop and this client oversubscribe it.
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the m2rl server")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--external", action="append", default=[], metavar="NAME=URL",
                    help="another running server to measure as a row, e.g. vllm=http://127.0.0.1:8001")
    args = ap.parse_args()
    vocab = json.loads((args.checkpoint / "config.json").read_text())["vocab_size"]
    max_batch = max(args.concurrency)
    rows: list[Row] = []
    with m2rl_server(args.checkpoint, args.port, args.threads, max_batch) as ours:
        rows += run_rows(ours, args.concurrency, args.prompt_len, args.new_tokens, vocab, args.rounds,
                         args.min_requests)
    rows += generate_rows(args.checkpoint, args.concurrency, args.prompt_len, args.new_tokens, vocab, args.threads)
    for spec in args.external:
        name, _, url = spec.partition("=")
        backend = Backend(name, url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1") else "/v1"))
        rows += run_rows(backend, args.concurrency, args.prompt_len, args.new_tokens, vocab, args.rounds,
                         args.min_requests)

    hardware = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, server torch threads {args.threads}"
    print(f"{hardware}; {args.checkpoint.name}; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          "greedy, streamed")
    print(f"{'backend':10s} {'conc':>5s} {'reqs':>5s} {'TTFT p50 ms':>12s} {'TTFT p90 ms':>12s} "
          f"{'decode tok/s':>13s} {'per-stream tok/s':>17s}")
    for r in rows:
        print(f"{r.backend:10s} {r.concurrency:5d} {r.requests:5d} {r.ttft_p50_ms:12.1f} {r.ttft_p90_ms:12.1f} "
              f"{r.decode_tok_per_s:13.1f} {r.per_stream_tok_per_s:17.1f}")
    print(json.dumps({"benchmark": "serving", "hardware": hardware, "checkpoint": str(args.checkpoint.name),
                      "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                      "rows": [asdict(r) for r in rows]}))


if __name__ == "__main__":
    main()
