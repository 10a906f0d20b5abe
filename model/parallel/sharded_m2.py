"""ShardedM2: MiniMax-M2 inference across the GPUs of one host (expert parallel MoE, head-parallel attention).

Every rank holds the whole residual stream x [B, T, D]; per layer:

    h = RMSNorm(x)                                          replicated
    q, k, v = h @ Wqkv_r^T                                  rank r's q heads and KV heads (M2 on 2 ranks: 24 / 4)
    q = g_q,r * q * rsqrt(allreduce(sum q^2) / (Hq*Dh) + eps)   M2's q/k norm spans ALL heads ("per_layer"):
    k = (same, over the KV heads)                              the sums of squares of q and k are all-reduced
                                                               together ([B, T, 2] fp32), then each rank normalises
    partial NeoX RoPE; attention over rank r's heads (GQA: its q heads read only its KV heads)
    x = x + allreduce(o_r @ Wo_r^T)                          row-parallel o_proj
    h = RMSNorm(x); weights, experts = route(h @ Wg^T)       fp32 router, replicated: every rank routes every token
    x = x + allreduce(sum over rank r's experts)             expert r*E/W .. (r+1)*E/W - 1; other slots weigh 0
    logits = RMSNorm(x) @ W_lm,r^T                           vocab-parallel lm_head (rank r: rows r*V/W ..)

Choices, and why:
- MoE by all-reduce rather than all-to-all dispatch: attention TP already leaves every token on every rank,
  so routing is free and the only traffic is one [T, D] all-reduce per layer (393 KB at T=64, bf16) —
  nothing beside the 1.8 GB of expert weights a layer's decode step can touch. All-to-all pays off at
  large prefill batches, not in decode.
- Vocab-parallel lm_head (not replicated): halves the 1.2 GB the head reads every step on 2 ranks.
  Greedy decoding all-reduces only each shard's (max, argmax) per row; `forward` (tests, full logits)
  gathers the shards.
- Every gather is an all-reduce of zero-filled slots: one collective kind, supported by gloo (CPU tests) and
  by NCCL inside CUDA graphs.
- Embedding replicated in the model dtype (a lookup reads B rows; only memory is spent). When the config has
  a quantization_config, experts (fp8_experts.py) and the attention projections (model/fp8_linear.py: 1.4 GB
  per rank at full M2 on 2 ranks instead of 2.7 GB in bf16, and half the bytes a decode step reads) stay in
  FP8 with their block scales; else both are dense in the model dtype. A rank's head slice of q/k/v (and
  o_proj's columns) must start and end on scale-block boundaries: the loader refuses a cut block.
- Decode feeds one token per row to equal-length prompts (no padding): the step has fixed shapes and no
  host sync (KV slot and mask from a device position), so it is captured in a CUDA graph when asked.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from m2rl.model import ops
from m2rl.model.attention import apply_partial_rope, rope_cos_sin
from m2rl.model.config import M2Config
from m2rl.model.fp8 import quantize_fp8_blocks
from m2rl.model.fp8_linear import Fp8Linear
from m2rl.model.parallel.fp8_experts import DenseExperts, Fp8Experts, fp8_expert_bytes
from m2rl.model.parallel.layout import ShardLayout, localize_experts
from m2rl.model.router import route
from torch import nn


def all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None, world: int) -> torch.Tensor:
    """In-place sum over the ranks (no-op on one rank)."""
    if world > 1:
        dist.all_reduce(t, group=group)
    return t


def gather_shards(shard: torch.Tensor, rank: int, world: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """[W, *shard.shape]: every rank's shard, by an all-reduce of zeros holding this rank's shard in its slot."""
    out = torch.zeros((world, *shard.shape), dtype=shard.dtype, device=shard.device)
    out[rank] = shard
    return all_reduce(out, group, world)


@dataclass
class ShardKVCache:
    """This rank's KV heads for every layer; slot s holds the token at position s (prompts are unpadded)."""

    k: torch.Tensor  # [L, B, Hkv_r, S, Dh]
    v: torch.Tensor  # [L, B, Hkv_r, S, Dh]

    @classmethod
    def allocate(cls, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> ShardKVCache:
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]


