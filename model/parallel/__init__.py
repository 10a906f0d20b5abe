"""m2rl.model.parallel: M2 inference over the GPUs of one host (expert-parallel MoE, head-parallel attention).

    layout.py        which rank owns which experts, heads and vocab rows (pure functions)
    fp8_experts.py   one rank's experts as FP8 block-scaled weights: torch reference and Triton kernels
    sharded_m2.py    ShardedM2: the model per rank, its KV cache and greedy decode (optionally a CUDA graph)
    launch.py        one process per rank (spawn, or torchrun's environment)

Names are imported on first use, so `import m2rl.model.parallel` costs nothing (Triton loads with fp8_experts).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ShardLayout": "layout", "localize_experts": "layout", "Fp8Experts": "fp8_experts",
    "DenseExperts": "fp8_experts", "ShardedM2": "sharded_m2", "ShardKVCache": "sharded_m2",
    "GreedyOutput": "sharded_m2",
}
__all__ = ["DenseExperts", "Fp8Experts", "GreedyOutput", "ShardKVCache", "ShardLayout", "ShardedM2",
           "localize_experts"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'm2rl.model.parallel' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"m2rl.model.parallel.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
