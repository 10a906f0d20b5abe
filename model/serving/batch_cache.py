"""The running batch's KV cache: one row per sequence, each row at its own length.

`KVCache` (model/kv_cache.py) advances every row of a batch by the same slot, which suits `generate`: one
batch starts and ends together. Under continuous batching sequences join and leave between decode steps,
so each row must write its next token at its own column. `BatchCache` holds the static tensors (gpt-fast
style: allocated once, [L, R, Hkv, S, Dh]) and `decode_step(n)` lends `M2ForCausalLM.hidden_states` the
KVCache interface it calls (`valid`, `length`, `begin`, `write`, `commit`) for one step of rows 0..n-1.

Live rows are kept contiguous (a row that leaves is refilled by the last live row, `move`), so a step reads
a view `k[l, :n, :, :W]`, never a gathered copy; W is the longest live row plus one, so attention costs
what the live sequences hold, not the allocated capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from m2rl.model.kv_cache import KVCache


@dataclass
class BatchCache:
    k: torch.Tensor  # [L, R, Hkv, S, Dh]
    v: torch.Tensor  # [L, R, Hkv, S, Dh]
    lengths: list[int]  # tokens held by each row (host side: slicing needs them as ints anyway)

    @classmethod
    def allocate(cls, num_layers: int, rows: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> BatchCache:
        shape = (num_layers, rows, num_kv_heads, max_len, head_dim)
        # zeros, not empty: a masked key still enters softmax(qk)·v as 0 * v, and 0 * NaN garbage is NaN.
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   [0] * rows)

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def load_prefill(self, row: int, prefill: KVCache, prefill_row: int, length: int) -> None:
        """Copy the first `length` slots of one row of a (right-padded) prefill cache into `row`."""
        if length > self.capacity:
            raise ValueError(f"prompt of {length} tokens exceeds the cache capacity {self.capacity}")
        self.k[:, row, :, :length] = prefill.k[:, prefill_row, :, :length]
        self.v[:, row, :, :length] = prefill.v[:, prefill_row, :, :length]
        self.lengths[row] = length

    def move(self, src: int, dst: int) -> None:
        """Row `src` now lives in row `dst` (what was in `dst` is dropped)."""
        if src == dst:
            return
        length = self.lengths[src]
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]
        self.lengths[dst], self.lengths[src] = length, 0

    def decode_step(self, n: int) -> DecodeStep:
        return DecodeStep(self, n)


class DecodeStep:
    """One decode step of rows 0..n-1 (one new token each), in the interface `hidden_states` expects of a
    KVCache. Row b's new token goes to column lengths[b]; it sees columns 0..lengths[b]."""

    def __init__(self, cache: BatchCache, n: int) -> None:
        if not 0 < n <= cache.rows:
            raise ValueError(f"decode step over {n} rows, cache has {cache.rows}")
        self.cache, self.n = cache, n
        device = cache.k.device
        self.lengths_N = torch.tensor(cache.lengths[:n], dtype=torch.long, device=device)
        self.length = max(cache.lengths[:n])  # hidden_states counts valid[:, :length] as each row's position
        if self.length >= cache.capacity:
            raise ValueError(f"KV cache overflow: a row holds {self.length} tokens, capacity {cache.capacity}")
        self.width = self.length + 1
        cols = torch.arange(self.width, device=device)
        self.valid = cols[None, :self.length] < self.lengths_N[:, None]  # [n, W-1]
        self._rows = torch.arange(n, device=device)

    def begin(self, token_mask_BT: torch.Tensor) -> tuple[int, torch.Tensor]:
        if tuple(token_mask_BT.shape) != (self.n, 1):
            raise ValueError(f"a decode step takes one token per row: got {tuple(token_mask_BT.shape)}")
        cols = torch.arange(self.width, device=self.lengths_N.device)
        allowed_NW = cols[None, :] <= self.lengths_N[:, None]  # the row's tokens and the new one itself
        return 0, allowed_NW[:, None, None, :]  # [n, 1, 1, W]: broadcast over heads, one query

    def write(self, layer: int, start: int, k_BHTD: torch.Tensor,
              v_BHTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k_layer, v_layer = self.cache.k[layer], self.cache.v[layer]
        # Advanced indices around a slice put their dimension first: [n, Hkv, Dh] on both sides.
        k_layer[self._rows, :, self.lengths_N] = k_BHTD[:, :, 0]
        v_layer[self._rows, :, self.lengths_N] = v_BHTD[:, :, 0]
        return k_layer[:self.n, :, :self.width], v_layer[:self.n, :, :self.width]

    def commit(self, num_tokens: int) -> None:
        for b in range(self.n):
            self.cache.lengths[b] += num_tokens
