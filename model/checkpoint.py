"""Hugging Face safetensors checkpoints with the official MiniMax-M2 tensor names.

load_pretrained builds the model on the meta device, allocates it once, then copies tensors in one at a
time (safe_open), so memory never holds two copies of the weights. FP8 block weights are dequantized on
the way in; MTP layers (never released) are skipped. save_pretrained writes the same layout that
transformers' MiniMaxM2ForCausalLM and vLLM load. read_state_dict gives a directory's tensors back as the
module's state dict at their stored dtypes, bit for bit: training checkpoints resume through it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from m2rl.model import ops
from m2rl.model.config import M2Config
from m2rl.model.fp8 import FP8_DTYPE, dequantize_fp8_blocks
from m2rl.model.m2 import M2ForCausalLM
from safetensors import safe_open
from safetensors.torch import save_file

if TYPE_CHECKING:
    from m2rl.model.tokenizer import M2Tokenizer

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match its config (the message names the tensor)."""


@dataclass(frozen=True)
class TensorSlot:
    """Where an official checkpoint tensor lives in M2ForCausalLM: a parameter/buffer, or one expert of it."""

    target: str
    expert: int | None
    shape: tuple[int, ...]


def checkpoint_layout(config: M2Config) -> dict[str, TensorSlot]:
    """Official tensor name -> slot in our module tree, in checkpoint order."""
    c, h = config, config.hidden_size
    out: dict[str, TensorSlot] = {"model.embed_tokens.weight": TensorSlot("model.embed_tokens.weight", None,
                                                                         (c.vocab_size, h))}
    for layer in range(c.num_hidden_layers):
        p = f"model.layers.{layer}."
        same = {
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (c.q_dim, h),
            "self_attn.k_proj.weight": (c.kv_dim, h),
            "self_attn.v_proj.weight": (c.kv_dim, h),
            "self_attn.o_proj.weight": (h, c.q_dim),
            "block_sparse_moe.gate.weight": (c.num_local_experts, h),
        }
        if c.use_qk_norm:
            same["self_attn.q_norm.weight"] = (c.q_dim,)
            same["self_attn.k_norm.weight"] = (c.kv_dim,)
        for name, shape in same.items():
            out[p + name] = TensorSlot(p + name, None, shape)
        if c.use_routing_bias:
            out[p + "block_sparse_moe.e_score_correction_bias"] = TensorSlot(
                p + "block_sparse_moe.gate.e_score_correction_bias", None, (c.num_local_experts,))
        for e in range(c.num_local_experts):
            for w, shape in (("w1", (c.intermediate_size, h)), ("w2", (h, c.intermediate_size)),
                             ("w3", (c.intermediate_size, h))):
                out[f"{p}block_sparse_moe.experts.{e}.{w}.weight"] = TensorSlot(
                    f"{p}block_sparse_moe.experts.{w}", e, shape)
    out["model.norm.weight"] = TensorSlot("model.norm.weight", None, (h,))
    out["lm_head.weight"] = TensorSlot("lm_head.weight", None, (c.vocab_size, h))
    return out


def _is_mtp(name: str, config: M2Config) -> bool:
    m = _LAYER_RE.match(name)
    if m is not None:
        return int(m.group(1)) >= config.num_hidden_layers
    return name.startswith(("model.mtp", "mtp."))


def read_config(path: str | Path) -> M2Config:
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"no config.json in {path}")
    try:
        raw = json.loads(cfg_path.read_bytes())
    except ValueError as e:  # bad JSON, and bytes that are no Unicode text at all
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object, got {type(raw).__name__}")
    return M2Config.from_hf_dict(raw)


def _open_safetensors(path: Path) -> safe_open:
    """safe_open that names the file when it is truncated or not safetensors at all (it checks the header
    and that the data covers it before any tensor is read)."""
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # SafetensorError (a Rust type), OSError
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from e


