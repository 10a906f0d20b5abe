"""M2 attention: per-layer q/k RMSNorm over the whole projection, partial NeoX RoPE, GQA through SDPA.

Packed input (`PackedSegments`): S sequences concatenated into one row of N tokens, attention causal
within each sequence and never across. Two exact implementations:
- per-segment SDPA with is_causal (CPU, and the fallback everywhere): sum(L_s^2) work and memory, no N x N
  mask. A block-diagonal [N, N] boolean mask would be the same math, but SDPA then computes every masked
  block: on 2 CPU cores, 37 segments of N = 16K tokens (tiny M2 shapes) take 30 s forward+backward through
  the mask, 1.1 s segment by segment, 1.5 s padded;
- FlexAttention with a document block mask on CUDA (compiled once per process, dynamic shapes; masked
  blocks are skipped, one kernel per layer). A compile or run failure logs once and falls back to SDPA.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from m2rl.model import ops
from m2rl.model.config import M2Config
from m2rl.model.kv_cache import KVCache
from m2rl.model.norm import RMSNorm
from torch import nn

log = logging.getLogger(__name__)

USE_FLEX_ATTENTION = True  # on CUDA; False: packed attention runs segment by segment through SDPA


def rope_cos_sin(positions_BT: torch.Tensor, rotary_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, T, rotary_dim] in NeoX layout (frequencies repeated in two halves), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32,
                                             device=positions_BT.device) / rotary_dim))
    freqs = positions_BT[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_partial_rope(x_BHTD: torch.Tensor, cos_BTR: torch.Tensor, sin_BTR: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of each head ("rotate half" pairs i and i + R/2); the rest pass through."""
    r = cos_BTR.shape[-1]
    x_rot, x_pass = x_BHTD[..., :r], x_BHTD[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2:]
    rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = cos_BTR[:, None], sin_BTR[:, None]
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


@dataclass(frozen=True)
class PackedSegments:
    """S sequences packed into one row of N tokens: segment s is tokens [cu_seqlens[s], cu_seqlens[s+1]).

    Built once per forward and shared by every layer (`from_cu_seqlens`: one host sync)."""

    cu_seqlens: torch.Tensor  # [S+1] int32: 0, end of segment 0, ..., N (the flash-attn varlen convention)
    lengths: tuple[int, ...]  # host copy of the S segment lengths (SDPA splits by it, no sync per layer)
    block_mask: Any = None  # FlexAttention BlockMask of the document mask, on CUDA; None: SDPA per segment

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, n_tokens: int, device: torch.device) -> PackedSegments:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype.is_floating_point:
            raise ValueError(f"cu_seqlens must be an integer [segments + 1] tensor, got {cu_seqlens.dtype} "
                             f"{tuple(cu_seqlens.shape)}")
        bounds = [int(b) for b in cu_seqlens.tolist()]
        lengths = tuple(b - a for a, b in itertools.pairwise(bounds))
        if bounds[0] != 0 or bounds[-1] != n_tokens or min(lengths) < 0:
            raise ValueError(f"cu_seqlens must rise from 0 to the {n_tokens} packed tokens, got {bounds}")
        cu = cu_seqlens.to(device=device, dtype=torch.int32)
        segments = cls(cu, lengths)
        if device.type == "cuda" and USE_FLEX_ATTENTION and _flex_attention() is not None:
            return cls(cu, lengths, _document_block_mask(segments.segment_ids(), device))
        return segments

    def segment_ids(self) -> torch.Tensor:
        """[N] long: the segment of each packed token."""
        device = self.cu_seqlens.device
        lengths = torch.tensor(self.lengths, device=device)
        # output_size: the total is known on the host, so CUDA needs no sync to size the result
        return torch.repeat_interleave(torch.arange(len(self.lengths), device=device), lengths,
                                       output_size=sum(self.lengths))

    def positions(self) -> torch.Tensor:
        """[1, N] long: each token's position inside its own segment (RoPE restarts at 0 per segment)."""
        seg_N = self.segment_ids()
        n = seg_N.numel()
        return (torch.arange(n, device=seg_N.device) - self.cu_seqlens.long()[seg_N])[None]


