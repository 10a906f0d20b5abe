"""GPU decode benchmark: `m2rl.model.generate` (CUDA graphs, each MoE implementation) against transformers'
`generate` on the same weights and card, with the memory-bandwidth roofline of every row.

The model has the released M2 layer shapes (hidden 3072, 48 heads of 128 with 8 KV heads, 256 experts of
1536, top-8, vocab 200064) and `--layers` of them (default 2, so it fits one card twice: ours and
transformers'), random bf16 weights. Prompts of `--prompt` random tokens, `--new-tokens` greedy tokens with
no stop id, at each `--batch`.

Columns:
- tok/s: batch * new tokens / wall time of the whole `generate` call (prefill included), the measure of
  the issue's reference numbers;
- step ms: one decode step, from the difference of two runs ((t(N) - t(1)) / (N - 1)), prefill excluded;
- roofline: bytes one decode step must read (attention and router weights, the weights of the distinct
  experts the step's tokens route to, counted from the routing of a real step, the LM head, and the KV
  cache) over the copy bandwidth measured in the same run (2 x bytes / time of a device-to-device copy),
  as steps/s; `% roof` is measured steps/s over that.
- x hf: tok/s over transformers' in the same run.

From a bare checkout (no pip install; the GPU machines have torch, triton and transformers):
    mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/m2rl && PYTHONPATH=/tmp/pkg python3 -m m2rl.benchmarks.gpu_decode
    ... --layers 2 --batch 1 64 --prompt 128 --new-tokens 64 --impls torch grouped_mm triton
On the CPU, `--smoke` runs a tiny config end to end (no roofline claims).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable

import torch
from m2rl.model import ops
from m2rl.model.config import M2Config
from m2rl.model.generation import SamplingParams, _graph_decoder, generate
from m2rl.model.m2 import M2ForCausalLM


def real_shape_config(layers: int) -> M2Config:
    return M2Config(num_hidden_layers=layers, quantization_config=None, use_mtp=False)


def smoke_config() -> M2Config:
    return M2Config.from_preset("tiny", vocab_size=512, num_hidden_layers=2)


def random_model(config: M2Config, device: str, dtype: torch.dtype, seed: int = 0) -> M2ForCausalLM:
    with torch.device("meta"):
        model = M2ForCausalLM(config)
    model = model.to(dtype).to_empty(device=device)
    model.init_weights(std=0.02, seed=seed)
    with torch.no_grad():  # a non-zero correction bias, so routing is not plain top-k of the scores
        for layer in model.model.layers:
            bias = layer.block_sparse_moe.gate.e_score_correction_bias
            if bias is not None:
                bias.normal_(0.0, 0.01)
    return model.eval()


def to_transformers(model: M2ForCausalLM):  # type: ignore[no-untyped-def]
    """transformers' MiniMaxM2ForCausalLM holding copies of `model`'s weights (its in-memory layout stacks
    each layer's experts as gate_up_proj [E, 2I, D] and down_proj [E, D, I])."""
    import transformers

    fields = {k: v for k, v in model.config.to_hf_dict().items() if k not in ("architectures", "model_type")}
    hf_config = transformers.MiniMaxM2Config(**fields)
    # Built on the device itself, not on meta: the rotary embedding's inv_freq is a non-persistent buffer
    # that `to_empty` would leave as garbage.
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(model.dtype)
    try:
        with torch.device(model.device):
            hf = transformers.MiniMaxM2ForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(default_dtype)
    ours = dict(model.state_dict())
    state = {}
    for name, tensor in hf.state_dict().items():
        source = (name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
                  .replace(".mlp.e_score_correction_bias", ".block_sparse_moe.gate.e_score_correction_bias"))
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("mlp.experts.gate_up_proj")] + "block_sparse_moe.experts."
            value = torch.cat([ours[prefix + "w1"], ours[prefix + "w3"]], dim=1)
        elif name.endswith("mlp.experts.down_proj"):
            value = ours[name[: -len("mlp.experts.down_proj")] + "block_sparse_moe.experts.w2"]
        else:
            value = ours[source]
        state[name] = value.to(tensor.dtype)
    hf.load_state_dict(state, strict=True, assign=False)
    return hf.eval()


def copy_bandwidth(device: str, gigabytes: float = 4.0) -> float:
    """Bytes/s of a device-to-device copy, counting read + write."""
    n = int(gigabytes * 1e9 / 2)
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * a.element_size() * 10 / (time.perf_counter() - start)


def step_bytes(model: M2ForCausalLM, prompts: list[list[int]], context: int) -> tuple[float, list[int]]:
    """Bytes one decode step reads at this batch, and the distinct experts each layer's routing hits (from
    one real decode step after the prompts)."""
    c = model.config
    gates = [layer.block_sparse_moe.gate for layer in model.model.layers]
    logits, step = _graph_decoder(model, prompts, 2, use_graphs=False)
    for gate in gates:
        gate.record_load, gate.load_E = True, None
    with torch.no_grad():
        step(torch.argmax(logits, dim=-1))
    distinct = [int((gate.load_E > 0).sum()) for gate in gates]
    for gate in gates:
        gate.record_load, gate.load_E = False, None
    width = model.dtype.itemsize
    attention = (2 * c.q_dim * c.hidden_size + 2 * c.kv_dim * c.hidden_size) * width
    router = c.num_local_experts * c.hidden_size * 4
    expert = 3 * c.hidden_size * c.intermediate_size * width
    kv = 2 * len(prompts) * context * c.kv_dim * width
    total = sum(attention + router + d * expert + kv for d in distinct)
    total += c.vocab_size * c.hidden_size * width  # LM head
    return float(total), distinct


