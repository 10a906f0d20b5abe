"""The FP8 block-scaled linear kernel against the fp32 product of x and the dequantised weight.

Without a GPU the kernel runs under Triton's interpreter on CPU tensors (conftest.py) in fp16 (the
interpreter's bf16 dot is broken): decode (M = 1) and odd shapes (M, N and K not multiples of the tiles),
blocks of 16x32, 32 and 128, random codes with scales that differ block to block, a bias, leading dims, and
Fp8Linear through either backend. The `gpu` test runs M2's attention shapes in bf16 (qkv 8192 x 3072 and
o_proj 3072 x 6144) with host syncs turned into errors.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType

import pytest
import torch
from m2rl.model.fp8 import FP8_DTYPE, FP8_MAX, dequantize_fp8_blocks
from m2rl.model.fp8_linear import Fp8Linear


# `fused_moe` is conftest.py's guard that m2rl.kernels imported (interpreted where there is no GPU); importing
# the package imported this module too.
@pytest.fixture(scope="module")
def kernel(fused_moe) -> ModuleType:
    return importlib.import_module("m2rl.kernels.fp8_block_linear")


def fp8_problem(M: int, N: int, K: int, block: tuple[int, int], dtype: torch.dtype, device: str = "cpu",
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K], fp8 codes [N, K] spread over e4m3's range, scales in [0.5, 2] x 1e-3 differing per block."""
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(M, K, generator=gen, device=device).to(dtype)
    codes = (torch.randn(N, K, generator=gen, device=device) * FP8_MAX / 4).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    shape = (math.ceil(N / block[0]), math.ceil(K / block[1]))
    scales = 1e-3 * (0.5 + 1.5 * torch.rand(shape, generator=gen, device=device))
    return x, codes, scales


def oracle(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, block: tuple[int, int],
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """The product in fp32 (double-rounding free, so both implementations are measured against it)."""
    y = x.float() @ dequantize_fp8_blocks(codes, scales, block).t()
    return y if bias is None else y + bias.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize(("M", "N", "K", "block"), [
    (1, 100, 72, (32, 32)),     # decode; N and K cut the last tiles and scale blocks
    (37, 200, 136, (32, 32)),   # rows not a multiple of the row tile
    (1, 160, 300, (128, 128)),  # the release's blocks, partial last blocks both ways
    (70, 136, 256, (128, 128)),  # more rows than one 64-row tile
    (20, 48, 80, (16, 32)),     # rectangular blocks: BLOCK_N 16
])
def test_kernel_matches_the_fp32_product_in_the_interpreter(kernel, M, N, K, block):
    x, codes, scales = fp8_problem(M, N, K, block, torch.float16, seed=M + N)
    got = kernel.fp8_block_linear(x, codes, scales, block)
    want = oracle(x, codes, scales, block)
    ref = kernel.fp8_block_linear_torch(x, codes, scales, block)
    assert got.dtype == torch.float16 and got.shape == (M, N)
    # one fp16 rounding of each output: as close to the fp32 product as the reference, which also rounds
    # the dequantised weight to fp16
    assert rel_err(got, want) < 1e-3 and rel_err(got, want) <= 1.1 * rel_err(ref, want) + 1e-4


def test_kernel_adds_the_bias_and_keeps_leading_dims(kernel):
    block = (32, 32)
    x, codes, scales = fp8_problem(6, 72, 40, block, torch.float16, seed=5)
    bias = torch.randn(72, generator=torch.Generator().manual_seed(6)).half()
    got = kernel.fp8_block_linear(x.view(2, 3, 40), codes, scales, block, bias)
    assert got.shape == (2, 3, 72)
    assert rel_err(got.view(6, 72), oracle(x, codes, scales, block, bias)) < 1e-3


def test_blocks_the_kernel_cannot_tile_fall_back_to_the_reference(kernel):
    block = (24, 48)  # not powers of two
    x, codes, scales = fp8_problem(3, 50, 100, block, torch.float32, seed=7)
    assert not kernel.blocks_supported(block) and kernel.blocks_supported((16, 128))
    assert torch.equal(kernel.fp8_block_linear(x, codes, scales, block),
                       kernel.fp8_block_linear_torch(x, codes, scales, block))


def test_flop_and_byte_counts(kernel):
    assert kernel.flops(1, 8192, 3072) == 2 * 8192 * 3072
    # decode through M2's qkv: fp8 weight, 64 x 24 fp32 scales, one bf16 row in and out
    assert kernel.bytes_moved(1, 8192, 3072, 2) == 8192 * 3072 + 4 * 64 * 24 + 2 * (3072 + 8192)


def test_fp8_linear_backends_agree_and_quantise_on_load(kernel):
    block = (32, 32)
    dense = 0.05 * torch.randn(96, 80, generator=torch.Generator().manual_seed(8))
    layer = Fp8Linear.from_dense(dense, block)
    assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale_inv.shape == (3, 3)
    assert rel_err(layer.dequantized(), dense) < 0.05  # e4m3 keeps ~3 significant bits
    x = torch.randn(2, 5, 80, generator=torch.Generator().manual_seed(9)).half()
    assert layer.resolved_backend(x) == "torch"  # CPU tensors: the reference unless asked
    torch_out = layer(x)
    layer.backend = "triton"
    triton_out = layer(x)
    want = x.float() @ layer.dequantized().t()
    assert rel_err(triton_out, want) <= 1.1 * rel_err(torch_out, want) + 1e-4 and rel_err(triton_out, want) < 1e-3
    copy = Fp8Linear(80, 96, block)
    copy.load_(layer.weight, layer.weight_scale_inv)
    assert torch.equal(copy.weight.view(torch.uint8), layer.weight.view(torch.uint8))
    with pytest.raises(ValueError, match="expected fp8"):
        copy.load_(layer.weight, layer.weight_scale_inv[:2])


# ---- GPU: M2's attention shapes ----------------------------------------------------------------------
M2_QKV = (6144 + 2 * 1024, 3072)  # 48 q heads and 8 KV heads of 128, hidden 3072
M2_O = (3072, 6144)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 4096])
@pytest.mark.parametrize("shape", [M2_QKV, M2_O], ids=["qkv", "o_proj"])
def test_gpu_m2_attention_projections_bf16(kernel, T, shape):
    N, K = shape
    block = (128, 128)
    x, codes, scales = fp8_problem(T, N, K, block, torch.bfloat16, device="cuda", seed=T)
    kernel.fp8_block_linear(x, codes, scales, block)  # compile outside the no-sync check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises: the decode step must stay capturable
    try:
        got = kernel.fp8_block_linear(x, codes, scales, block)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = oracle(x, codes, scales, block)
    ref = kernel.fp8_block_linear_torch(x, codes, scales, block)
    assert got.dtype == torch.bfloat16 and got.shape == (T, N)
    assert rel_err(got, want) < 1e-2 and rel_err(got, want) <= 1.1 * rel_err(ref, want) + 1e-4
