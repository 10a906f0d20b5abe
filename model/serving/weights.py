"""Weight updates for a running server: read a safetensors checkpoint and check it against the served model.

A directory is a Hugging Face checkpoint (config.json + safetensors, sharded or not; FP8 dequantized), read
by `checkpoint.read_state_dict`; its config must describe the served architecture. A file is one
safetensors file with the official tensor names (the `model.safetensors` that `save_pretrained` writes).
Every tensor is read and checked (names, shapes, finite values) before the model is touched, so a
mismatched or corrupted checkpoint is refused with the reason and the served weights stay as they were.
"""

from __future__ import annotations

from pathlib import Path

import torch
from m2rl.model.checkpoint import CheckpointError, checkpoint_layout, read_config, read_state_dict
from m2rl.model.config import M2Config, M2ConfigError
from m2rl.model.fp8 import FP8_DTYPE
from m2rl.model.m2 import M2ForCausalLM
from safetensors import safe_open

# Config fields that change what the weights mean: a checkpoint that differs in one is another model.
ARCHITECTURE_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rotary_dim", "rope_theta", "use_qk_norm", "qk_norm_type", "rms_norm_eps",
    "num_local_experts", "num_experts_per_tok", "scoring_func", "use_routing_bias", "shared_intermediate_size",
    "hidden_act", "tie_word_embeddings",
)


class WeightUpdateError(ValueError):
    """The checkpoint cannot replace the served weights; the message says why (the client's fault: 4xx)."""


def read_weights(path: str | Path, model: M2ForCausalLM) -> dict[str, torch.Tensor]:
    """The state dict `model.load_state_dict(..., strict=True)` takes, read from `path` and checked."""
    path = Path(path)
    try:
        if path.is_dir():
            check_config(read_config(path), model.config)
            state = read_state_dict(path)
        elif path.is_file():
            state = _read_file(path, model.config)
        else:
            raise WeightUpdateError(f"no checkpoint directory or safetensors file at {path}")
    except (CheckpointError, M2ConfigError) as exc:
        raise WeightUpdateError(str(exc)) from exc
    check_state_dict(state, model)
    return state


def check_config(config: M2Config, served: M2Config) -> None:
    differ = [f"{name} {getattr(config, name)!r} != served {getattr(served, name)!r}"
              for name in ARCHITECTURE_FIELDS if getattr(config, name) != getattr(served, name)]
    if differ:
        raise WeightUpdateError(f"the checkpoint is another architecture than the served model: {'; '.join(differ)}")


def _read_file(path: Path, config: M2Config) -> dict[str, torch.Tensor]:
    layout = checkpoint_layout(config)
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError (a Rust type) on a truncated or foreign file
        raise WeightUpdateError(f"{path} is not a readable safetensors file ({exc})") from exc
    with f:
        names = set(f.keys())
        unexpected = sorted(names - set(layout))
        if unexpected:
            raise WeightUpdateError(f"{path} holds {len(unexpected)} tensors the served model does not have, "
                                    f"e.g. {unexpected[:3]}")
        missing = [name for name in layout if name not in names]
        if missing:
            raise WeightUpdateError(f"{path} is missing {len(missing)} tensors, e.g. {missing[:3]}")
        state: dict[str, torch.Tensor] = {}
        for name, slot in layout.items():
            tensor = f.get_tensor(name)
            if tensor.dtype == FP8_DTYPE:
                raise WeightUpdateError(f"tensor {name} is FP8: send an FP8 checkpoint as a directory "
                                        "(its config.json holds the block size)")
            if tuple(tensor.shape) != slot.shape:
                raise WeightUpdateError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {slot.shape}")
            if slot.expert is None:
                state[slot.target] = tensor
            else:  # one expert of a stacked [E, out, in] parameter
                stacked = state.setdefault(slot.target, torch.empty((config.num_local_experts, *slot.shape),
                                                                    dtype=tensor.dtype))
                stacked[slot.expert].copy_(tensor)
    return state


def check_state_dict(state: dict[str, torch.Tensor], model: M2ForCausalLM) -> None:
    """Same names and shapes as the model's own state dict, floating point and finite everywhere."""
    served = model.state_dict()
    missing = sorted(set(served) - set(state))
    unexpected = sorted(set(state) - set(served))
    if missing or unexpected:
        raise WeightUpdateError(f"the checkpoint's tensors do not match the served model: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}")
    for name, tensor in state.items():
        if tensor.shape != served[name].shape:
            raise WeightUpdateError(f"tensor {name} has shape {tuple(tensor.shape)}, the served model's is "
                                    f"{tuple(served[name].shape)}")
        if not tensor.is_floating_point():
            raise WeightUpdateError(f"tensor {name} has dtype {tensor.dtype}, not a floating-point type")
        # NaN or inf weights load fine and then poison every answer: refuse them here.
        if not bool(torch.isfinite(tensor).all()):
            raise WeightUpdateError(f"tensor {name} holds NaN or infinite values")
