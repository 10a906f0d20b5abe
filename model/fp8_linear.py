"""A bias-free linear layer whose weight stays in FP8 (e4m3) with block scales, the released checkpoint's format.

    weight            [out, in] float8_e4m3fn
    weight_scale_inv  [ceil(out/bn), ceil(in/bk)] fp32        real weight = weight * scale_inv, block by block

Inference only (buffers). Two implementations of one forward:
- CUDA with Triton, x in bf16/fp16 and power-of-two blocks >= 16: `m2rl.kernels.fp8_block_linear` reads the
  fp8 tiles and scales the partial products in registers; a decode step reads half the bf16 weight's bytes.
- elsewhere (CPU, fp32, odd blocks): the reference dequantises the weight, then F.linear.
The kernel module is imported on first CUDA use only, so CPU runs never import Triton from here (as
`ops.select_defaults` imports `m2rl.kernels` only on CUDA).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from types import ModuleType

import torch
import torch.nn.functional as F
from m2rl.model.fp8 import FP8_DTYPE, FP8_MAX, dequantize_fp8_blocks, quantize_fp8_blocks
from torch import nn


@functools.cache
def _kernel_module() -> ModuleType | None:
    if importlib.util.find_spec("triton") is None:
        return None
    return importlib.import_module("m2rl.kernels.fp8_block_linear")


class Fp8Linear(nn.Module):
    """y = x @ (weight * scale_inv)^T with the weight kept as fp8 codes and fp32 block scales."""

    weight: torch.Tensor  # [out, in] float8_e4m3fn
    weight_scale_inv: torch.Tensor  # [ceil(out/bn), ceil(in/bk)] fp32

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int] = (128, 128),
                 device: torch.device | str | None = None, backend: str = "auto") -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block = (int(block[0]), int(block[1]))
        self.backend = backend  # "auto": triton on CUDA when it can run, else torch; or force "triton" / "torch"
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device))
        scale_shape = (math.ceil(out_features / self.block[0]), math.ceil(in_features / self.block[1]))
        self.register_buffer("weight_scale_inv", torch.empty(scale_shape, dtype=torch.float32, device=device))

    @classmethod
    def from_dense(cls, weight: torch.Tensor, block: tuple[int, int] = (128, 128), backend: str = "auto") -> Fp8Linear:
        """Quantise a dense [out, in] weight (each block's absolute max maps to the fp8 maximum)."""
        layer = cls(weight.shape[1], weight.shape[0], block, weight.device, backend)
        layer.load_(weight)
        return layer

    @property
    def nbytes(self) -> int:
        """Bytes the forward reads of the weight: fp8 codes plus fp32 scales."""
        return self.weight.numel() * self.weight.element_size() + self.weight_scale_inv.numel() * 4

    # ---- filling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def load_(self, weight: torch.Tensor, scale_inv: torch.Tensor | None = None) -> None:
        """Fill from fp8 codes and their scales, or quantise a dense [out, in] weight (scale_inv None)."""
        if scale_inv is None:
            if tuple(weight.shape) != tuple(self.weight.shape):
                raise ValueError(f"expected a dense weight of shape {tuple(self.weight.shape)}, got {tuple(weight.shape)}")
            weight, scale_inv = quantize_fp8_blocks(weight.to(self.weight.device), self.block)
        if weight.dtype != FP8_DTYPE or weight.shape != self.weight.shape \
                or scale_inv.shape != self.weight_scale_inv.shape:
            raise ValueError(f"expected fp8 {tuple(self.weight.shape)} and scales {tuple(self.weight_scale_inv.shape)}, "
                             f"got {weight.dtype} {tuple(weight.shape)} and {tuple(scale_inv.shape)}")
        self.weight.copy_(weight)
        self.weight_scale_inv.copy_(scale_inv)

    @torch.no_grad()
    def random_(self, std: float = 0.02, seed: int = 0) -> Fp8Linear:
        """Weights ~ normal(0, std) clipped at 4 std, as codes with one scale 4*std/448 per block (the law of
        Fp8Experts.random_); generated on the buffers' device, deterministic for a given seed and device."""
        gen = torch.Generator(device=self.weight.device)
        gen.manual_seed(seed)
        codes = torch.randn(self.weight.shape, generator=gen, device=self.weight.device, dtype=torch.bfloat16)
        self.weight.copy_(codes.mul_(FP8_MAX / 4).clamp_(-FP8_MAX, FP8_MAX))
        self.weight_scale_inv.fill_(4 * std / FP8_MAX)
        return self

    # ---- forward ----------------------------------------------------------------------------------
    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The real [out, in] weight in `dtype` (product in fp32)."""
        return dequantize_fp8_blocks(self.weight, self.weight_scale_inv, self.block).to(dtype)

    def resolved_backend(self, x: torch.Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)):
            return "torch"
        kernels = _kernel_module()
        return "triton" if kernels is not None and kernels.blocks_supported(self.block) else "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resolved_backend(x) == "triton":
            kernels = _kernel_module()
            assert kernels is not None, "the triton backend needs triton"
            return kernels.fp8_block_linear(x, self.weight, self.weight_scale_inv, self.block)
        return F.linear(x, self.dequantized(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}"
