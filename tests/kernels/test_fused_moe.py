"""Fused MoE kernels against the torch reference (`ops.moe_experts_torch`) and a Python alignment oracle.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (conftest.py), so shapes are small
and chosen to hit every mask: D and I not multiples of the tiles, experts with no rows, one token, fewer
rows than experts. The `gpu` tests run M2's real shapes and a CUDA-graph replay.
"""

from __future__ import annotations

import math

import pytest
import torch
from m2rl.model import ops

# (T, K, E, D, I): odd widths; T*K < E; one token; blocks shared by many rows
SHAPES = [(3, 2, 9, 40, 24), (17, 3, 5, 96, 80), (1, 1, 4, 16, 16), (1, 3, 9, 33, 17)]


def _routing(T: int, K: int, E: int, gen: torch.Generator, experts_used: int | None = None):
    """Duplicate-free top-K over random scores (among the first `experts_used` experts only, if given)
    and random positive fp32 weights, on the generator's device."""
    scores = torch.rand(T, experts_used or E, generator=gen, device=gen.device)
    experts_TK = scores.topk(K, dim=1).indices
    weights_TK = torch.rand(T, K, generator=gen, device=gen.device) + 0.1
    return experts_TK, weights_TK


def _expert_weights(E, D, I, dtype, device, seed=0):
    """w1, w3 [E, I, D] and w2 [E, D, I], normal with 1/sqrt(fan-in) scale, made on the device (M2's
    weights are 7 GB in bf16)."""
    gen = torch.Generator(device).manual_seed(seed)
    w1 = torch.randn(E, I, D, generator=gen, device=device, dtype=dtype) / math.sqrt(D)
    w3 = torch.randn(E, I, D, generator=gen, device=device, dtype=dtype) / math.sqrt(D)
    w2 = torch.randn(E, D, I, generator=gen, device=device, dtype=dtype) / math.sqrt(I)
    return w1, w3, w2


def _tokens(T, K, E, D, dtype, device, seed=0, experts_used=None):
    """x [T, D] and a routing (experts_TK, weights_TK)."""
    gen = torch.Generator(device).manual_seed(1000 + seed)
    x = torch.randn(T, D, generator=gen, device=device, dtype=dtype)
    return (x, *_routing(T, K, E, gen, experts_used))


def _problem(T, K, E, D, I, dtype, device, seed=0, experts_used=None):
    """The arguments of moe_experts: x, w1, w3, w2, experts_TK, weights_TK."""
    x, experts, weights = _tokens(T, K, E, D, dtype, device, seed, experts_used)
    return (x, *_expert_weights(E, D, I, dtype, device, seed), experts, weights)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---- moe_align_block_size -----------------------------------------------------------------------------
