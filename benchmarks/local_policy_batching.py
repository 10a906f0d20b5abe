"""LocalPolicy request batching: N concurrent requests served one generate() call at a time vs batched.

Baseline: `LocalPolicy(max_batch_size=1)` (each request its own generate call). Batched: the default
collector (requests arriving within `batch_window_s` share one call). Same random tiny M2 model, same
prompts, greedy decoding of a fixed number of tokens (EOS suppressed by using `--new-tokens` small and a
random model, which rarely samples it; tokens actually produced are counted). Median of --repeats runs.
Prints a table, then one JSON line.

    python -m m2rl.benchmarks.local_policy_batching [--requests 8 --prompt-len 64 --new-tokens 32 --threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time

import torch

from m2rl.agent.local_policy import LocalPolicy
from m2rl.agent.policy import SamplingParams
from m2rl.model import M2Config, M2ForCausalLM, M2Tokenizer


async def _serve(policy: LocalPolicy, prompts: list[list[int]], params: SamplingParams) -> int:
    outs = await asyncio.gather(*[policy.generate(p, params) for p in prompts])
    return sum(len(o.ids) for o in outs)


def _run(policy: LocalPolicy, prompts: list[list[int]], params: SamplingParams, repeats: int) -> tuple[float, int]:
    asyncio.run(_serve(policy, prompts, params))  # warm-up
    times, tokens = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens = asyncio.run(_serve(policy, prompts, params))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = M2Tokenizer.tiny()
    model = M2ForCausalLM(M2Config.from_preset("tiny")).init_weights(seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, tok.vocab_size, (args.prompt_len,), generator=gen).tolist()
               for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.new_tokens, greedy=True)
    rows = []
    for name, batch in (("one request per generate() (baseline)", 1), ("batched LocalPolicy", args.requests)):
        policy = LocalPolicy(model, tok, max_batch_size=batch)
        seconds, tokens = _run(policy, prompts, params, args.repeats)
        rows.append({"mode": name, "max_batch_size": batch, "seconds": seconds, "tokens": tokens,
                     "tok_per_s": tokens / seconds, "calls": len(policy.batch_sizes) // (args.repeats + 1)})
    print(f"CPU: {platform.processor() or platform.machine()}, torch threads {args.threads}, "
          f"{args.requests} requests x {args.prompt_len} prompt tokens x {args.new_tokens} new tokens")
    print(f"{'mode':40s} {'calls':>6s} {'seconds':>9s} {'tok/s':>9s} {'speed-up':>9s}")
    for r in rows:
        print(f"{r['mode']:40s} {r['calls']:6d} {r['seconds']:9.3f} {r['tok_per_s']:9.1f} "
              f"{rows[0]['seconds'] / r['seconds']:8.2f}x")
    print(json.dumps({"benchmark": "local_policy_batching", "rows": rows}))


if __name__ == "__main__":
    main()
