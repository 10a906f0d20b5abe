"""Decode steps captured as CUDA graphs over a static per-row KV cache: one token per row, each row at its
own length.

A decode step of a small batch is a few hundred small kernels; launched one by one from Python, the launch
overhead (~5-10 us each) dwarfs the work, so the step runs at a fraction of the memory-bandwidth roofline.
Captured once as a CUDA graph and replayed, the whole step is one launch. A graph fixes shapes and
addresses, so:
- the KV cache is static: k, v [L, R, Hkv, S, Dh] (the serving `BatchCache` tensors, or `generate`'s own);
  row b's new token goes to column lengths[b] and sees columns 0..lengths[b];
- the inputs are copied into static buffers (ids, lengths) before each replay;
- one graph per (row bucket, width bucket): rows are padded to a power of two (the padding rows write into
  free rows of the cache, which nobody reads), and attention reads a width bucket W >= the longest live
  row + 1 (a power of two from 128), so a step reads the KV the live rows hold, not the whole capacity;
- weights are read in place: `load_state_dict` copies into the same parameters, so a weight update needs
  no re-capture (a parameter *replaced* by a new tensor would; `invalidate()` drops every graph);
- the MoE op must not synchronise with the host (`ops.moe_experts` "triton" or "grouped_mm"; the torch
  loop's `.tolist()` cannot be captured). If capture fails, that bucket runs eagerly and the reason is
  logged once: slower, never wrong.

    decoder = GraphDecoder(model, k_cache, v_cache)
    logits_NV = decoder.logits(ids_N, lengths_N)   # fp32 [n, V]; valid until the next call
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from m2rl.model import ops
from m2rl.model.attention import apply_partial_rope, rope_cos_sin
from m2rl.model.m2 import M2ForCausalLM

log = logging.getLogger(__name__)

MIN_WIDTH_BUCKET = 128


def bucket(n: int, smallest: int, cap: int) -> int:
    """The smallest power of two >= n (and >= smallest), capped at `cap`."""
    size = smallest
    while size < n:
        size *= 2
    return min(size, cap)


def decode_step(model: M2ForCausalLM, k_cache: torch.Tensor, v_cache: torch.Tensor, ids_N: torch.Tensor,
                lengths_N: torch.Tensor, width: int) -> torch.Tensor:
    """One token for each of rows 0..n-1: writes its K/V at column lengths[b] and returns fp32 logits [n, V].

    Pure tensor code of static shapes (n, width): no host synchronisation, so it can be captured. The same
    math as `M2ForCausalLM.hidden_states` on one token with a cache (the attention is written out for one
    query: scores over `width` columns, masked beyond each row's length, softmax in fp32)."""
    config = model.config
    n = ids_N.shape[0]
    x_N1D = model.model.embed_tokens(ids_N)[:, None, :]
    positions_N1 = lengths_N[:, None]
    cos_sin = rope_cos_sin(positions_N1, config.rotary_dim, config.rope_theta, x_N1D.dtype)
    rows_N = torch.arange(n, device=ids_N.device)
    columns_W = torch.arange(width, device=ids_N.device)
    masked_N11W = (columns_W[None, :] > lengths_N[:, None])[:, None, None, :]
    groups = config.num_attention_heads // config.num_key_value_heads
    for index, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        h_N1D = layer.input_layernorm(x_N1D)
        q, k, v = attn.q_proj(h_N1D), attn.k_proj(h_N1D), attn.v_proj(h_N1D)
        if attn.use_qk_norm:  # the op the model's attention uses (fused norm + RoPE on CUDA)
            q_NH1E, k_NG1E = ops.qk_norm_rope(q, k, attn.q_norm.weight, attn.k_norm.weight, attn.q_norm.eps,
                                              *cos_sin, attn.n_heads, attn.n_kv)
        else:
            q_NH1E = apply_partial_rope(q.view(n, 1, attn.n_heads, attn.head_dim).transpose(1, 2), *cos_sin)
            k_NG1E = apply_partial_rope(k.view(n, 1, attn.n_kv, attn.head_dim).transpose(1, 2), *cos_sin)
        v_NG1E = v.view(n, 1, attn.n_kv, attn.head_dim).transpose(1, 2)
        k_layer, v_layer = k_cache[index], v_cache[index]
        # Advanced indices around a slice put their dimension first: [n, Hkv, Dh] on both sides.
        k_layer[rows_N, :, lengths_N] = k_NG1E[:, :, 0]
        v_layer[rows_N, :, lengths_N] = v_NG1E[:, :, 0]
        keys_NGWE, values_NGWE = k_layer[:n, :, :width], v_layer[:n, :, :width]
        # GQA without repeating K/V: the query heads of one KV head are the rows of one small matmul.
        q_NGQE = q_NH1E.reshape(n, attn.n_kv, groups, attn.head_dim)
        scores_NGQW = torch.matmul(q_NGQE, keys_NGWE.transpose(-1, -2)).float() * attn.head_dim ** -0.5
        scores_NGQW = scores_NGQW.masked_fill(masked_N11W, float("-inf"))
        probs_NGQW = torch.softmax(scores_NGQW, dim=-1).to(values_NGWE.dtype)
        out_NGQE = torch.matmul(probs_NGQW, values_NGWE)
        x_N1D = x_N1D + attn.o_proj(out_NGQE.reshape(n, 1, attn.n_heads * attn.head_dim))
        x_N1D = x_N1D + layer.block_sparse_moe(layer.post_attention_layernorm(x_N1D))
    hidden_ND = model.model.norm(x_N1D)[:, 0]
    return lm_head_fp32(model, hidden_ND)


def lm_head_fp32(model: M2ForCausalLM, hidden_ND: torch.Tensor) -> torch.Tensor:
    """fp32 logits. `model.logits(fp32=True)` casts the whole head to fp32 first, i.e. reads 2 bytes, writes
    4 and reads 4 per weight (~6 GB a step at M2's 200K x 3072), more than the rest of a 2-layer step; on
    CUDA a bf16 matmul with fp32 output (`mm.dtype`) reads the weight once, with the same fp32 accumulation."""
    weight = model.lm_head.weight
    if hidden_ND.is_cuda and weight.dtype in (torch.bfloat16, torch.float16) and _HAS_MM_OUT_DTYPE:
        return torch.mm(hidden_ND, weight.t(), out_dtype=torch.float32)
    return model.logits(hidden_ND, fp32=True)


def _mm_out_dtype_available() -> bool:
    try:
        return "out_dtype" in str(torch.ops.aten.mm.dtype._schema)
    except (AttributeError, RuntimeError):
        return False


_HAS_MM_OUT_DTYPE = _mm_out_dtype_available()


class GraphDecoder:
    """Replays one captured decode step per (rows, width) bucket; see the module docstring."""

    def __init__(self, model: M2ForCausalLM, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 use_graphs: bool | None = None) -> None:
        self.model, self.k_cache, self.v_cache = model, k_cache, v_cache
        self.rows, self.capacity = k_cache.shape[1], k_cache.shape[3]
        device = k_cache.device
        self.use_graphs = device.type == "cuda" if use_graphs is None else use_graphs
        self._ids = torch.zeros(self.rows, dtype=torch.long, device=device)
        self._lengths = torch.zeros(self.rows, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, int, str], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._eager: set[tuple[int, int, str]] = set()  # buckets whose capture failed
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.captures = 0

    def invalidate(self) -> None:
        """Forget every graph (after parameters were replaced by new tensors, or the cache reallocated)."""
        self._graphs.clear()
        self._eager.clear()

    def logits(self, ids_N: torch.Tensor, lengths_N: torch.Tensor, longest: int | None = None) -> torch.Tensor:
        """fp32 logits [n, V] of one decode step of rows 0..n-1 (row b holds lengths[b] tokens and gets
        ids[b] next). Lengths are not advanced: the caller owns them. `longest` (max of lengths, when the
        caller knows it on the host) saves a device sync. The result is only valid until the next call (it
        lives in the graph's memory)."""
        n = ids_N.shape[0]
        if not 0 < n <= self.rows:
            raise ValueError(f"decode step over {n} rows, the cache has {self.rows}")
        if longest is None:
            longest = int(lengths_N.max())
        if longest >= self.capacity:
            raise ValueError(f"KV cache overflow: a row holds {longest} tokens, capacity {self.capacity}")
        width = bucket(longest + 1, MIN_WIDTH_BUCKET, self.capacity)
        if not self.use_graphs:
            return decode_step(self.model, self.k_cache, self.v_cache, ids_N, lengths_N, width)
        rows = bucket(n, 1, self.rows)
        self._ids[:n].copy_(ids_N, non_blocking=True)
        self._lengths[:n].copy_(lengths_N, non_blocking=True)
        if rows > n:  # padding rows: free rows of the cache, column 0
            self._ids[n:rows].zero_()
            self._lengths[n:rows].zero_()
        key = (rows, width, ops.selected("moe_experts", self.k_cache.device))
        if key in self._eager:
            return self._run(rows, width)[:n]
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(key, lambda: self._run(rows, width))
            if entry is None:
                return self._run(rows, width)[:n]
        graph, output = entry
        graph.replay()
        return output[:n]

    def _run(self, rows: int, width: int) -> torch.Tensor:
        return decode_step(self.model, self.k_cache, self.v_cache, self._ids[:rows], self._lengths[:rows], width)

    def _capture(self, key: tuple[int, int, str], step: Callable[[], torch.Tensor]
                 ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        # Warm up on a side stream first (cuBLAS workspaces, Triton compilation), as capture requires. The
        # warm-up writes the same K/V the replay will write, so it changes nothing.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                output = step()
        except RuntimeError as exc:
            torch.cuda.synchronize()
            log.warning("decode step (rows %d, width %d, moe_experts=%s) runs without a CUDA graph: %s",
                        *key, exc)
            self._eager.add(key)
            return None
        self._graphs[key] = (graph, output)
        self.captures += 1
        return graph, output
