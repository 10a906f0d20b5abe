"""CPU inference throughput: m2rl.model.generation vs transformers' generate on the same tiny M2 checkpoint.

Both load one random `tiny` checkpoint written by save_pretrained; both decode greedily with a KV cache.
prefill tok/s = B * prompt_len / time(generate 1 token); decode tok/s = B * (N - 1) / (time(generate N) -
time(generate 1)). Median of --repeats interleaved runs. Prints a table, then one JSON line.

    python -m m2rl.benchmarks.model_cpu [--batch 4 --prompt-len 128 --new-tokens 64 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
from m2rl.model import M2Config, M2ForCausalLM, SamplingParams, generate, load_pretrained, save_pretrained


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)  # 2 shared cores: more threads spin
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    config = M2Config.from_preset("tiny")
    B, P, N = args.batch, args.prompt_len, args.new_tokens
    prompts = torch.randint(3, config.vocab_size, (B, P), generator=torch.Generator().manual_seed(0))

    with tempfile.TemporaryDirectory() as ckpt:
        save_pretrained(M2ForCausalLM(config).init_weights(std=0.1, seed=0), ckpt)
        ours = load_pretrained(ckpt)
        theirs = transformers.MiniMaxM2ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()

    prompt_lists = prompts.tolist()

    def ours_gen(n: int) -> list[list[int]]:
        return [o.ids for o in generate(ours, prompt_lists, SamplingParams(max_tokens=n, greedy=True))]

    def theirs_gen(n: int) -> list[list[int]]:
        with torch.no_grad():
            out = theirs.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                  max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
        return out[:, P:].tolist()

    impls = {"transformers": theirs_gen, "m2rl": ours_gen}
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in impls}
    for gen in impls.values():  # warm-up
        gen(2)
    # Interleave the implementations so load changes on a shared machine hit both alike.
    for _ in range(args.repeats):
        for name, gen in impls.items():
            times[name][0].append(_timed(lambda g=gen: g(1)))
            times[name][1].append(_timed(lambda g=gen: g(N)))
    rows = []
    for name, (t1s, tns) in times.items():
        t1, tn = statistics.median(t1s), statistics.median(tns)
        rows.append({"impl": name, "prefill_tok_s": B * P / t1, "decode_tok_s": B * (N - 1) / max(tn - t1, 1e-9),
                     "prefill_s": t1, "total_s": tn})
    same = ours_gen(N) == theirs_gen(N)

    base = rows[0]
    print(f"# tiny M2 ({config.num_parameters() / 1e6:.1f}M params) fp32, CPU {platform.processor() or platform.machine()}, "
          f"{args.threads} threads (load avg {os.getloadavg()[0]:.1f}), batch {B}, prompt {P}, new {N}, greedy; "
          f"identical tokens: {same}")
    print(f"{'impl':<14}{'prefill tok/s':>15}{'decode tok/s':>15}{'prefill x':>11}{'decode x':>10}")
    for r in rows:
        print(f"{r['impl']:<14}{r['prefill_tok_s']:>15.0f}{r['decode_tok_s']:>15.0f}"
              f"{r['prefill_tok_s'] / base['prefill_tok_s']:>11.2f}{r['decode_tok_s'] / base['decode_tok_s']:>10.2f}")
    print(json.dumps({"benchmark": "model_cpu", "batch": B, "prompt_len": P, "new_tokens": N,
                      "threads": args.threads, "identical_tokens": same,
                      "results": {r["impl"]: {k: round(v, 4) for k, v in r.items() if k != "impl"} for r in rows}}))


if __name__ == "__main__":
    main()
