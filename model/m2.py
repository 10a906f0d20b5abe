"""M2ForCausalLM: the MiniMax-M2 network, token ids in, logits out.

    x = embed(ids)
    per layer:  x = x + Attn(RMSNorm(x));  x = x + MoE(RMSNorm(x))
    logits = lm_head(RMSNorm(x))          # untied; optionally computed in fp32

Module names follow the checkpoint (`model.layers.L.block_sparse_moe...`) except that experts are stacked;
checkpoint.py maps between the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from m2rl.model.attention import Attention, PackedSegments, rope_cos_sin
from m2rl.model.config import M2Config
from m2rl.model.kv_cache import KVCache
from m2rl.model.moe import SparseMoE
from m2rl.model.norm import RMSNorm
from torch import nn
from torch.utils.checkpoint import checkpoint


class DecoderLayer(nn.Module):
    def __init__(self, config: M2Config, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.block_sparse_moe = SparseMoE(config)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
                kv_cache: KVCache | None = None, cache_start: int = 0,
                segments: PackedSegments | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, mask, kv_cache, cache_start, segments)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x))


class M2Model(nn.Module):
    def __init__(self, config: M2Config) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class M2ForCausalLM(nn.Module):
    def __init__(self, config: M2Config, lm_head_fp32: bool = False) -> None:
        super().__init__()
        self.config = config
        self.model = M2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head_fp32 = lm_head_fp32  # logits in fp32 even when the weights are bf16
        self.gradient_checkpointing = False  # recompute each layer in backward (learner memory)
        if self.lm_head.weight.device.type != "meta":  # load_pretrained builds on meta and fills from disk
            self.init_weights()

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def init_weights(self, std: float = 0.02, seed: int | None = None) -> M2ForCausalLM:
        """Random init (normal(0, std) matrices, unit norms, zero routing bias) on the current device;
        deterministic for a given seed and device."""
        gens: dict[torch.device, torch.Generator] = {}
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                    continue
                if p.device not in gens:
                    gens[p.device] = torch.Generator(device=p.device)
                    gens[p.device].manual_seed(0 if seed is None else seed)
                p.normal_(0.0, std, generator=gens[p.device])
            for name, b in self.named_buffers():
                b.zero_()
        return self

    # ---- forward ----------------------------------------------------------------------------------
    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                      kv_cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
                      check_ids: bool = True, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, D]. attention_mask [B, T] (1 real, 0 padding) may pad on
        either side; default positions count the real tokens before each one. check_ids=False skips the
        id range check (a host sync) for ids the sampler just produced.

        Packed input: `cu_seqlens` [S+1] (int, 0 ... N) splits input_ids [1, N] into S sequences laid end to
        end; each attends causally to its own tokens only and its positions restart at 0. No attention_mask,
        positions or kv_cache with it."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("input_ids has no tokens")
        vocab = self.config.vocab_size
        if check_ids and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ValueError(f"token ids out of range [0, {vocab}): min {int(input_ids.min())}, "
                             f"max {int(input_ids.max())}")
        device = input_ids.device
        token_mask = (torch.ones(B, T, dtype=torch.bool, device=device) if attention_mask is None
                      else attention_mask.to(device=device, dtype=torch.bool))
        if token_mask.shape != (B, T):
            raise ValueError(f"attention_mask shape {tuple(token_mask.shape)} != input_ids shape {(B, T)}")
        start = 0
        segments = None
        if cu_seqlens is not None:
            if B != 1 or attention_mask is not None or positions is not None or kv_cache is not None:
                raise ValueError("cu_seqlens takes input_ids [1, N] alone (no attention_mask, positions, kv_cache)")
            segments = PackedSegments.from_cu_seqlens(cu_seqlens, T, device)
            positions, mask = segments.positions(), None
        elif kv_cache is not None:
            seen = kv_cache.valid[:, :kv_cache.length].sum(1, keepdim=True)
            start, mask = kv_cache.begin(token_mask)
        else:
            seen = torch.zeros(B, 1, dtype=torch.long, device=device)
            mask = None if attention_mask is None or self._right_padded(token_mask) \
                else self._padded_causal_mask(token_mask)
        if positions is None:
            positions = seen + (token_mask.long().cumsum(1) - 1).clamp(min=0)
        x = self.model.embed_tokens(input_ids)
        cos_sin = rope_cos_sin(positions, self.config.rotary_dim, self.config.rope_theta, x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos_sin, mask, kv_cache, start, segments, use_reentrant=False)
            else:
                x = layer(x, cos_sin, mask, kv_cache, start, segments)
        if kv_cache is not None:
            kv_cache.commit(T)
        return self.model.norm(x)

    @staticmethod
    def _right_padded(token_mask_BT: torch.Tensor) -> bool:
        """Whether every row is real tokens then padding (the learner's batches, full rows included). Then
        plain causal attention is exact for every real token: its keys are all at or before it, so all real;
        only padding queries see padding. That keeps SDPA on its flash kernel, which takes no mask (one
        host sync for the check)."""
        return bool((token_mask_BT[:, 1:] <= token_mask_BT[:, :-1]).all())

    @staticmethod
    def _padded_causal_mask(token_mask_BT: torch.Tensor) -> torch.Tensor:
        T = token_mask_BT.shape[1]
        idx = torch.arange(T, device=token_mask_BT.device)
        allowed = (idx[None, :] <= idx[:, None])[None] & token_mask_BT[:, None, :]
        allowed |= (idx[None, :] == idx[:, None])[None]  # padding queries see themselves: no NaN rows
        return allowed[:, None]

    def logits(self, hidden: torch.Tensor, fp32: bool | None = None) -> torch.Tensor:
        if self.lm_head_fp32 if fp32 is None else fp32:
            return F.linear(hidden.float(), self.lm_head.weight.float())
        return self.lm_head(hidden)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, attention_mask: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, positions, kv_cache, attention_mask, cu_seqlens=cu_seqlens))

    def new_kv_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        c = self.config
        return KVCache.allocate(c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim,
                                dtype or self.dtype, self.device)