def packed_attention(q_1HND: torch.Tensor, k_1HND: torch.Tensor, v_1HND: torch.Tensor, segments: PackedSegments,
                     enable_gqa: bool) -> torch.Tensor:
    """Causal attention within each packed segment, [1, H, N, D]."""
    if segments.block_mask is not None:
        flex = _flex_attention()
        # A lowering failure is specific to its shapes and device (e.g. a head size Triton's templates do
        # not take): only that kind of call falls back, the others keep FlexAttention.
        kind = (q_1HND.shape[1], k_1HND.shape[1], q_1HND.shape[-1], q_1HND.dtype, q_1HND.device)
        if flex is not None and kind not in _FLEX_FAILED:
            try:
                return flex(q_1HND, k_1HND, v_1HND, block_mask=segments.block_mask, enable_gqa=enable_gqa)
            except Exception as err:  # noqa: BLE001 - any compile/lowering failure: the exact path below
                _FLEX_FAILED.add(kind)
                log.warning("packed attention: FlexAttention failed for heads %d/%d of %d, %s on %s (%s: %s); "
                            "those calls use SDPA per segment", *kind, type(err).__name__, str(err)[:500])
    # split's backward is one cat of the gradients (slicing would allocate a full-size gradient per segment)
    outs = []
    for q, k, v in zip(q_1HND.split(segments.lengths, 2), k_1HND.split(segments.lengths, 2),
                       v_1HND.split(segments.lengths, 2)):
        if q.shape[2] == 0:
            outs.append(q)
            continue
        outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=enable_gqa))
    return torch.cat(outs, dim=2)


_FLEX: dict[str, Callable[..., torch.Tensor] | None] = {}
_FLEX_FAILED: set[tuple[Any, ...]] = set()  # (q heads, kv heads, head dim, dtype, device) that failed to lower


def _flex_attention() -> Callable[..., torch.Tensor] | None:
    """flex_attention compiled once per process (dynamic shapes: one graph for every packed length)."""
    if "fn" not in _FLEX:
        try:
            from torch.nn.attention.flex_attention import flex_attention
            _FLEX["fn"] = torch.compile(flex_attention, dynamic=True)
        except Exception as err:  # noqa: BLE001 - an old torch or no compiler: SDPA per segment
            _disable_flex(err)
    return _FLEX["fn"]


def _disable_flex(err: BaseException) -> None:
    log.warning("packed attention: FlexAttention unavailable (%s: %s); using SDPA per segment",
                type(err).__name__, err)
    _FLEX["fn"] = None


def _document_block_mask(seg_N: torch.Tensor, device: torch.device) -> Any:
    from torch.nn.attention.flex_attention import create_block_mask

    def causal_same_segment(b, h, q_idx, kv_idx):  # FlexAttention's mask_mod signature
        return (seg_N[q_idx] == seg_N[kv_idx]) & (kv_idx <= q_idx)

    n = seg_N.numel()
    try:
        # _compile: builds the block mask without materialising the [N, N] boolean mask
        return create_block_mask(causal_same_segment, None, None, n, n, device=device, _compile=True)
    except Exception as err:  # noqa: BLE001
        _disable_flex(err)
        return None


class Attention(nn.Module):
    def __init__(self, config: M2Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.rotary_dim, self.rope_theta = config.rotary_dim, config.rope_theta
        h = config.hidden_size
        self.q_proj = nn.Linear(h, config.q_dim, bias=False)
        self.k_proj = nn.Linear(h, config.kv_dim, bias=False)
        self.v_proj = nn.Linear(h, config.kv_dim, bias=False)
        self.o_proj = nn.Linear(config.q_dim, h, bias=False)
        self.use_qk_norm = config.use_qk_norm
        if config.use_qk_norm:  # "per_layer": one norm over all heads together, before the split
            self.q_norm = RMSNorm(config.q_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.kv_dim, config.rms_norm_eps)

    def forward(self, x_BTD: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], mask_B1TS: torch.Tensor | None,
                kv_cache: KVCache | None = None, cache_start: int = 0,
                segments: PackedSegments | None = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        cos, sin = cos_sin
        if self.use_qk_norm:  # norms, head split and RoPE in one op: kernels/rope.py fuses them
            q_BHTD, k_BHTD = ops.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps,
                                              cos, sin, self.n_heads, self.n_kv)
        else:
            q_BHTD = apply_partial_rope(q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
            k_BHTD = apply_partial_rope(k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2), cos, sin)
        v_BHTD = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k_BHTD, v_BHTD = kv_cache.write(self.layer_idx, cache_start, k_BHTD, v_BHTD)
        if segments is not None:  # packed: B == 1, causal within each segment (no mask, no cache)
            out = packed_attention(q_BHTD, k_BHTD, v_BHTD, segments, enable_gqa=self.n_heads != self.n_kv)
        else:
            # mask None means plain causal over these T tokens (no padding, no cache): SDPA's fast path.
            out = F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, attn_mask=mask_B1TS,
                                                 is_causal=mask_B1TS is None, enable_gqa=self.n_heads != self.n_kv)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
