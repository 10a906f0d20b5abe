"""M2 attention: per-layer q/k RMSNorm over the whole projection, partial NeoX RoPE, GQA through SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from m2rl.model.config import M2Config
from m2rl.model.kv_cache import KVCache
from m2rl.model.norm import RMSNorm
from torch import nn


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
                kv_cache: KVCache | None = None, cache_start: int = 0) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q_BHTD = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k_BHTD = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v_BHTD = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = cos_sin
        q_BHTD, k_BHTD = apply_partial_rope(q_BHTD, cos, sin), apply_partial_rope(k_BHTD, cos, sin)
        if kv_cache is not None:
            k_BHTD, v_BHTD = kv_cache.write(self.layer_idx, cache_start, k_BHTD, v_BHTD)
        # mask None means plain causal over these T tokens (no padding, no cache): SDPA's fast path.
        out = F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, attn_mask=mask_B1TS,
                                             is_causal=mask_B1TS is None, enable_gqa=self.n_heads != self.n_kv)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
