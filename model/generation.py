"""Batched generation with a preallocated KV cache: prefill, then one token per step. Token ids in and out.

    outs = generate(model, [prompt_ids, ...], SamplingParams(max_tokens=64, temperature=0.7, seed=0))
    outs[0].ids, outs[0].logprobs, outs[0].raw_logprobs, outs[0].finish_reason
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from m2rl.model.graph_decode import MIN_WIDTH_BUCKET, GraphDecoder, bucket
from m2rl.model.m2 import M2ForCausalLM
from m2rl.model.sampling import sample_from_logits, sampling_logits


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()  # a stop id ends the sequence and is kept in its ids
    greedy: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be a non-negative int, got {self.max_tokens!r}")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))


@dataclass
class GenerationOutput:
    ids: list[int]
    logprobs: list[float]  # under the distribution each id was sampled from (greedy: the raw policy)
    raw_logprobs: list[float]  # under the raw policy (temperature 1, no filtering)
    finish_reason: Literal["stop", "length"]


def _pad_batch(prompts: list[list[int]], pad_id: int, side: str,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [B, L], mask [B, L], index of each prompt's last real token [B]."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for b, p in enumerate(prompts):
        cols = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[b, cols] = torch.tensor(p, dtype=torch.long)
        mask[b, cols] = True
    last = torch.tensor([width - 1 if side == "left" else len(p) - 1 for p in prompts])
    return ids.to(device), mask.to(device), last.to(device)


def _check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in p if not (isinstance(t, int) and 0 <= t < vocab_size)]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")


@torch.no_grad()
def generate(model: M2ForCausalLM, prompts: list[list[int]], params: SamplingParams,
             padding_side: Literal["left", "right"] = "left") -> list[GenerationOutput]:
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    prompts = [[int(t) for t in p] for p in prompts]
    _check_prompts(prompts, model.config.vocab_size)
    longest = max(len(p) for p in prompts) + params.max_tokens
    if longest > model.config.max_position_embeddings:
        raise ValueError(f"prompt + max_tokens = {longest} exceeds max_position_embeddings "
                         f"({model.config.max_position_embeddings})")
    device = model.device
    outs = [GenerationOutput([], [], [], "length") for _ in prompts]
    if params.max_tokens == 0:
        return outs
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed)
    if use_cuda_graphs(device):
        with _GRAPH_LOCK:  # the model's reusable graph decoder serves one generate call at a time
            return _decode(model, prompts, params, generator, outs,
                           *_graph_decoder(model, prompts, params.max_tokens))
    return _decode(model, prompts, params, generator, outs,
                   *_eager_decoder(model, prompts, params.max_tokens, padding_side))


def _decode(model: M2ForCausalLM, prompts: list[list[int]], params: SamplingParams,
            generator: torch.Generator | None, outs: list[GenerationOutput], logits: torch.Tensor,
            step: DecodeFn) -> list[GenerationOutput]:
    device = model.device
    B = len(prompts)
    stop = torch.tensor(params.stop_ids, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_ids, step_lp, step_raw = [], [], []
    for index in range(params.max_tokens):
        raw_lp = torch.log_softmax(logits, dim=-1)
        if params.greedy:
            next_ids = torch.argmax(logits, dim=-1)
            lp = raw_lp
        else:
            sample_logits = sampling_logits(logits, params.temperature, params.top_k, params.top_p)
            next_ids = sample_from_logits(sample_logits, generator)
            lp = torch.log_softmax(sample_logits, dim=-1)
        step_ids.append(next_ids)
        step_lp.append(lp.gather(1, next_ids[:, None])[:, 0])
        step_raw.append(raw_lp.gather(1, next_ids[:, None])[:, 0])
        done = done | torch.isin(next_ids, stop)
        # done.all() syncs with the device: only ask when a stop id can end every row.
        if index + 1 == params.max_tokens or (params.stop_ids and bool(done.all())):
            break
        # Finished rows keep decoding (their tokens are dropped below): a fixed batch shape, no re-packing.
        logits = step(next_ids)
    all_ids = torch.stack(step_ids, 1).tolist()
    all_lp = torch.stack(step_lp, 1).tolist()
    all_raw = torch.stack(step_raw, 1).tolist()
    stop_set = set(params.stop_ids)
    for b in range(B):
        for t, tok in enumerate(all_ids[b]):
            outs[b].ids.append(tok)
            outs[b].logprobs.append(all_lp[b][t])
            outs[b].raw_logprobs.append(all_raw[b][t])
            if tok in stop_set:
                outs[b].finish_reason = "stop"
                break
    return outs


# ---- decoders: prefill the prompts, then one step per call (next ids in, fp32 logits [B, V] out) ---------
DecodeFn = Callable[[torch.Tensor], torch.Tensor]


def use_cuda_graphs(device: torch.device) -> bool:
    """CUDA runs decode through captured graphs (model/graph_decode.py) unless M2RL_CUDA_GRAPHS=0."""
    return device.type == "cuda" and os.environ.get("M2RL_CUDA_GRAPHS", "1") != "0"


def _eager_decoder(model: M2ForCausalLM, prompts: list[list[int]], max_tokens: int,
                   padding_side: str) -> tuple[torch.Tensor, DecodeFn]:
    device = model.device
    ids, mask, last = _pad_batch(prompts, 0, padding_side, device)
    B = len(prompts)
    cache = model.new_kv_cache(B, ids.shape[1] + max_tokens)
    hidden = model.hidden_states(ids, kv_cache=cache, attention_mask=mask)
    logits = model.logits(hidden[torch.arange(B, device=device), last], fp32=True)  # [B, V]

    def step(next_ids: torch.Tensor) -> torch.Tensor:
        hidden = model.hidden_states(next_ids[:, None], kv_cache=cache, check_ids=False)
        return model.logits(hidden[:, -1], fp32=True)

    return logits, step


def _graph_decoder(model: M2ForCausalLM, prompts: list[list[int]], max_tokens: int,
                   use_graphs: bool | None = None) -> tuple[torch.Tensor, DecodeFn]:
    """Right-padded prefill, copied into a static per-row cache (row b's tokens from column 0), then decode
    steps replayed from CUDA graphs: the same math as the eager path, one launch per step."""
    device = model.device
    ids, mask, last = _pad_batch(prompts, 0, "right", device)
    B, width = ids.shape
    prefill = model.new_kv_cache(B, width)
    hidden = model.hidden_states(ids, kv_cache=prefill, attention_mask=mask)
    logits = model.logits(hidden[torch.arange(B, device=device), last], fp32=True)
    decoder = _reusable_decoder(model, B, width + max_tokens, prefill.k.dtype, use_graphs)
    decoder.k_cache[:, :B, :, :width] = prefill.k
    decoder.v_cache[:, :B, :, :width] = prefill.v
    del prefill
    lengths_host = [len(p) for p in prompts]
    lengths = torch.tensor(lengths_host, dtype=torch.long, device=device)

    def step(next_ids: torch.Tensor) -> torch.Tensor:
        out = decoder.logits(next_ids, lengths, longest=max(lengths_host))
        lengths.add_(1)
        for b in range(B):
            lengths_host[b] += 1
        return out

    return logits, step


# The last graph decoder of each model, kept across generate calls: capturing costs far more than a step
# (tens of ms per bucket), so a caller that generates in a loop must not re-capture every call. It grows to
# the largest batch and length asked for and dies with its model.
_GRAPH_LOCK = threading.Lock()
_DECODERS: weakref.WeakKeyDictionary[M2ForCausalLM, GraphDecoder] = weakref.WeakKeyDictionary()


def _reusable_decoder(model: M2ForCausalLM, rows: int, length: int, dtype: torch.dtype,
                      use_graphs: bool | None) -> GraphDecoder:
    old = _DECODERS.get(model)
    if (old is not None and old.rows >= rows and old.capacity >= length and old.k_cache.dtype == dtype
            and old.use_graphs == (old.k_cache.device.type == "cuda" if use_graphs is None else use_graphs)):
        return old
    if old is not None:  # grow, never shrink: the next call of the old size reuses the new one
        rows, length = max(rows, old.rows), max(length, old.capacity)
        del _DECODERS[model], old
    c = model.config
    shape = (c.num_hidden_layers, bucket(rows, 1, 1 << 30), c.num_key_value_heads,
             bucket(length, MIN_WIDTH_BUCKET, 1 << 30), c.head_dim)
    decoder = GraphDecoder(model, torch.zeros(shape, dtype=dtype, device=model.device),
                           torch.zeros(shape, dtype=dtype, device=model.device), use_graphs=use_graphs)
    _DECODERS[model] = decoder
    return decoder