def _weight_map(path: Path) -> dict[str, str]:
    """Tensor name -> shard file name."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        for shard in sorted(set(weight_map.values())):
            if not (path / shard).is_file():
                raise CheckpointError(f"{index} names shard {shard}, which does not exist")
        return weight_map
    single = path / SINGLE_FILE
    if not single.is_file():
        raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")
    with _open_safetensors(single) as f:
        return dict.fromkeys(f.keys(), SINGLE_FILE)


def _iter_tensors(path: Path, weight_map: dict[str, str]) -> Iterator[tuple[str, safe_open]]:
    """(name, open file) for every tensor, one shard open at a time."""
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    for shard in sorted(by_shard):
        with _open_safetensors(path / shard) as f:
            present = set(f.keys())
            for name in by_shard[shard]:
                if name not in present:
                    raise CheckpointError(f"tensor {name} is listed in the index but missing from {shard}")
                yield name, f


def verify_pretrained(path: str | Path) -> M2Config:
    """Check a checkpoint directory without loading its weights: config.json, every shard's header, and
    that the tensors the config needs are present with their shapes. Raises CheckpointError / M2ConfigError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    config = read_config(path)
    layout = checkpoint_layout(config)
    weight_map = _weight_map(path)
    missing = [name for name in layout if name not in weight_map]
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing {len(missing)} tensors, e.g. {missing[:5]}")
    for shard in sorted(set(weight_map.values())):
        with _open_safetensors(path / shard) as f:
            for name in f.keys():
                slot = layout.get(name)
                shape = tuple(f.get_slice(name).get_shape())
                if slot is not None and weight_map.get(name) == shard and shape != slot.shape:
                    raise CheckpointError(f"tensor {name} has shape {shape}, expected {slot.shape}")
    return config


def _checkpoint_tensors_on_disk(path: Path, config: M2Config) -> Iterator[tuple[TensorSlot, torch.Tensor]]:
    """(slot, tensor as stored, FP8 dequantized) for every tensor of a checkpoint directory whose config is
    `config`; MTP layers are skipped. Raises CheckpointError naming the tensor that is unexpected, misshapen
    or missing (the last one after every tensor was read)."""
    quant = config.quantization_config
    block = tuple(quant.get("weight_block_size", (128, 128))) if quant else (128, 128)
    layout = checkpoint_layout(config)
    weight_map = _weight_map(path)
    loaded: set[str] = set()
    skipped_mtp = 0
    for name, f in _iter_tensors(path, weight_map):
        if name.endswith("weight_scale_inv"):
            if name.removesuffix("_scale_inv") not in weight_map:
                raise CheckpointError(f"tensor {name} has no matching weight")
            continue  # consumed with its weight
        if _is_mtp(name, config):
            skipped_mtp += 1
            continue
        slot = layout.get(name)
        if slot is None:
            raise CheckpointError(f"unexpected tensor {name} (not part of a MiniMax-M2 model with this config)")
        tensor = f.get_tensor(name)
        if tensor.dtype == FP8_DTYPE:
            scale_name = name + "_scale_inv"
            if scale_name not in weight_map:
                raise CheckpointError(f"tensor {name} is FP8 but {scale_name} is missing")
            with _open_safetensors(path / weight_map[scale_name]) as sf:
                scale = sf.get_tensor(scale_name)
            tensor = dequantize_fp8_blocks(tensor, scale, block, name)  # type: ignore[arg-type]
        if tuple(tensor.shape) != slot.shape:
            raise CheckpointError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {slot.shape}")
        yield slot, tensor
        loaded.add(name)
    missing = [n for n in layout if n not in loaded]
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing {len(missing)} tensors, e.g. {missing[:5]}")
    if skipped_mtp:
        log.warning("skipped %d MTP tensors (multi-token prediction layers are not used)", skipped_mtp)


