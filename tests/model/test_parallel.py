"""ShardedM2 (expert- and head-parallel M2) against the single-process M2ForCausalLM, on CPU.

The two-rank tests spawn 2 processes joined by gloo; the oracle is M2ForCausalLM holding the same (gathered)
weights: logits within fp32 tolerance and the same greedy ids. FP8 variants give the reference the
dequantised values of the very fp8 codes the sharded model holds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from m2rl.model import M2Config, M2ForCausalLM, ops
from m2rl.model.fp8 import dequantize_fp8_blocks, quantize_fp8_blocks
from m2rl.model.parallel import launch
from m2rl.model.parallel.fp8_experts import (
    DenseExperts,
    Fp8Experts,
    fp8_expert_bytes,
    moe_experts_local_torch,
)
from m2rl.model.parallel.layout import (
    ShardLayout,
    expert_owner,
    kv_head_of,
    localize_experts,
    padded_shard_range,
    shard_range,
)
from m2rl.model.parallel.sharded_m2 import ShardedM2, gather_shards

ROOT = Path(__file__).resolve().parents[2]
TINY = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "rotary_dim": 16, "rope_theta": 10000.0,
        "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 256, "use_mtp": False,
        "num_mtp_modules": 0, "bos_token_id": 0, "eos_token_id": 2}
# 32x32 blocks: the tiny expert matrices (64x128) hold several blocks, as the real ones (1536x3072) do.
FP8 = {"quant_method": "fp8", "fmt": "float8_e4m3fn", "weight_block_size": [32, 32]}
NEW_TOKENS = 5


def tiny_config(fp8: bool) -> M2Config:
    return M2Config(**TINY, quantization_config=dict(FP8) if fp8 else None)


def reference_and_state(config: M2Config, seed: int = 0) -> tuple[M2ForCausalLM, dict[str, torch.Tensor]]:
    """A random fp32 reference (non-trivial norms and routing bias) and the state dict to shard. With FP8,
    the state holds each expert matrix and each attention projection as fp8 codes + scales and the
    reference their dequantised values."""
    model = M2ForCausalLM(config).init_weights(std=0.1, seed=seed).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        for _, b in model.named_buffers():
            b.copy_(0.1 * torch.randn(b.shape, generator=gen))
    state = dict(model.state_dict())
    if config.quantization_config is not None:
        block = tuple(config.quantization_config["weight_block_size"])
        with torch.no_grad():
            for layer_idx, layer in enumerate(model.model.layers):
                for name in ("w1", "w3", "w2"):
                    dense = getattr(layer.block_sparse_moe.experts, name)
                    codes, scales = zip(*(quantize_fp8_blocks(w, block) for w in dense), strict=True)
                    key = f"model.layers.{layer_idx}.block_sparse_moe.experts.{name}"
                    state[key], state[key + "_scale_inv"] = torch.stack(codes), torch.stack(scales)
                    dense.copy_(torch.stack([dequantize_fp8_blocks(c, s, block) for c, s in zip(codes, scales,
                                                                                               strict=True)]))
                for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    proj = getattr(layer.self_attn, name).weight
                    key = f"model.layers.{layer_idx}.self_attn.{name}.weight"
                    state[key], state[key + "_scale_inv"] = quantize_fp8_blocks(proj, block)
                    proj.copy_(dequantize_fp8_blocks(state[key], state[key + "_scale_inv"], block))
    return model, state


def prompts(batch: int = 3, length: int = 7, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_greedy(model: M2ForCausalLM, ids: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy ids by recomputing the whole sequence each step: no KV cache to share bugs with."""
    for _ in range(n):
        ids = torch.cat((ids, model(ids)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return ids[:, -n:]


def check_parity(rank: int, world: int, fp8: bool) -> None:
    config = tiny_config(fp8)
    reference, state = reference_and_state(config)
    group = dist.group.WORLD if world > 1 else None
    model = ShardedM2.from_full_state_dict(state, config, rank, world, group, dtype=torch.float32)
    ids = prompts()
    with torch.no_grad():
        expected, got = reference(ids), model(ids)
    err = (got - expected).abs().max().item()
    assert err < 1e-4, f"fp8={fp8} rank {rank}/{world}: logits differ by {err} (scale {expected.abs().max():.2f})"
    out = model.generate_greedy(ids, NEW_TOKENS)
    want = reference_greedy(reference, ids, NEW_TOKENS)
    assert torch.equal(out.ids, want), f"fp8={fp8} rank {rank}/{world}: greedy {out.ids.tolist()} != {want.tolist()}"


# ---- layout ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_expert_and_head_shards_cover_everything_once(world):
    config = M2Config()
    layouts = [ShardLayout.build(config, r, world) for r in range(world)]
    for field, total in (("experts", 256), ("q_heads", 48), ("kv_heads", 8)):
        owned = [i for lay in layouts for i in getattr(lay, field)]
        assert owned == list(range(total)), field
    for lay in layouts:
        assert all(expert_owner(e, 256, world) == lay.rank for e in lay.experts)
        # every q head of a rank reads a KV head of the same rank
        assert {kv_head_of(h, 48, 8) for h in lay.q_heads} == set(lay.kv_heads)


def test_released_m2_on_two_ranks():
    lay = ShardLayout.build(M2Config(), rank=1, world=2)
    assert (lay.experts, lay.q_heads, lay.kv_heads) == (range(128, 256), range(24, 48), range(4, 8))
    assert lay.vocab == range(100032, 200064) and lay.vocab_shard_size == 100032
    assert lay.q_rows(128) == slice(3072, 6144) and lay.kv_rows(128) == slice(512, 1024)


def test_uneven_splits_are_refused():
    with pytest.raises(ValueError, match="do not split evenly"):
        shard_range(8, 0, 3, "KV heads")
    with pytest.raises(ValueError, match="do not split evenly"):
        ShardLayout.build(M2Config(), rank=0, world=16)  # 8 KV heads cannot cover 16 ranks
    with pytest.raises(ValueError, match="rank 2"):
        shard_range(8, 2, 2)


def test_vocab_shards_pad_the_last_rank():
    assert [padded_shard_range(10, r, 4) for r in range(4)] == [range(3), range(3, 6), range(6, 9), range(9, 10)]
    assert padded_shard_range(2, 3, 4) == range(2, 2)  # a shard may hold padding only


def test_localize_experts_marks_other_ranks_slots():
    experts_TK = torch.tensor([[0, 5], [3, 7], [4, 4]])
    assert localize_experts(experts_TK, first=4, count=4).tolist() == [[-1, 1], [-1, 3], [0, 0]]
    assert localize_experts(experts_TK, first=0, count=4).tolist() == [[0, -1], [3, -1], [-1, -1]]


# ---- experts --------------------------------------------------------------------------------------------
def _routing(T: int, K: int, E: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    experts_TK = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    return experts_TK, torch.rand(T, K, generator=gen)


@pytest.mark.parametrize("tokens", [3, 40])  # 3*2 pairs: gathered per slot; 40*2: one pass per expert hit
def test_fp8_experts_match_the_dense_reference_on_their_dequantised_weights(tokens):
    E, D, I, K, block = 6, 128, 64, 2, (32, 32)
    gen = torch.Generator().manual_seed(0)
    dense = {n: 0.05 * torch.randn(E, *(s), generator=gen) for n, s in (("w1", (I, D)), ("w3", (I, D)), ("w2", (D, I)))}
    fp8 = Fp8Experts(E, D, I, block, backend="torch")
    for name, w in dense.items():
        fp8.load_(name, w)  # quantised on load
    deq = {n: torch.stack([dequantize_fp8_blocks(getattr(fp8, n)[e], fp8.scale_inv(n)[e], block) for e in range(E)])
           for n in dense}
    x = torch.randn(tokens, D, generator=gen)
    experts_TK, weights_TK = _routing(tokens, K, E)
    expected = ops.moe_experts_torch(x, deq["w1"], deq["w3"], deq["w2"], experts_TK, weights_TK)
    got = fp8(x, experts_TK, weights_TK)
    assert (got - expected).abs().max().item() < 1e-5
    # this rank owning experts 0..2 only: the other slots contribute nothing
    local_TK = localize_experts(experts_TK, first=0, count=3)
    half = Fp8Experts(3, D, I, block, backend="torch")
    for name in dense:
        half.load_(name, getattr(fp8, name)[:3], fp8.scale_inv(name)[:3])
    mine_TK = (experts_TK < 3).float()
    expected_half = ops.moe_experts_torch(x, deq["w1"], deq["w3"], deq["w2"], experts_TK, weights_TK * mine_TK)
    assert (half(x, local_TK, weights_TK) - expected_half).abs().max().item() < 1e-5


def test_dense_experts_gather_and_loop_paths_agree():
    experts = DenseExperts(4, 32, 16, torch.float32).random_(std=0.1, seed=0)
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(1))
    local_TK = localize_experts(_routing(20, 2, 8)[0], first=2, count=4)
    weights_TK = torch.rand(20, 2)
    gathered = moe_experts_local_torch(x, experts, local_TK, weights_TK, gather_max=1000)
    looped = moe_experts_local_torch(x, experts, local_TK, weights_TK, gather_max=0)
    assert (gathered - looped).abs().max().item() < 1e-5 and gathered.abs().max() > 0


def test_fp8_random_init_has_the_asked_std_and_is_deterministic():
    a = Fp8Experts(2, 256, 128, (128, 128)).random_(std=0.02, seed=3)
    b = Fp8Experts(2, 256, 128, (128, 128)).random_(std=0.02, seed=3)
    c = Fp8Experts(2, 256, 128, (128, 128)).random_(std=0.02, seed=4, max_chunk=1000)  # chunking: same law
    assert torch.equal(a.w2.view(torch.uint8), b.w2.view(torch.uint8))
    assert not torch.equal(a.w2.view(torch.uint8), c.w2.view(torch.uint8))
    w = a.dequantized("w1", torch.arange(2), torch.float32)
    assert abs(w.std().item() - 0.02) < 0.002 and w.abs().max().item() <= 4 * 0.02 + 1e-6
    assert abs(c.dequantized("w2", torch.arange(2), torch.float32).std().item() - 0.02) < 0.002
    assert fp8_expert_bytes(3072, 1536) == 3 * 3072 * 1536 + 4 * 3 * 12 * 24


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_kernels_match_the_torch_reference_in_the_interpreter():
    """The CUDA kernels' logic on CPU (TRITON_INTERPRET=1, fp16: the interpreter's bf16 dot is broken)."""
    code = textwrap.dedent("""
        import torch
        from m2rl.model.parallel.fp8_experts import Fp8Experts, fp8_moe_triton, moe_experts_local_torch
        from m2rl.model.parallel.layout import localize_experts
        for E, D, I, T, K in ((4, 128, 64, 3, 2), (4, 64, 96, 40, 3)):
            ex = Fp8Experts(E, D, I, (32, 32)).random_(std=0.05, seed=1)
            for name in ("w1", "w3", "w2"):  # scales that differ block to block
                ex.scale_inv(name).uniform_(0.5e-4, 2e-4, generator=torch.Generator().manual_seed(2))
            gen = torch.Generator().manual_seed(T)
            x = torch.randn(T, D, generator=gen)
            local = localize_experts(torch.randint(0, 2 * E, (T, K), generator=gen), first=E // 2, count=E)
            w = torch.rand(T, K, generator=gen)
            got = fp8_moe_triton(x.half(), ex, local, w).float()
            want = moe_experts_local_torch(x, ex, local, w)
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err < 5e-3 and (local < 0).any(), err
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


# ---- the model ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fp8", [False, True], ids=["dense", "fp8"])
def test_one_rank_matches_the_reference(fp8):
    check_parity(0, 1, fp8)


def test_a_released_m2_rank_fits_an_h200_and_reads_what_the_roofline_counts():
    with torch.device("meta"):
        model = ShardedM2(M2Config.from_preset("m2"), rank=0, world=2, device="meta", dtype=torch.bfloat16)
    total = sum(b.numel() * b.element_size() for b in model.buffers())
    experts = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if ".experts." in n)
    assert experts == 62 * 128 * fp8_expert_bytes(3072, 1536)
    assert 115e9 < total < 120e9  # 141 GB per H200: ~20 GB left for the KV cache and activations
    counted = model.decode_step_bytes(batch=1, context=160, experts_hit=62 * 4)
    assert counted["lm_head"] == 100032 * 3072 * 2 + 3072 * 2
    # fp8 q/k/v and o_proj with their fp32 128x128 block scales, bf16 q/k norms and the two layer norms
    fp8_projections = 3072 * (3072 + 2 * 512) + 4 * 32 * 24 + 3072 * 3072 + 4 * 24 * 24
    assert counted["attention_weights"] == 62 * (fp8_projections + 2 * (3072 + 512 + 2 * 3072))
    attention = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if "_proj." in n)
    assert attention == 62 * fp8_projections  # held as read: nothing is dequantised to memory
    assert counted["kv_cache"] == 160 * 62 * 2 * 4 * 128 * 2


def test_fp8_attention_is_quantised_whole_on_load_and_refuses_a_shard_that_cuts_a_scale_block():
    config = tiny_config(fp8=True)
    reference = M2ForCausalLM(config).init_weights(std=0.1, seed=0)
    state = dict(reference.state_dict())  # dense attention weights: quantised on load
    model = ShardedM2.from_full_state_dict(state, config, rank=1, world=2, dtype=torch.float32)
    attn, block = model.layers[0].self_attn, (32, 32)
    full = {n: dequantize_fp8_blocks(*quantize_fp8_blocks(state[f"model.layers.0.self_attn.{n}.weight"], block), block)
            for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    q_rows, kv_rows = model.layout.q_rows(32), model.layout.kv_rows(32)
    expected_qkv = torch.cat((full["q_proj"][q_rows], full["k_proj"][kv_rows], full["v_proj"][kv_rows]))
    assert attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    assert torch.equal(attn.qkv_proj.dequantized(), expected_qkv)
    assert torch.equal(attn.o_proj.dequantized(), full["o_proj"][:, q_rows])
    # 64x64 blocks: each rank's 32 KV rows (one head of 32) would split a block in two
    cut = M2Config(**TINY, quantization_config={**FP8, "weight_block_size": [64, 64]})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj: .*cuts a 64-wide FP8 scale block"):
        ShardedM2.from_full_state_dict(state, cut, rank=0, world=2, dtype=torch.float32)


def _two_rank_worker(rank: int, world: int) -> None:
    torch.set_num_threads(1)
    for fp8 in (False, True):
        check_parity(rank, world, fp8)
    # Random init: replicated tensors agree across ranks, sharded ones differ; ranks decode the same ids.
    config = tiny_config(fp8=True)
    model = ShardedM2(config, rank, world, dist.group.WORLD, dtype=torch.float32).init_random_(seed=5, std=0.1)
    layer = model.layers[1]
    for name, t, replicated in (("router", layer.block_sparse_moe.gate_weight, True),
                                ("embedding", model.embed_tokens, True),
                                ("experts", layer.block_sparse_moe.experts.w1.float(), False),
                                ("attention", layer.self_attn.qkv_proj.weight.float(), False)):
        both = gather_shards(t, rank, world, dist.group.WORLD)
        assert torch.equal(both[0], both[1]) == replicated, name
    ids = model.generate_greedy(prompts(batch=2, length=4), NEW_TOKENS).ids.float()
    both = gather_shards(ids, rank, world, dist.group.WORLD)
    assert torch.equal(both[0], both[1])


def test_two_ranks_match_the_single_process_model():
    # The children unpickle _two_rank_worker by this module's pytest name, tests.model.test_parallel:
    # they inherit sys.path as it is at spawn time (appended, so nothing in the repository shadows a package).
    sys.path.append(str(ROOT))
    try:
        launch.spawn(_two_rank_worker, world=2, backend="gloo", timeout_s=120)
    finally:
        sys.path.remove(str(ROOT))


def test_full_decode_benchmark_runs_end_to_end_on_two_cpu_ranks():
    cmd = [sys.executable, "-m", "m2rl.benchmarks.m2_full_decode", "--device", "cpu", "--tiny", "--batch", "1", "3",
           "--prompt", "8", "--new-tokens", "4"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("{"), proc.stdout[-2000:]  # the JSON line comes last
    result = json.loads(last)
    assert result["world"] == 2 and result["moe_backend"] == "torch" and result["skipped_batches"] == []
    assert [(r["batch"], r["mode"]) for r in result["rows"]] == [(1, "eager"), (3, "eager")]
    assert all(r["decode_tok_s"] > 0 and 0 < r["roofline_ratio"] for r in result["rows"])
