"""One learner update on CPU with packed micro-batches (learner.packing) vs right-padded ones, same run.

The main job's learner: the `tiny` policy from model/assets/tiny-python-sft, configs/train.yaml's learner
section (CISPO, micro_batch_tokens 16384, pi_old recomputed, entropy logged), 64 rows. Two batches:
- `demos`: 64 scripted-expert episodes of the main job's task (m2rl/Python-v0 arith, collected through the
  real agent loop in bwrap sandboxes, as the SFT warm start was): real ids and loss masks;
- `spread`: 64 random rows with lengths uniform in [64, 768] (the main job's context), the last quarter
  of each row sampled: the padding a batch of mixed lengths carries.
Each mode starts from the same weights; `wall s` and `cpu s` (process time, all threads) are the minimum
of --repeats interleaved updates: on a shared 2-core machine other processes' load only adds time, so the
minimum is the least disturbed run. `max |dw|` compares the weights after one update with those of the
padded update. Prints a table, then one JSON line.

    python -m m2rl.benchmarks.learner_packing [--repeats 5 --threads 2 --demos-file demos.pt]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from m2rl.model import M2ForCausalLM, load_pretrained
from m2rl.rl.batch import RolloutBatch, collate
from m2rl.rl.learner import Learner, LearnerConfig, pack_micro_batches
from m2rl.rl.losses import LossConfig

POLICY = Path(__file__).resolve().parent.parent / "model/assets/tiny-python-sft"
ROWS = 64
MAX_LEN = 768


def main_job_config(packing: bool) -> LearnerConfig:
    # configs/train.yaml `learner:` (the rest are LearnerConfig defaults, as in the main job)
    return LearnerConfig(lr=5.0e-4, max_grad_norm=1.0, micro_batch_tokens=16384, loss=LossConfig(kind="cispo"),
                         packing=packing)


def demo_rows(demos_file: str | None) -> tuple[list[list[int]], list[list[int]]]:
    from m2rl.rl.warm_start import collect, load_demos

    demos = load_demos(Path(demos_file))[0][:ROWS] if demos_file else collect(ROWS)
    return [d.ids[:MAX_LEN] for d in demos], [d.loss_mask[:MAX_LEN] for d in demos]


def spread_rows(vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(64, MAX_LEN + 1, (ROWS,), generator=g).tolist()
    ids = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    return ids, [[int(t >= 3 * n // 4) for t in range(n)] for n in lengths]


@torch.no_grad()
def make_batch(model: M2ForCausalLM, ids: list[list[int]], masks: list[list[int]]) -> RolloutBatch:
    """Generator log-probs = the policy's own (ratio 1, as on-policy), advantages +-1 per row."""
    advantages = [1.0 if i % 2 else -1.0 for i in range(len(ids))]
    batch = collate(ids, masks, [[0.0] * len(x) for x in ids], advantages)
    batch.old_logprobs = Learner(model, main_job_config(packing=True)).recompute_logprobs(batch)
    return batch


def computed_tokens(batch: RolloutBatch, packing: bool) -> tuple[int, int]:
    """(micro-batches, tokens through the model) of one pass over the batch."""
    lengths = batch.lengths()
    groups = pack_micro_batches(lengths, main_job_config(packing).micro_batch_tokens, packed=packing)
    if packing:
        return len(groups), sum(lengths)
    return len(groups), sum(len(g) * max(lengths[i] for i in g) for g in groups)


def timed_update(model: M2ForCausalLM, batch: RolloutBatch, packing: bool) -> tuple[float, float, M2ForCausalLM]:
    """(wall s, process cpu s, the updated model) of one update from `model`'s weights."""
    model = copy.deepcopy(model)
    learner = Learner(model, main_job_config(packing))
    wall, cpu = time.perf_counter(), time.process_time()
    learner.update(batch)
    return time.perf_counter() - wall, time.process_time() - cpu, model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)  # the main job's `threads: 2`
    ap.add_argument("--demos-file", default=None, help="demos saved by `m2rl warm-start collect` (else collect)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_pretrained(POLICY, dtype=torch.float32)
    batches = {"demos": make_batch(model, *demo_rows(args.demos_file)),
               "spread": make_batch(model, *spread_rows(model.config.vocab_size))}
    results = []
    for name, batch in batches.items():
        wall: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        after: dict[bool, M2ForCausalLM] = {}
        for _ in range(args.repeats):
            for packing in (False, True):  # interleaved: load from other processes hits both modes alike
                w, c, after[packing] = timed_update(model, batch, packing)
                wall[packing].append(w)
                cpu[packing].append(c)
        for packing in (False, True):
            micro, tokens = computed_tokens(batch, packing)
            dw = max(float((p.detach() - q.detach()).abs().max()) for p, q in
                     zip(after[packing].parameters(), after[False].parameters(), strict=True))
            results.append({"batch": name, "packing": packing, "rows": batch.input_ids.shape[0],
                            "real_tokens": sum(batch.lengths()), "micro_batches": micro, "computed_tokens": tokens,
                            "wall_s": min(wall[packing]), "cpu_s": min(cpu[packing]),
                            "wall_s_median": statistics.median(wall[packing]), "max_dw_vs_padded": dw})
    padded = {r["batch"]: r for r in results if not r["packing"]}
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}, "
          f"torch {torch.__version__}; min of {args.repeats} interleaved updates (median wall in the JSON)")
    print(f"{'batch':8} {'packing':8} {'rows':>5} {'real tok':>9} {'micro':>6} {'computed tok':>13} "
          f"{'wall s':>7} {'cpu s':>7} {'speedup':>8} {'max |dw|':>9}")
    for r in results:
        base = padded[r["batch"]]
        print(f"{r['batch']:8} {r['packing']!s:8} {r['rows']:5d} {r['real_tokens']:9d} {r['micro_batches']:6d} "
              f"{r['computed_tokens']:13d} {r['wall_s']:7.2f} {r['cpu_s']:7.2f} {base['wall_s'] / r['wall_s']:7.2f}x "
              f"{r['max_dw_vs_padded']:9.1e}")
    print(json.dumps({"benchmark": "learner_packing", "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
