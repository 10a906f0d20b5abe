"""m2rl.model: the MiniMax-M2 policy network, its checkpoints, tokenizer, generation and log-probs.

Names are imported on first use (PEP 562): `m2rl.model.tokenizer` holds the format's markers, which the
agent and env packages need without paying for torch (`m2rl tasks` starts in a fraction of a second).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the submodule that defines it
_EXPORTS = {
    "CheckpointError": "checkpoint", "checkpoint_tensors": "checkpoint", "load_pretrained": "checkpoint",
    "save_pretrained": "checkpoint", "M2Config": "config", "M2ConfigError": "config",
    "GenerationOutput": "generation", "SamplingParams": "generation", "generate": "generation", "KVCache": "kv_cache",
    "token_logprobs": "logprobs", "M2ForCausalLM": "m2", "M2Tokenizer": "tokenizer",
}
__all__ = sorted([*_EXPORTS, "ops"])

if TYPE_CHECKING:
    from m2rl.model import ops
    from m2rl.model.checkpoint import CheckpointError, checkpoint_tensors, load_pretrained, save_pretrained
    from m2rl.model.config import M2Config, M2ConfigError
    from m2rl.model.generation import GenerationOutput, SamplingParams, generate
    from m2rl.model.kv_cache import KVCache
    from m2rl.model.logprobs import token_logprobs
    from m2rl.model.m2 import M2ForCausalLM
    from m2rl.model.tokenizer import M2Tokenizer


def __getattr__(name: str) -> Any:
    if name == "ops":
        return importlib.import_module("m2rl.model.ops")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'm2rl.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"m2rl.model.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value