def timed(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@dataclasses.dataclass
class Row:
    implementation: str
    batch: int
    tok_per_s: float
    step_ms: float
    roofline_pct: float
    vs_transformers: float
    peak_gib: float


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--impls", nargs="+", default=["torch", "grouped_mm", "triton"],
                        help="moe_experts implementations to run with CUDA graphs (those not registered are skipped)")
    parser.add_argument("--eager", action="store_true", help="also rows with M2RL_CUDA_GRAPHS=0")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny config on the CPU: proves the script runs")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    config = smoke_config() if args.smoke else real_shape_config(args.layers)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    try:
        from m2rl import kernels

        kernels.register_all()
    except (ImportError, AttributeError):
        pass
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}; torch {torch.__version__}; "
          f"{config.num_hidden_layers} layers, {config.num_local_experts} experts, vocab {config.vocab_size}", flush=True)
    bandwidth = copy_bandwidth(device) if device == "cuda" else float("nan")
    print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s", flush=True)
    model = random_model(config, device, dtype)
    hf = None if args.no_transformers else to_transformers(model)
    gen = torch.Generator().manual_seed(0)
    rows: list[Row] = []
    for batch in args.batch:
        prompts = [torch.randint(0, config.vocab_size, (args.prompt,), generator=gen).tolist() for _ in range(batch)]
        context = args.prompt + args.new_tokens // 2
        nbytes, distinct = step_bytes(model, prompts, context)
        roof_steps = bandwidth / nbytes
        print(f"batch {batch}: distinct experts per layer {distinct}; {nbytes / 1e9:.2f} GB a step; "
              f"roofline {roof_steps:.0f} steps/s", flush=True)
        hf_tok_s = float("nan")
        if hf is not None:
            ids = torch.tensor(prompts, device=device)
            mask = torch.ones_like(ids)

            def hf_generate(n: int, ids: torch.Tensor = ids, mask: torch.Tensor = mask) -> object:
                with torch.no_grad():
                    return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, eos_token_id=None, pad_token_id=0)

            with torch.no_grad():
                ours_logits = model(ids[:1, :32]).float()
                theirs = hf(input_ids=ids[:1, :32]).logits.float()
            rel = ((ours_logits - theirs).norm() / theirs.norm()).item()
            print(f"  logits vs transformers: relative difference {rel:.2e}", flush=True)
            hf_generate(2)
            t_full, t_one = timed(lambda: hf_generate(args.new_tokens), device), timed(lambda: hf_generate(1), device)
            hf_tok_s = batch * args.new_tokens / t_full
            step = (t_full - t_one) / max(args.new_tokens - 1, 1)
            rows.append(Row("transformers", batch, hf_tok_s, 1e3 * step, 100 / step / roof_steps, 1.0,
                            torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0))
            print(f"  {rows[-1]}", flush=True)
        modes = [(impl, True) for impl in args.impls] + [(impl, False) for impl in args.impls if args.eager]
        for impl, graphs in modes:
            if impl not in ops.available("moe_experts"):
                print(f"  moe_experts={impl}: not registered here, skipped", flush=True)
                continue
            os.environ["M2RL_CUDA_GRAPHS"] = "1" if graphs else "0"
            params = SamplingParams(max_tokens=args.new_tokens, greedy=True)
            with ops.using(moe_experts=impl):
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                generate(model, prompts, params)  # warm-up: captures the graphs, compiles kernels
                one = SamplingParams(max_tokens=1, greedy=True)
                t_full = timed(lambda p=prompts, s=params: generate(model, p, s), device)
                t_one = timed(lambda p=prompts, s=one: generate(model, p, s), device)
            step = (t_full - t_one) / max(args.new_tokens - 1, 1)
            tok_s = batch * args.new_tokens / t_full
            name = f"m2rl {impl}" + ("" if graphs else " (eager)")
            rows.append(Row(name, batch, tok_s, 1e3 * step, 100 / step / roof_steps, tok_s / hf_tok_s,
                            torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0))
            print(f"  {rows[-1]}", flush=True)
    os.environ.pop("M2RL_CUDA_GRAPHS", None)
    print()
    print("| implementation | batch | tok/s | step ms | % roofline | x transformers | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.implementation} | {r.batch} | {r.tok_per_s:,.1f} | {r.step_ms:.2f} | {r.roofline_pct:.1f} | "
              f"{r.vs_transformers:.2f} | {r.peak_gib:.1f} |")
    print(json.dumps({"bandwidth_tb_s": bandwidth / 1e12, "rows": [dataclasses.asdict(r) for r in rows]}))


if __name__ == "__main__":
    main()
