"""Which rank owns which experts, attention heads and vocabulary rows: pure functions of (sizes, rank, world).

    experts      rank r owns [r*E/W, (r+1)*E/W)                       (expert parallelism)
    q heads      rank r owns [r*Hq/W, (r+1)*Hq/W)                     (tensor parallelism over heads)
    KV heads     rank r owns [r*Hkv/W, (r+1)*Hkv/W): q head h reads KV head h // (Hq/Hkv), so contiguous
                 blocks keep every q head next to its KV head when W divides Hkv (M2: 8 KV heads, W <= 8)
    vocab rows   rank r owns [r*Vs, min((r+1)*Vs, V)) with Vs = ceil(V/W); the last shard is padded to Vs
                 rows whose logits are -inf, so every rank's shard has the same shape (one collective)

Routing stays global: `localize_experts` turns global expert ids into this rank's local ids, -1 where
another rank owns the expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from m2rl.model.config import M2Config


def shard_range(n: int, rank: int, world: int, what: str = "items") -> range:
    """The contiguous block of n items that rank owns; n must split evenly (uneven expert or head shards
    would leave one rank slower than the rest on every step)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    if n % world:
        raise ValueError(f"{n} {what} do not split evenly over {world} ranks")
    size = n // world
    return range(rank * size, (rank + 1) * size)


def padded_shard_size(n: int, world: int) -> int:
    return -(-n // world)


def padded_shard_range(n: int, rank: int, world: int) -> range:
    """Rows [r*ceil(n/W), ...) clipped to n: the real rows of rank's padded shard (may be empty)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    size = padded_shard_size(n, world)
    return range(min(rank * size, n), min((rank + 1) * size, n))


def expert_owner(expert: int, num_experts: int, world: int) -> int:
    if not 0 <= expert < num_experts:
        raise ValueError(f"expert {expert} is not in [0, {num_experts})")
    return expert // (num_experts // world)


def kv_head_of(q_head: int, num_q_heads: int, num_kv_heads: int) -> int:
    return q_head // (num_q_heads // num_kv_heads)


@dataclass(frozen=True)
class ShardLayout:
    """What one rank holds of an M2 model."""

    rank: int
    world: int
    experts: range  # global expert ids
    q_heads: range
    kv_heads: range
    vocab: range  # real lm_head rows; the shard itself has vocab_shard_size rows
    vocab_shard_size: int

    @classmethod
    def build(cls, config: M2Config, rank: int, world: int) -> ShardLayout:
        q_heads = shard_range(config.num_attention_heads, rank, world, "query heads")
        kv_heads = shard_range(config.num_key_value_heads, rank, world, "KV heads")
        group = config.num_attention_heads // config.num_key_value_heads
        assert kv_heads.start == q_heads.start // group and len(kv_heads) * group == len(q_heads)
        return cls(rank=rank, world=world,
                   experts=shard_range(config.num_local_experts, rank, world, "experts"),
                   q_heads=q_heads, kv_heads=kv_heads,
                   vocab=padded_shard_range(config.vocab_size, rank, world),
                   vocab_shard_size=padded_shard_size(config.vocab_size, world))

    def q_rows(self, head_dim: int) -> slice:
        """Rows of q_proj (columns of o_proj, entries of q_norm) this rank holds."""
        return slice(self.q_heads.start * head_dim, self.q_heads.stop * head_dim)

    def kv_rows(self, head_dim: int) -> slice:
        return slice(self.kv_heads.start * head_dim, self.kv_heads.stop * head_dim)


def localize_experts(experts_TK: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """Global expert ids -> local ids in [0, count) for experts [first, first+count), -1 for the rest.
    Device ops only (no host sync): a decode step stays capturable in a CUDA graph."""
    local_TK = experts_TK - first
    mine_TK = (local_TK >= 0) & (local_TK < count)
    return torch.where(mine_TK, local_TK, torch.full_like(local_TK, -1))