def load_pretrained(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    lm_head_fp32: bool = False) -> M2ForCausalLM:
    """Load a MiniMax-M2 checkpoint directory (single-file or sharded safetensors + config.json)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    config = read_config(path)
    on_disk = dataclasses.replace(config)  # keeps quantization_config for the reader
    config.quantization_config = None  # the loaded model holds dequantized weights

    with torch.device("meta"):
        model = M2ForCausalLM(config, lm_head_fp32=lm_head_fp32)
    model = model.to(dtype=dtype).to_empty(device=device)  # the router stays fp32 (Router._apply)
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for slot, tensor in _checkpoint_tensors_on_disk(path, on_disk):
            dest = targets[slot.target]
            (dest if slot.expert is None else dest[slot.expert]).copy_(tensor)
    ops.select_defaults(device)  # the fastest registered kernels for this device; the CPU keeps torch
    return model.eval()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The `M2ForCausalLM.state_dict()` (experts stacked) held by a checkpoint directory, on the CPU at the
    dtypes stored on disk, so `model.load_state_dict` restores the saved bits exactly (a training checkpoint
    resumes this way). Every tensor is read before the caller touches its model."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    config = read_config(path)
    experts = config.num_local_experts
    state: dict[str, torch.Tensor] = {}
    for slot, tensor in _checkpoint_tensors_on_disk(path, config):
        if slot.expert is None:
            state[slot.target] = tensor
        else:  # one expert of a stacked [E, out, in] parameter
            stacked = state.setdefault(slot.target, torch.empty((experts, *slot.shape), dtype=tensor.dtype))
            stacked[slot.expert].copy_(tensor)
    return state


def checkpoint_tensors(model: M2ForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """(official checkpoint name, detached view on the model's device) for every tensor, in checkpoint order:
    what save_pretrained writes and what a weight sync to vLLM (`load_weights`) expects. No copies."""
    sources = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, slot in checkpoint_layout(model.config).items():
        src = sources[slot.target]
        yield name, (src if slot.expert is None else src[slot.expert]).detach()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_pretrained(model: M2ForCausalLM, path: str | Path, tokenizer: M2Tokenizer | None = None,
                    max_shard_bytes: int = 5 * 1024**3, dtype: torch.dtype | None = None) -> None:
    """Write config.json and safetensors (sharded with an index above max_shard_bytes) with official names;
    with a tokenizer, also tokenizer.json/tokenizer_config.json. `dtype` casts the matrices (the router
    stays fp32). One shard of tensors is on the host at a time."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config
    layout = checkpoint_layout(config)
    views = dict(checkpoint_tensors(model))
    save_dtype = dtype or model.dtype

    def tensor_dtype(name: str) -> torch.dtype:
        return torch.float32 if ".block_sparse_moe.gate." in name or name.endswith("correction_bias") else save_dtype

    def nbytes(name: str) -> int:
        return math.prod(layout[name].shape) * torch.empty((), dtype=tensor_dtype(name)).element_size()

    shards: list[list[str]] = [[]]
    size = 0
    for name in layout:
        if shards[-1] and size + nbytes(name) > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes(name)

    def fetch(name: str) -> torch.Tensor:
        return views[name].to(device="cpu", dtype=tensor_dtype(name)).contiguous()

    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = [SINGLE_FILE]
    for stale in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
        if stale.exists():
            stale.unlink()
    weight_map: dict[str, str] = {}
    for shard, file_name in zip(shards, names):
        save_file({n: fetch(n) for n in shard}, str(path / file_name), metadata={"format": "pt"})
        weight_map.update({n: file_name for n in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes(n) for n in layout)}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2))

    hf = config.to_hf_dict(torch_dtype=_dtype_name(save_dtype))
    hf.pop("quantization_config", None)  # written dequantized
    if tokenizer is not None:
        hf["bos_token_id"], hf["eos_token_id"] = tokenizer.bos_id, tokenizer.eos_id
        tokenizer.save_pretrained(path)
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    gen = {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"]}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
