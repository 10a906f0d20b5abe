"""FP8 (e4m3) weights with 128x128 block scales, as in the released MiniMax-M2 checkpoint.

Each quantized weight W [O, I] comes with `weight_scale_inv` S [ceil(O/bo), ceil(I/bi)]; the real weight is
W_fp8 * S blockwise (the scale "inverse" multiplies on dequantization).
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    return scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor,
                          block: tuple[int, int] = (128, 128), name: str = "weight") -> torch.Tensor:
    """fp32 weight from an fp8 weight and its per-block scales."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: FP8 block dequantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    expected = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"{name}_scale_inv has shape {tuple(scale_inv.shape)}, expected {expected} for a "
                         f"{rows}x{cols} weight in {block[0]}x{block[1]} blocks")
    return weight.float() * _expand(scale_inv.float(), (rows, cols), block)


def quantize_fp8_blocks(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, scale_inv) with each block scaled so its absolute max maps to FP8_MAX."""
    rows, cols = weight.shape
    nb_r, nb_c = math.ceil(rows / block[0]), math.ceil(cols / block[1])
    padded = torch.zeros(nb_r * block[0], nb_c * block[1], dtype=torch.float32, device=weight.device)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(nb_r, block[0], nb_c, block[1])
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / FP8_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(nb_r * block[0], nb_c * block[1])[:rows, :cols].contiguous(), scale_inv