def _align_reference(experts_TK: torch.Tensor, E: int, block_m: int):
    """The layout by hand: each expert's rows in order, padded with T*K to a multiple of block_m."""
    flat = experts_TK.reshape(-1).tolist()
    pad = len(flat)
    sorted_rows, block_expert = [], []
    for e in range(E):
        rows = [r for r, ex in enumerate(flat) if ex == e]
        sorted_rows += rows + [pad] * (-len(rows) % block_m)
        block_expert += [e] * (-(-len(rows) // block_m))
    return sorted_rows, block_expert


@pytest.mark.parametrize("T,K,E,block_m", [(17, 3, 5, 4), (3, 2, 9, 16), (1, 1, 4, 16), (1, 3, 9, 2),
                                           (40, 2, 6, 1), (8, 2, 64, 16)])
def test_align_matches_reference_layout(moe_align, T, K, E, block_m):
    gen = torch.Generator().manual_seed(T * 100 + E)
    experts_TK, _ = _routing(T, K, E, gen, experts_used=max(K, E - 2))  # the last two experts get nothing
    got = moe_align.moe_align_block_size(experts_TK, E, block_m)
    sorted_rows, block_expert = _align_reference(experts_TK, E, block_m)
    used = len(sorted_rows)

    assert got.num_padded.tolist() == [used]
    assert got.sorted_rows[:used].tolist() == sorted_rows
    assert (got.sorted_rows[used:] == T * K).all()  # padding past the used part is out of range too
    assert got.block_expert[: used // block_m].tolist() == block_expert
    assert (got.block_expert[used // block_m:] == -1).all()
    # the properties the kernels rely on, checked directly as well
    rows = got.sorted_rows[got.sorted_rows < T * K]
    assert sorted(rows.tolist()) == list(range(T * K))  # every (t, k) exactly once
    flat = experts_TK.reshape(-1)
    for b, e in enumerate(got.block_expert.tolist()):
        block = got.sorted_rows[b * block_m:(b + 1) * block_m]
        real = block[block < T * K]
        if e == -1:
            assert real.numel() == 0
        else:
            assert real.numel() > 0 and (flat[real.long()] == e).all()  # one expert per block


def test_align_sizes_depend_only_on_shapes(moe_align):
    """Sync-free means static sizes: two routings of one shape (one spread out, one piled onto a single
    expert) give tensors of the same sizes, the bound from the shapes alone."""
    T, K, E, block_m = 6, 2, 8, 4
    spread = torch.arange(T * K).remainder(E).view(T, K)
    piled = torch.stack([torch.zeros(T, dtype=torch.long), torch.ones(T, dtype=torch.long)], 1)
    a = moe_align.moe_align_block_size(spread, E, block_m)
    b = moe_align.moe_align_block_size(piled, E, block_m)
    bound = moe_align.max_padded_rows(T * K, E, block_m)
    assert bound == math.ceil((T * K + min(E, T * K) * (block_m - 1)) / block_m) * block_m
    assert [t.shape for t in a] == [t.shape for t in b] == [(bound,), (bound // block_m,), (1,)]
    assert a.num_padded.item() != b.num_padded.item()


# ---- the fused forward --------------------------------------------------------------------------------
def _config(fused_moe, small_tiles: bool):
    # small tiles: several row blocks, column tiles and reduction steps, and a partial group of row blocks
    return fused_moe.MoEConfig(block_m=16, block_n=16, block_k=16, group_m=2) if small_tiles else None


@pytest.mark.parametrize("small_tiles", [False, True], ids=["default-tiles", "small-tiles"])
@pytest.mark.parametrize("T,K,E,D,I", SHAPES)
def test_fp32_matches_torch(fused_moe, device, T, K, E, D, I, small_tiles):
    args = _problem(T, K, E, D, I, torch.float32, device)
    got = fused_moe.fused_moe(*args, config=_config(fused_moe, small_tiles))
    torch.testing.assert_close(got, ops.moe_experts_torch(*args), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,K,E,D,I", SHAPES[:2])
def test_half_precision_matches_torch(fused_moe, device, T, K, E, D, I, dtype):
    args = _problem(T, K, E, D, I, dtype, device, seed=1)
    got = fused_moe.fused_moe(*args, config=_config(fused_moe, small_tiles=True))
    assert got.dtype == dtype
    # both round h to 16 bits; the kernel keeps the down projection and the K-sum in fp32
    assert _rel_err(got, ops.moe_experts_torch(*args)) < 1e-2


def test_experts_without_rows(fused_moe, device):
    """All rows on 2 of 9 experts: the other experts' weights are never read (NaN there would show)."""
    x, w1, w3, w2, experts, weights = _problem(17, 2, 9, 40, 24, torch.float32, device, experts_used=2)
    for w in (w1, w3, w2):
        w[2:] = float("nan")
    got = fused_moe.fused_moe(x, w1, w3, w2, experts, weights)
    ref = ops.moe_experts_torch(x, w1[:2], w3[:2], w2[:2], experts, weights)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_strided_inputs(fused_moe, device):
    """x and weights that are views (a slice of a wider activation, a transposed storage) go by strides."""
    T, K, E, D, I = 5, 2, 4, 24, 40
    x, w1, w3, w2, experts, weights = _problem(T, K, E, D, I, torch.float32, device, seed=2)
    x_wide = torch.cat([x, torch.randn_like(x)], dim=1)[:, :D]
    w2_t = w2.transpose(1, 2).contiguous().transpose(1, 2)
    got = fused_moe.fused_moe(x_wide, w1, w3, w2_t, experts, weights)
    torch.testing.assert_close(got, ops.moe_experts_torch(x, w1, w3, w2, experts, weights), rtol=1e-4, atol=1e-5)


def test_no_tokens(fused_moe, device):
    x, w1, w3, w2, experts, weights = _problem(1, 2, 4, 16, 16, torch.float32, device)
    got = fused_moe.fused_moe(x[:0], w1, w3, w2, experts[:0], weights[:0])
    assert got.shape == (0, 16)


def test_registered_not_selected_and_dispatches(fused_moe, device):
    kernels = pytest.importorskip("m2rl.kernels")
    assert ("moe_experts", "triton") in kernels.register_all()
    assert "triton" in ops.available("moe_experts")
    with ops.using(moe_experts="torch"):
        assert fused_moe.register() == [("moe_experts", "triton")]
        assert ops.selected("moe_experts") == "torch"  # registering never selects
    args = _problem(3, 2, 9, 40, 24, torch.float32, device, seed=3)
    with torch.no_grad(), ops.using(moe_experts="triton"):
        got = ops.moe_experts(*args)
    torch.testing.assert_close(got, ops.moe_experts_torch(*args), rtol=1e-4, atol=1e-5)


def test_autograd_runs_the_backward_function_only_when_gradients_are_needed(fused_moe, device):
    """When autograd needs gradients the forward goes through FusedMoEFunction (its backward kernels are
    checked in test_fused_moe_backward.py); without, the plain forward runs and records no graph."""
    x, w1, w3, w2, experts, weights = _problem(3, 2, 5, 16, 16, torch.float32, device, seed=4)
    weights.requires_grad_(True)  # the router's weights carry gradient in training
    out = fused_moe.fused_moe_experts(x, w1, w3, w2, experts, weights)
    assert type(out.grad_fn).__name__ == "FusedMoEFunctionBackward"
    out.square().sum().backward()
    assert weights.grad is not None and torch.isfinite(weights.grad).all()
    with torch.no_grad():  # no gradient needed: the kernel runs
        assert fused_moe.fused_moe_experts(x, w1, w3, w2, experts, weights).grad_fn is None


def test_cost_model(fused_moe):
    assert fused_moe.flops(64, 8, 3072, 1536) == 2 * 64 * 8 * 3072 * 1536 * 3
    one = fused_moe.bytes_moved(1, 8, 3072, 1536, num_active_experts=8, elem_bytes=2)
    assert one > 8 * 3 * 3072 * 1536 * 2  # at least the weights of the 8 experts hit
    assert fused_moe.active_experts(torch.tensor([[1, 2], [2, 7]])) == 3


# ---- GPU: M2 shapes, no host sync, CUDA graphs --------------------------------------------------------
M2 = {"E": 256, "D": 3072, "I": 1536, "K": 8}


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 512, 2048, 4096])  # every default tile config: 16- to 128-row blocks
def test_m2_shapes_bf16(fused_moe, T):
    args = _problem(T, M2["K"], M2["E"], M2["D"], M2["I"], torch.bfloat16, "cuda", seed=T)
    torch.cuda.set_sync_debug_mode("error")  # any host sync in the forward raises
    try:
        got = fused_moe.fused_moe_experts(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert _rel_err(got, ops.moe_experts_torch(*args)) < 2e-2


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_routing(fused_moe):
    T, K, E, D, I = 64, M2["K"], M2["E"], M2["D"], M2["I"]
    w1, w3, w2 = _expert_weights(E, D, I, torch.bfloat16, "cuda", seed=7)
    static = list(_tokens(T, K, E, D, torch.bfloat16, "cuda", seed=7))

    def forward():
        return fused_moe.fused_moe_experts(static[0], w1, w3, w2, static[1], static[2])

    stream = torch.cuda.Stream()  # warm up (compile) off the default stream, as capture requires
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = forward()

    for seed in (8, 9):  # new activations and routing copied into the captured inputs
        x2, experts2, weights2 = _tokens(T, K, E, D, torch.bfloat16, "cuda", seed=seed)
        for dst, src in zip(static, (x2, experts2, weights2)):
            dst.copy_(src)
        graph.replay()
        assert _rel_err(out, ops.moe_experts_torch(x2, w1, w3, w2, experts2, weights2)) < 2e-2


@pytest.mark.parametrize("elem_bytes", [2, 4])
@pytest.mark.parametrize("tokens", [1, 64, 512, 4096, 16384])
def test_default_tiles_fit_hopper_shared_memory(tokens, elem_bytes):
    """An fp32 model on an H200 once failed with "out of resource: shared memory, Required 245760,
    limit 232448": every default must fit the per-block limit in every dtype."""
    from m2rl.kernels.fused_moe import default_config, shared_memory_bytes

    config = default_config(tokens, 8, 256, elem_bytes)
    assert shared_memory_bytes(config, elem_bytes) <= 232448
