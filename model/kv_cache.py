"""A preallocated KV cache for batched prefill and decode.

Slots are columns shared by the batch; `valid[b, s]` says whether slot s of sequence b holds a real token
(padding does not), so left- and right-padded batches both work: a query attends to the valid slots at or
before its own. Positions are per sequence and passed in by the caller (count of real tokens before).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    k: torch.Tensor  # [L, B, Hkv, S, Dh]
    v: torch.Tensor  # [L, B, Hkv, S, Dh]
    valid: torch.Tensor  # [B, S] bool
    length: int = 0  # slots filled so far

    @classmethod
    def allocate(cls, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> KVCache:
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        return cls(k=torch.zeros(shape, dtype=dtype, device=device),
                   v=torch.zeros(shape, dtype=dtype, device=device),
                   valid=torch.zeros(batch, max_len, dtype=torch.bool, device=device))

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def begin(self, token_mask_BT: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Reserve slots for T new tokens; returns (start slot, attention mask [B, 1, T, length+T])."""
        B, T = token_mask_BT.shape
        start, end = self.length, self.length + T
        if B != self.batch_size:
            raise ValueError(f"batch {B} does not match the cache's batch {self.batch_size}")
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} slots needed, capacity {self.capacity}")
        self.valid[:, start:end] = token_mask_BT.bool()
        slots = torch.arange(end, device=self.k.device)
        causal_TS = slots[None, :] <= slots[start:end, None]
        allowed = causal_TS[None] & self.valid[:, None, :end]
        # A padding query would see no key at all (NaN softmax): let every query see itself.
        allowed |= slots[None, None, :] == slots[start:end, None][None]
        return start, allowed[:, None]

    def commit(self, num_tokens: int) -> None:
        self.length += num_tokens

    def write(self, layer: int, start: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k_BHTD.shape[2]
        self.k[layer, :, :, start:end] = k_BHTD
        self.v[layer, :, :, start:end] = v_BHTD
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
