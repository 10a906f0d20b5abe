"""Token-to-expert sort with per-expert block alignment, the layout the fused-MoE kernels read.

The T*K (token, slot) pairs are numbered `row = t*K + k`. Sorted by expert and padded so that each
expert's run is a whole number of BLOCK_M blocks, every block of rows belongs to one expert, and one
Triton program can multiply a block of rows by one expert's weights:

    experts_TK = [[2, 0], [2, 1]], E=3, block_m=2
    sorted_rows  = [1, 4 | 3, 4 | 0, 2]       # 4 = T*K pads (out of range: the kernels mask it)
    block_expert = [0, 1, 2, -1, ...]         # -1: a block past the used ones; its program exits

PyTorch reference (a host loop; what the tests compare against):

    for e in range(E):
        rows = [r for r in range(T*K) if experts[r] == e]
        sorted_rows += rows + [T*K] * (-len(rows) % block_m)
        block_expert += [e] * ceil(len(rows) / block_m)

Everything here is device tensor ops of sizes fixed by the shapes alone (no `.item()`, `nonzero` or
`bincount` without a size), so the whole MoE forward can be captured in a CUDA graph. Memory traffic is
a few passes over T*K ids and E counters: negligible beside the expert weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class AlignedRouting(NamedTuple):
    """The block layout of one routing; sizes depend only on (T, K, E, block_m), never on the routing."""

    sorted_rows: torch.Tensor
    """[max_padded] int32: rows (t*K + k) grouped by expert, each expert padded with T*K to a multiple of block_m."""
    block_expert: torch.Tensor
    """[max_padded // block_m] int32: the expert of each block of sorted_rows; -1 for blocks past the used ones."""
    num_padded: torch.Tensor
    """[1] int32: how many leading entries of sorted_rows are used (real rows and padding)."""


def max_padded_rows(num_rows: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the aligned length: each non-empty expert wastes at most block_m - 1 pad slots.

    At most min(E, T*K) experts are non-empty, which keeps decode (T*K << E) from launching E blocks."""
    bound = num_rows + min(num_experts, num_rows) * (block_m - 1)
    return -(-bound // block_m) * block_m


def moe_align_block_size(experts_TK: torch.Tensor, num_experts: int, block_m: int) -> AlignedRouting:
    """Sort the (token, slot) rows by expert and pad each expert's run to a multiple of block_m; sync-free."""
    assert experts_TK.dim() == 2, f"experts_TK must be [T, K], got {tuple(experts_TK.shape)}"
    assert block_m > 0 and num_experts > 0
    device = experts_TK.device
    expert_N = experts_TK.reshape(-1).long()
    N = expert_N.numel()
    max_padded = max_padded_rows(N, num_experts, block_m)

    counts_E = torch.zeros(num_experts, dtype=torch.long, device=device)
    counts_E.scatter_add_(0, expert_N, torch.ones_like(expert_N))
    padded_E = (counts_E + block_m - 1) // block_m * block_m
    padded_end_E = torch.cumsum(padded_E, 0)
    padded_start_E = padded_end_E - padded_E
    start_E = torch.cumsum(counts_E, 0) - counts_E

    # stable: within an expert rows stay in (token, slot) order, so the layout is deterministic
    order_N = torch.argsort(expert_N, stable=True)
    sorted_expert_N = expert_N[order_N]
    rank_N = torch.arange(N, device=device) - start_E[sorted_expert_N]  # position within its expert's run
    sorted_rows = torch.full((max_padded,), N, dtype=torch.int32, device=device)
    sorted_rows.scatter_(0, padded_start_E[sorted_expert_N] + rank_N, order_N.to(torch.int32))

    # Block b starts at row b*block_m; its expert is the first whose padded run ends after that row
    # (empty experts end where they start, so right=True steps over them).
    block_start_B = torch.arange(0, max_padded, block_m, device=device)
    block_expert = torch.searchsorted(padded_end_E, block_start_B, right=True)
    used_B = block_start_B < padded_end_E[-1]
    block_expert = torch.where(used_B, block_expert, -1).to(torch.int32)
    return AlignedRouting(sorted_rows, block_expert, padded_end_E[-1:].to(torch.int32))