class TPAttention(nn.Module):
    def __init__(self, config: M2Config, layout: ShardLayout, group: dist.ProcessGroup | None,
                 dtype: torch.dtype, device: torch.device | str, fp8_block: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.group, self.rank, self.world = group, layout.rank, layout.world
        self.n_q, self.n_kv, self.head_dim = len(layout.q_heads), len(layout.kv_heads), config.head_dim
        self.q_dim_full, self.kv_dim_full = config.q_dim, config.kv_dim
        self.eps, self.use_qk_norm = config.rms_norm_eps, config.use_qk_norm
        q, kv, d = self.n_q * self.head_dim, self.n_kv * self.head_dim, config.hidden_size
        # [q_r; k_r; v_r] x D and D x q_r: dense buffers, or fp8 codes + block scales (read as fp8 by the GEMM)
        self.qkv_proj: torch.Tensor | Fp8Linear
        self.o_proj: torch.Tensor | Fp8Linear
        if fp8_block is None:
            self.register_buffer("qkv_proj", torch.empty(q + 2 * kv, d, dtype=dtype, device=device))
            self.register_buffer("o_proj", torch.empty(d, q, dtype=dtype, device=device))
        else:
            self.qkv_proj = Fp8Linear(d, q + 2 * kv, fp8_block, device)
            self.o_proj = Fp8Linear(q, d, fp8_block, device)
        self.register_buffer("q_norm", torch.ones(q, dtype=dtype, device=device))
        self.register_buffer("k_norm", torch.ones(kv, dtype=dtype, device=device))

    def qk_norm(self, q_BTQ: torch.Tensor, k_BTK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm over the whole (all-rank) q and k projections; the same math as ops.rms_norm_torch."""
        q32, k32 = q_BTQ.float(), k_BTK.float()
        sumsq_BT2 = torch.stack((q32.pow(2).sum(-1), k32.pow(2).sum(-1)), dim=-1)
        all_reduce(sumsq_BT2, self.group, self.world)
        q_normed = q32 * torch.rsqrt(sumsq_BT2[..., :1] / self.q_dim_full + self.eps)
        k_normed = k32 * torch.rsqrt(sumsq_BT2[..., 1:] / self.kv_dim_full + self.eps)
        return self.q_norm * q_normed.to(q_BTQ.dtype), self.k_norm * k_normed.to(k_BTK.dtype)

    def forward(self, x_BTD: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], layer: int,
                cache: ShardKVCache | None, decode_pos: torch.Tensor | None) -> torch.Tensor:
        """Prefill (decode_pos None): T tokens at positions 0..T-1, causal, written to cache slots [0, T).
        Decode: one token per row at slot decode_pos (0-dim device tensor), attending to slots <= it."""
        B, T, _ = x_BTD.shape
        Dh, q_dim, kv_dim = self.head_dim, self.n_q * self.head_dim, self.n_kv * self.head_dim
        q, k, v = _project(x_BTD, self.qkv_proj).split((q_dim, kv_dim, kv_dim), dim=-1)
        if self.use_qk_norm:
            q, k = self.qk_norm(q, k)
        q_BHTD = q.reshape(B, T, self.n_q, Dh).transpose(1, 2)
        k_BHTD = k.reshape(B, T, self.n_kv, Dh).transpose(1, 2)
        v_BHTD = v.reshape(B, T, self.n_kv, Dh).transpose(1, 2)
        cos, sin = cos_sin
        q_BHTD, k_BHTD = apply_partial_rope(q_BHTD, cos, sin), apply_partial_rope(k_BHTD, cos, sin)
        group = self.n_q // self.n_kv
        if decode_pos is None:
            if cache is not None:
                cache.k[layer, :, :, :T] = k_BHTD
                cache.v[layer, :, :, :T] = v_BHTD
            # T is a prompt: repeating the KV heads is cheap and runs on every SDPA backend.
            out_BHTD = F.scaled_dot_product_attention(q_BHTD, k_BHTD.repeat_interleave(group, 1),
                                                      v_BHTD.repeat_interleave(group, 1), is_causal=True)
            out_BTQ = out_BHTD.transpose(1, 2).reshape(B, T, q_dim)
        else:
            assert cache is not None and T == 1, "decode takes one token per row and a KV cache"
            slot = decode_pos.reshape(1)
            cache.k[layer].index_copy_(2, slot, k_BHTD)
            cache.v[layer].index_copy_(2, slot, v_BHTD)
            # q head h reads KV head h // group: the group's queries become SDPA's query axis, so K/V are read
            # once per KV head and never repeated. Slots past the position are masked (fixed shapes).
            q_BKGD = q_BHTD.reshape(B, self.n_kv, group, Dh)
            visible_S = torch.arange(cache.capacity, device=x_BTD.device) <= decode_pos
            out_BKGD = F.scaled_dot_product_attention(q_BKGD, cache.k[layer], cache.v[layer],
                                                      attn_mask=visible_S[None, None, None, :])
            out_BTQ = out_BKGD.reshape(B, 1, q_dim)
        return all_reduce(_project(out_BTQ, self.o_proj), self.group, self.world)


def _project(x: torch.Tensor, weight: torch.Tensor | Fp8Linear) -> torch.Tensor:
    return weight(x) if isinstance(weight, Fp8Linear) else F.linear(x, weight)


class EPMoE(nn.Module):
    def __init__(self, config: M2Config, layout: ShardLayout, group: dist.ProcessGroup | None,
                 dtype: torch.dtype, device: torch.device | str, fp8_block: tuple[int, int] | None,
                 moe_backend: str) -> None:
        super().__init__()
        self.group, self.world = group, layout.world
        self.top_k, self.scoring_func = config.num_experts_per_tok, config.scoring_func
        self.first_expert, self.num_local = layout.experts.start, len(layout.experts)
        E, D, I = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.register_buffer("gate_weight", torch.empty(E, D, dtype=torch.float32, device=device))
        self.e_score_correction_bias: torch.Tensor | None
        if config.use_routing_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32, device=device))
        else:
            self.e_score_correction_bias = None
        self.experts: Fp8Experts | DenseExperts = (
            DenseExperts(self.num_local, D, I, dtype, device) if fp8_block is None
            else Fp8Experts(self.num_local, D, I, fp8_block, device, moe_backend))
        self.hits: torch.Tensor | None = None  # distinct local experts hit, summed over calls, when counting

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        logits_TE = F.linear(x_TD.float(), self.gate_weight)
        weights_TK, experts_TK = route(logits_TE, self.e_score_correction_bias, self.top_k, self.scoring_func)
        local_TK = localize_experts(experts_TK, self.first_expert, self.num_local)
        if self.hits is not None:
            hit_E = torch.zeros(self.num_local + 1, device=x_TD.device)
            hit_E.scatter_(0, torch.where(local_TK >= 0, local_TK, self.num_local).reshape(-1), 1.0)
            self.hits += hit_E[:-1].sum()
        y_TD = self.experts(x_TD, local_TK, weights_TK)
        return all_reduce(y_TD, self.group, self.world).view_as(x_BTD)


class ShardedLayer(nn.Module):
    def __init__(self, config: M2Config, layout: ShardLayout, group: dist.ProcessGroup | None, dtype: torch.dtype,
                 device: torch.device | str, fp8_block: tuple[int, int] | None, moe_backend: str) -> None:
        super().__init__()
        self.eps = config.rms_norm_eps
        self.register_buffer("input_layernorm", torch.ones(config.hidden_size, dtype=dtype, device=device))
        self.self_attn = TPAttention(config, layout, group, dtype, device, fp8_block)
        self.register_buffer("post_attention_layernorm", torch.ones(config.hidden_size, dtype=dtype, device=device))
        self.block_sparse_moe = EPMoE(config, layout, group, dtype, device, fp8_block, moe_backend)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], layer: int,
                cache: ShardKVCache | None, decode_pos: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(ops.rms_norm(x, self.input_layernorm, self.eps), cos_sin, layer, cache, decode_pos)
        return x + self.block_sparse_moe(ops.rms_norm(x, self.post_attention_layernorm, self.eps))


@dataclass
class GreedyOutput:
    ids: torch.Tensor  # [B, new_tokens] generated ids (the first from the prefill)
    prefill_s: float  # prompt forward and first token, device-synchronised
    decode_s: float  # the new_tokens - 1 decode steps (graph capture excluded)
    cuda_graph: bool


class ShardedM2(nn.Module):
    """One rank's share of an M2 model; build it on every rank of `group` with the same config and seed."""

    def __init__(self, config: M2Config, rank: int = 0, world: int = 1, group: dist.ProcessGroup | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                 moe_backend: str = "auto") -> None:
        super().__init__()
        self.config, self.group, self.dtype = config, group, dtype
        self.layout = ShardLayout.build(config, rank, world)
        q = config.quantization_config
        self.fp8_block = None if q is None else tuple(q.get("weight_block_size", (128, 128)))
        D, Vs = config.hidden_size, self.layout.vocab_shard_size
        # torch.empty on the rank's device: nothing is materialised elsewhere; fill with init_random_ or load.
        self.register_buffer("embed_tokens", torch.empty(config.vocab_size, D, dtype=dtype, device=device))
        self.layers = nn.ModuleList(ShardedLayer(config, self.layout, group, dtype, device, self.fp8_block, moe_backend)
                                    for _ in range(config.num_hidden_layers))
        self.register_buffer("norm", torch.ones(D, dtype=dtype, device=device))
        self.register_buffer("lm_head", torch.zeros(Vs, D, dtype=dtype, device=device))

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def device(self) -> torch.device:
        return self.lm_head.device

    # ---- weights ----------------------------------------------------------------------------------
    @torch.no_grad()
    def init_random_(self, seed: int = 0, std: float = 0.02) -> ShardedM2:
        """normal(0, std) matrices, unit norms, zero routing bias, generated on the device. Replicated tensors
        (embedding, norms, router) get the same values on every rank; sharded ones (attention, experts,
        lm_head) differ per rank. Deterministic for a given (seed, rank, world, device)."""
        filled = set()  # buffers of modules that fill themselves (their own law for fp8 codes and scales)
        for name, module in self.named_modules():
            if isinstance(module, (Fp8Experts, DenseExperts, Fp8Linear)):
                module.random_(std, seed=_seed_for(seed, name, self.rank))  # all sharded: rank-dependent
                filled |= {f"{name}.{b}" for b, _ in module.named_buffers()}
        for name, buf in self.named_buffers():
            if name in filled:
                continue
            if name.endswith("norm"):  # every RMSNorm weight: norm, *_layernorm, q_norm, k_norm
                buf.fill_(1.0)
            elif name.endswith("e_score_correction_bias"):
                buf.zero_()
            else:
                sharded = ".self_attn." in name or name == "lm_head"
                gen = torch.Generator(device=buf.device)
                gen.manual_seed(_seed_for(seed, name, self.rank if sharded else -1))
                buf.normal_(0.0, std, generator=gen)
        self._zero_lm_head_padding()
        return self

    def _zero_lm_head_padding(self) -> None:
        self.lm_head[len(self.layout.vocab):].zero_()

    @classmethod
    @torch.no_grad()
    def from_full_state_dict(cls, state: dict[str, torch.Tensor], config: M2Config, rank: int = 0, world: int = 1,
                             group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu",
                             dtype: torch.dtype = torch.bfloat16, moe_backend: str = "auto") -> ShardedM2:
        """This rank's slices of an M2ForCausalLM state dict (tests and small models: the dict is whole).
        With FP8 experts, `...experts.w1` may be fp8 codes with `...experts.w1_scale_inv` beside them, and
        `...self_attn.q_proj.weight` (k, v, o) codes with `...weight_scale_inv`; dense weights are quantised on
        load (attention: the whole matrix, then sliced, so every world size holds the same codes)."""
        model = cls(config, rank, world, group, device, dtype, moe_backend)
        lay, Dh = model.layout, config.head_dim
        q_rows, kv_rows = lay.q_rows(Dh), lay.kv_rows(Dh)
        model.embed_tokens.copy_(state["model.embed_tokens.weight"])
        model.norm.copy_(state["model.norm.weight"])
        model.lm_head[:len(lay.vocab)].copy_(state["lm_head.weight"][lay.vocab.start:lay.vocab.stop])
        for i, layer in enumerate(model.layers):
            p = f"model.layers.{i}."
            layer.input_layernorm.copy_(state[p + "input_layernorm.weight"])
            layer.post_attention_layernorm.copy_(state[p + "post_attention_layernorm.weight"])
            attn = layer.self_attn
            if isinstance(attn.qkv_proj, Fp8Linear) and isinstance(attn.o_proj, Fp8Linear):
                _load_fp8_attention(attn.qkv_proj, attn.o_proj, state, p + "self_attn.", q_rows, kv_rows)
            else:
                attn.qkv_proj.copy_(torch.cat((state[p + "self_attn.q_proj.weight"][q_rows],
                                               state[p + "self_attn.k_proj.weight"][kv_rows],
                                               state[p + "self_attn.v_proj.weight"][kv_rows])))
                attn.o_proj.copy_(state[p + "self_attn.o_proj.weight"][:, q_rows])
            if config.use_qk_norm:
                attn.q_norm.copy_(state[p + "self_attn.q_norm.weight"][q_rows])
                attn.k_norm.copy_(state[p + "self_attn.k_norm.weight"][kv_rows])
            moe = layer.block_sparse_moe
            moe.gate_weight.copy_(state[p + "block_sparse_moe.gate.weight"])
            if moe.e_score_correction_bias is not None:
                moe.e_score_correction_bias.copy_(state[p + "block_sparse_moe.gate.e_score_correction_bias"])
            mine = slice(lay.experts.start, lay.experts.stop)
            for name in ("w1", "w3", "w2"):
                key = p + f"block_sparse_moe.experts.{name}"
                scale = state.get(key + "_scale_inv")
                if isinstance(moe.experts, Fp8Experts):
                    moe.experts.load_(name, state[key][mine], None if scale is None else scale[mine])
                else:
                    moe.experts.load_(name, state[key][mine])
        return model

    # ---- forward ----------------------------------------------------------------------------------
    def hidden_states(self, ids_BT: torch.Tensor, cache: ShardKVCache | None = None,
                      decode_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [B, T, D]: a prompt at positions 0..T-1, or one token at decode_pos."""
        B, T = ids_BT.shape
        if decode_pos is None:
            positions_BT = torch.arange(T, device=ids_BT.device).expand(B, T)
        else:
            positions_BT = decode_pos.reshape(1, 1).expand(B, 1)
        x = F.embedding(ids_BT, self.embed_tokens)
        cos_sin = rope_cos_sin(positions_BT, self.config.rotary_dim, self.config.rope_theta, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos_sin, i, cache, decode_pos)
        return ops.rms_norm(x, self.norm, self.config.rms_norm_eps)

    def shard_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., vocab_shard_size] fp32 logits of this rank's vocab rows; padding rows are -inf."""
        logits = F.linear(hidden, self.lm_head).float()
        n_real = len(self.layout.vocab)
        if n_real < self.layout.vocab_shard_size:
            logits[..., n_real:] = float("-inf")
        return logits

    @torch.no_grad()
    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """Full fp32 logits [B, T, V] on every rank (causal over the T tokens, no cache)."""
        shards_WBTV = gather_shards(self.shard_logits(self.hidden_states(ids_BT)), self.rank, self.world, self.group)
        B, T = ids_BT.shape
        return shards_WBTV.permute(1, 2, 0, 3).reshape(B, T, -1)[..., :self.config.vocab_size]

    def greedy_ids(self, hidden_BD: torch.Tensor) -> torch.Tensor:
        """argmax over the whole vocabulary [B] (first index on ties) from each shard's (max, argmax)."""
        logits_BV = self.shard_logits(hidden_BD)
        idx_B = logits_BV.argmax(-1)
        best_B = logits_BV.gather(-1, idx_B[:, None])[:, 0]
        # Ids < 2^24 are exact in fp32: one all-reduce carries both.
        mine_B2 = torch.stack((best_B, (idx_B + self.layout.vocab.start).float()), dim=-1)
        all_W_B2 = gather_shards(mine_B2, self.rank, self.world, self.group)
        winner_B = all_W_B2[..., 0].argmax(0)  # lowest rank among equal maxima = lowest id
        return all_W_B2[..., 1].gather(0, winner_B[None])[0].long()

    # ---- generation -------------------------------------------------------------------------------
    def new_kv_cache(self, batch: int, max_len: int) -> ShardKVCache:
        c = self.config
        return ShardKVCache.allocate(c.num_hidden_layers, batch, len(self.layout.kv_heads), max_len, c.head_dim,
                                     self.dtype, self.device)

    @torch.no_grad()
    def prefill(self, ids_BT: torch.Tensor, cache: ShardKVCache) -> torch.Tensor:
        return self.greedy_ids(self.hidden_states(ids_BT, cache)[:, -1])

    @torch.no_grad()
    def decode_step(self, ids_B: torch.Tensor, pos: torch.Tensor, cache: ShardKVCache) -> torch.Tensor:
        """Feed ids_B at position pos (0-dim long tensor on the device); returns the next greedy ids [B]."""
        return self.greedy_ids(self.hidden_states(ids_B[:, None], cache, decode_pos=pos)[:, 0])

    def count_expert_hits(self, enabled: bool) -> None:
        """Start (zeroed) or stop counting, per layer, the distinct local experts each forward routes to."""
        for layer in self.layers:
            layer.block_sparse_moe.hits = torch.zeros((), device=self.device) if enabled else None

    def expert_hits(self) -> list[float]:
        return [float(layer.block_sparse_moe.hits) for layer in self.layers]

    @torch.no_grad()
    def generate_greedy(self, prompt_ids: torch.Tensor, new_tokens: int, cuda_graph: bool = False) -> GreedyOutput:
        """Greedy continuation of equal-length prompts [B, P] (same on every rank): ids [B, new_tokens].
        cuda_graph captures the decode step once (every rank must ask for it alike)."""
        B, P = prompt_ids.shape
        if new_tokens < 1:
            raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
        if int(prompt_ids.min()) < 0 or int(prompt_ids.max()) >= self.config.vocab_size:
            raise ValueError(f"prompt ids out of range [0, {self.config.vocab_size})")
        ids_BP = prompt_ids.to(self.device)
        cache = self.new_kv_cache(B, P + new_tokens)
        out_BN = torch.empty(B, new_tokens, dtype=torch.long, device=self.device)
        t0 = _synced_time(self.device)
        out_BN[:, 0] = self.prefill(ids_BP, cache)
        prefill_s = _synced_time(self.device) - t0
        pos = torch.tensor(P, device=self.device)
        if cuda_graph and new_tokens > 1:
            step = _DecodeGraph(self, cache, out_BN[:, 0], pos)
            t1 = _synced_time(self.device)  # the capture (and its warm-up steps) is not decode time
            for i in range(1, new_tokens):
                out_BN[:, i] = step.replay()
        else:
            t1 = _synced_time(self.device)
            for i in range(1, new_tokens):
                out_BN[:, i] = self.decode_step(out_BN[:, i - 1], pos, cache)
                pos += 1
        decode_s = _synced_time(self.device) - t1
        return GreedyOutput(out_BN, prefill_s, decode_s, cuda_graph and new_tokens > 1)

    # ---- accounting -------------------------------------------------------------------------------
    def decode_step_bytes(self, batch: int, context: float, experts_hit: float) -> dict[str, float]:
        """Bytes one decode step must read on this rank (the roofline's numerator), by kind. `context`: KV
        slots a token attends to (mean over the steps); `experts_hit`: distinct local experts routed to,
        summed over the layers. The step reads the whole KV capacity (masked), up to P+N slots: counted
        here is only the context it needs."""
        c, L, elt = self.config, self.config.num_hidden_layers, self.embed_tokens.element_size()
        attn = self.layers[0].self_attn
        # projections: bf16 buffers, or fp8 codes + fp32 scales (Fp8Linear.nbytes), as the GEMM reads them
        per_layer = attn.qkv_proj.nbytes + attn.o_proj.nbytes + \
            (attn.q_norm.numel() + attn.k_norm.numel() + 2 * c.hidden_size) * elt
        router = c.num_local_experts * (c.hidden_size + 1) * 4
        if self.fp8_block is not None:
            expert = fp8_expert_bytes(c.hidden_size, c.intermediate_size, self.fp8_block)
        else:
            expert = 3 * c.hidden_size * c.intermediate_size * elt
        return {
            "experts": experts_hit * expert,
            "attention_weights": L * per_layer,
            "router": L * router,
            "kv_cache": batch * context * L * 2 * len(self.layout.kv_heads) * c.head_dim * elt,
            "lm_head": self.lm_head.numel() * elt + c.hidden_size * elt,
            "embedding_rows": batch * c.hidden_size * elt,
        }


class _DecodeGraph:
    """The decode step captured once on static inputs; each replay feeds the last ids and advances the
    position on the device, so the host only launches the graph."""

    def __init__(self, model: ShardedM2, cache: ShardKVCache, first_ids_B: torch.Tensor, pos: torch.Tensor) -> None:
        self.ids_B = first_ids_B.clone()
        self.pos = pos.clone()
        # Warm-up (compiles kernels, initialises collectives) re-runs the first real step: it writes the same
        # K/V into slot pos that the first replay writes again.
        side = torch.cuda.Stream(device=model.device)
        side.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                model.decode_step(self.ids_B, self.pos, cache)
        torch.cuda.current_stream(model.device).wait_stream(side)
        torch.cuda.synchronize(model.device)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the NCCL watchdog thread may query events while this thread captures.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            next_B = model.decode_step(self.ids_B, self.pos, cache)
            self.ids_B.copy_(next_B)
            self.pos.add_(1)

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.ids_B


def _fp8_weight(state: dict[str, torch.Tensor], key: str, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 codes, scale_inv) of `key`: as stored, or the dense weight quantised whole."""
    scale = state.get(key + "_scale_inv")
    return (state[key], scale) if scale is not None else quantize_fp8_blocks(state[key], block)


def _block_slice(rows: slice, total: int, side: int, name: str, tail_ok: bool) -> slice:
    """The blocks (of `side` rows or columns) that `rows` covers; ValueError if a shard boundary cuts one.
    tail_ok: the slice may end in the matrix's last, partial block (nothing is concatenated after it)."""
    start, stop = rows.start, rows.stop
    stop_ok = stop % side == 0 or (tail_ok and stop == total)
    if start % side or not stop_ok:
        raise ValueError(f"{name}: this rank's slice [{start}, {stop}) of {total} cuts a {side}-wide FP8 scale "
                         f"block; shard boundaries must fall on block boundaries (choose a world size whose head "
                         f"slices are multiples of {side})")
    return slice(start // side, -(-stop // side))


def _load_fp8_attention(qkv: Fp8Linear, o: Fp8Linear, state: dict[str, torch.Tensor], prefix: str,
                        q_rows: slice, kv_rows: slice) -> None:
    """This rank's rows of q/k/v (stacked) and columns of o_proj, codes and scales sliced alike."""
    bn, bk = qkv.block
    codes, scales = [], []
    for part, rows, last in (("q_proj", q_rows, False), ("k_proj", kv_rows, False), ("v_proj", kv_rows, True)):
        w, s = _fp8_weight(state, prefix + part + ".weight", qkv.block)
        # q and k are followed by the next part: they must end on a block boundary to keep the stack's blocks
        blocks = _block_slice(rows, w.shape[0], bn, prefix + part, tail_ok=last)
        codes.append(w[rows])
        scales.append(s[blocks])
    qkv.load_(torch.cat(codes).to(qkv.weight.device), torch.cat(scales).to(qkv.weight.device))
    w, s = _fp8_weight(state, prefix + "o_proj.weight", o.block)
    blocks = _block_slice(q_rows, w.shape[1], bk, prefix + "o_proj", tail_ok=True)
    o.load_(w[:, q_rows].to(o.weight.device), s[:, blocks].to(o.weight.device))


def _synced_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _seed_for(seed: int, name: str, rank: int) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode()) * 131 + rank + 1) % (2**63)
