"""The seam where fused kernels replace PyTorch code: a tiny registry of named implementations per op.

Every op has a `torch` implementation, the reference, selected at registration (among them `qk_norm_rope`:
attention's per-layer q/k norms, head split and partial RoPE; `route`: the router's scoring and top-k).
`moe_experts` also has `grouped_mm` (model/moe_grouped.py: sorted pairs and torch._grouped_mm, sync-free,
CUDA-graph safe), and `m2rl.kernels` may register Triton ones (`triton`) when it is imported. Choosing:

    ops.use("moe_experts", "grouped_mm")          # forced: select_defaults leaves it alone
    with ops.using(moe_experts="torch"): ...      # forced for the block
    M2RL_OPS=moe_experts=torch,rms_norm=torch     # environment: wins over the device defaults
    ops.select_defaults(device)                   # load_pretrained calls it: on CUDA, imports m2rl.kernels
                                                  # and takes the first registered of PREFERRED (and of
                                                  # PREFERRED_TRAINING under autograd); CPU: torch

The model calls `ops.rms_norm(...)` / `ops.moe_experts(...)`, which dispatch on the device of their input: a
forced choice wherever the tensors are, else the default `select_defaults` chose for that device type, else
the registration default (torch). A process holding a CUDA model and a CPU one runs each on its own
defaults (a Triton kernel never sees a CPU tensor it was not forced onto).
Shape suffixes: T tokens, D hidden, I expert inner width, E experts, K experts per token; B batch, Q and X the
q and k projection widths, R rotary dims.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

_IMPLS: dict[str, dict[str, Callable[..., Any]]] = {}
_SELECTED: dict[str, str] = {}
_FORCED: set[str] = set()  # ops chosen with use()/using(): select_defaults keeps them
_DEFAULTS: dict[str, dict[str, str]] = {}  # device type -> op -> implementation, from select_defaults

OPS_ENV = "M2RL_OPS"  # "op=implementation,...": overrides the device defaults, not use()
# Fastest first, per device type; ops and devices not named here run "torch". CPU stays on torch: CPU
# runs are pinned bit for bit.
PREFERRED: dict[str, dict[str, tuple[str, ...]]] = {
    "cuda": {"moe_experts": ("triton", "grouped_mm", "torch"), "rms_norm": ("triton", "torch"),
             "qk_norm_rope": ("triton", "torch"), "route": ("triton", "torch"),
             "linear_logprobs": ("triton", "chunked", "torch")},
}
# Under autograd (the learner) an op may have a different fastest implementation: the fused Triton MoE wins
# the forward (1.4x grouped_mm at 64 tokens: decode) but its backward runs at ~230 TFLOP/s where cuBLAS's
# grouped GEMMs reach ~450 (H200, 2 x 8192 tokens: 23.5 ms a layer forward+backward against 13.6 ms;
# benchmarks/learner_gpu.py --profile). Ops not named here use PREFERRED when training too.
PREFERRED_TRAINING: dict[str, dict[str, tuple[str, ...]]] = {
    "cuda": {"moe_experts": ("grouped_mm", "triton", "torch")},
}
_TRAINING_DEFAULTS: dict[str, dict[str, str]] = {}  # device type -> op -> implementation under autograd


def register(op: str, name: str, fn: Callable[..., Any]) -> None:
    _IMPLS.setdefault(op, {})[name] = fn
    _SELECTED.setdefault(op, name)


def register_implementations(name: str, fns: dict[str, Callable[..., Any]]) -> list[tuple[str, str]]:
    """Register each op's `fn` under the implementation `name` (a kernel module's OPS); returns the pairs."""
    for op, fn in fns.items():
        register(op, name, fn)
    return [(op, name) for op in fns]


def available(op: str) -> list[str]:
    if op not in _IMPLS:
        raise KeyError(f"unknown op {op!r}; ops: {sorted(_IMPLS)}")
    return sorted(_IMPLS[op])


def _require(op: str, name: str) -> None:
    if name not in available(op):
        raise KeyError(f"op {op!r} has no implementation {name!r}; registered: {available(op)}")


def use(op: str, name: str) -> None:
    """Select `name` for `op` and keep it through select_defaults."""
    _require(op, name)
    _SELECTED[op] = name
    _FORCED.add(op)


def selected(op: str, device: torch.device | str | None = None) -> str:
    """The implementation `op` runs for tensors on `device` (None: the forced or registration choice)."""
    available(op)
    if op in _FORCED or device is None:
        return _SELECTED[op]
    return _DEFAULTS.get(torch.device(device).type, {}).get(op, _SELECTED[op])


def _choice(op: str, device_type: str, training: bool = False) -> str:
    if op in _FORCED:
        return _SELECTED[op]
    if training and op in _TRAINING_DEFAULTS.get(device_type, {}):
        return _TRAINING_DEFAULTS[device_type][op]
    return _DEFAULTS.get(device_type, {}).get(op, _SELECTED[op])


def selected_training(op: str, device: torch.device | str) -> str:
    """The implementation `op` runs under autograd (inputs that need gradients) on `device`."""
    available(op)
    return _choice(op, torch.device(device).type, training=True)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


@contextlib.contextmanager
def using(**choices: str) -> Iterator[None]:
    before = {op: (selected(op), op in _FORCED) for op in choices}
    try:
        for op, name in choices.items():
            use(op, name)
        yield
    finally:
        for op, (name, forced) in before.items():
            _SELECTED[op] = name
            if not forced:
                _FORCED.discard(op)


def parse_choices(spec: str) -> dict[str, str]:
    """"moe_experts=torch,rms_norm=torch" (the M2RL_OPS format) -> {op: implementation}, each one registered."""
    choices = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        op, sep, name = (s.strip() for s in item.partition("="))
        if not (sep and op and name):
            raise ValueError(f"{OPS_ENV}={spec!r}: expected op=implementation, got {item!r}")
        try:
            _require(op, name)
        except KeyError as e:
            raise KeyError(f"{OPS_ENV}={spec!r}: {e.args[0]}") from None
        choices[op] = name
    return choices


def select_defaults(device: torch.device | str) -> None:
    """Select each op's implementation for a model on `device`: an op forced with use()/using() keeps its
    choice; else M2RL_OPS's; else, on CUDA, the first registered of PREFERRED (m2rl.kernels is imported
    first so its Triton kernels can register; CPU runs never import it); else torch."""
    device = torch.device(device)
    if device.type == "cuda":
        _import_kernels()
    from_env = parse_choices(os.environ.get(OPS_ENV, ""))
    defaults = _DEFAULTS.setdefault(device.type, {})
    training = _TRAINING_DEFAULTS.setdefault(device.type, {})
    for op, impls in _IMPLS.items():
        preferred = PREFERRED.get(device.type, {}).get(op, ("torch",))
        defaults[op] = from_env.get(op) or next((name for name in preferred if name in impls), "torch")
        when_training = PREFERRED_TRAINING.get(device.type, {}).get(op)
        training.pop(op, None)
        if when_training and op not in from_env:  # M2RL_OPS names one implementation for both modes
            training[op] = next((name for name in when_training if name in impls), defaults[op])
    log.info("ops on %s: %s", device.type,
             ", ".join(f"{op}={selected(op, device)}" + (f" (training: {training[op]})" if op in training else "")
                       for op in sorted(_IMPLS)))


def _import_kernels() -> None:
    """m2rl.kernels registers its implementations on import; without Triton it may not import at all."""
    try:
        importlib.import_module("m2rl.kernels")
    except ImportError as e:
        log.info("m2rl.kernels not imported (%s): no Triton kernels", e)


def get(op: str, device: torch.device | str | None = None) -> Callable[..., Any]:
    return _IMPLS[op][selected(op, device)]


# ---- dispatchers the model calls ----------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _IMPLS["rms_norm"][_choice("rms_norm", x.device.type)](x, weight, eps)


def qk_norm_rope(q_BTQ: torch.Tensor, k_BTX: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 eps: float, cos_BTR: torch.Tensor, sin_BTR: torch.Tensor, n_heads: int,
                 n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _IMPLS["qk_norm_rope"][_choice("qk_norm_rope", q_BTQ.device.type)]
    return impl(q_BTQ, k_BTX, q_weight, k_weight, eps, cos_BTR, sin_BTR, n_heads, n_kv)


def route(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, k: int,
          scoring_func: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor]:
    return _IMPLS["route"][_choice("route", logits_TE.device.type)](logits_TE, bias_E, k, scoring_func)


def moe_experts(x_TD: torch.Tensor, w1_EID: torch.Tensor, w3_EID: torch.Tensor, w2_EDI: torch.Tensor,
                experts_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    training = _needs_grad(x_TD, w1_EID, w3_EID, w2_EDI, weights_TK)
    impl = _IMPLS["moe_experts"][_choice("moe_experts", x_TD.device.type, training)]
    return impl(x_TD, w1_EID, w3_EID, w2_EDI, experts_TK, weights_TK)


# ---- torch reference implementations -----------------------------------------------------------------
def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x); statistics in fp32, the weight multiplies after casting back (as transformers)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def qk_norm_rope_torch(q_BTQ: torch.Tensor, k_BTX: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                       eps: float, cos_BTR: torch.Tensor, sin_BTR: torch.Tensor, n_heads: int,
                       n_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """M2's "per_layer" q/k norms then partial RoPE: ONE RMSNorm (the rms_norm op) over the whole q projection
    [B, T, H*Dh] and one over k [B, T, Hkv*Dh], the split into heads, and NeoX rotation of the first R dims
    of each head. Returns q [B, H, T, Dh] and k [B, Hkv, T, Dh], transposed views of [B, T, heads, Dh]."""
    B, T, Q = q_BTQ.shape
    head_dim = Q // n_heads
    q_BHTD = rms_norm(q_BTQ, q_weight, eps).view(B, T, n_heads, head_dim).transpose(1, 2)
    k_BHTD = rms_norm(k_BTX, k_weight, eps).view(B, T, n_kv, head_dim).transpose(1, 2)
    return (attention.apply_partial_rope(q_BHTD, cos_BTR, sin_BTR),
            attention.apply_partial_rope(k_BHTD, cos_BTR, sin_BTR))


def route_torch(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, k: int,
                scoring_func: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor]:
    """The routing math of `m2rl.model.router.route` (router.py owns it): (weights_TK fp32, experts_TK int64)."""
    return router.route(logits_TE, bias_E, k, scoring_func)


def moe_experts_torch(x_TD: torch.Tensor, w1_EID: torch.Tensor, w3_EID: torch.Tensor, w2_EDI: torch.Tensor,
                      experts_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """sum_k weights[t,k] * w2_e(silu(w1_e x_t) * w3_e x_t) with e = experts[t,k]; loops over the experts hit.

    Sorting the (token, slot) pairs by expert once replaces one boolean scan per expert."""
    T, K = experts_TK.shape
    E = w1_EID.shape[0]
    if T * E <= DENSE_MAX_TOKEN_EXPERTS:
        return _moe_experts_dense(x_TD, w1_EID, w3_EID, w2_EDI, experts_TK, weights_TK)
    if T * K <= E:
        return _moe_experts_gathered(x_TD, w1_EID, w3_EID, w2_EDI, experts_TK, weights_TK)
    out_TD = torch.zeros_like(x_TD)
    flat_expert = experts_TK.reshape(-1)
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.bincount(flat_expert, minlength=w1_EID.shape[0]).tolist()
    token_of = order // K
    weight_of = weights_TK.reshape(-1)[order]
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        tokens = token_of[start:start + n]
        x_ND = x_TD[tokens]
        h_NI = F.silu(x_ND @ w1_EID[e].t()) * (x_ND @ w3_EID[e].t())
        # Routing weights are fp32; scale in fp32 then cast, as transformers does.
        y_ND = (h_NI @ w2_EDI[e].t()) * weight_of[start:start + n, None]
        out_TD.index_add_(0, tokens, y_ND.to(x_TD.dtype))
        start += n
    return out_TD


# Below this many (token, expert) pairs, running every expert densely and zero-weighting the unrouted
# ones beats gathering/scattering: a small-expert model's decode step is overhead-bound (measured on
# the tiny preset, E=8: 86 us dense vs 330 us gathered at 4 tokens; the loop wins from ~32 tokens).
# The released M2 (E=256) never takes this path.
DENSE_MAX_TOKEN_EXPERTS = 256


def _moe_experts_dense(x_TD: torch.Tensor, w1_EID: torch.Tensor, w3_EID: torch.Tensor, w2_EDI: torch.Tensor,
                       experts_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, combined with the routing weights (0 for unrouted experts)."""
    gate_TE = torch.zeros(x_TD.shape[0], w1_EID.shape[0], dtype=weights_TK.dtype, device=x_TD.device)
    gate_TE = gate_TE.scatter(1, experts_TK, weights_TK)
    h_ETI = F.silu(torch.matmul(x_TD, w1_EID.transpose(1, 2))) * torch.matmul(x_TD, w3_EID.transpose(1, 2))
    y_ETD = torch.matmul(h_ETI, w2_EDI.transpose(1, 2))
    # Routing weights are fp32: scale in fp32, then cast, as the other paths do.
    return torch.einsum("etd,te->td", y_ETD.float(), gate_TE.float()).to(x_TD.dtype)


def _moe_experts_gathered(x_TD: torch.Tensor, w1_EID: torch.Tensor, w3_EID: torch.Tensor, w2_EDI: torch.Tensor,
                          experts_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Decode-sized batches (T*K <= E): gather each slot's expert weights and run one bmm per matrix —
    fewer, larger ops and no host sync, at the cost of copying T*K expert matrices."""
    T, K = experts_TK.shape
    e_N = experts_TK.reshape(-1)
    x_ND1 = x_TD.repeat_interleave(K, dim=0)[:, :, None]
    h_NI1 = F.silu(torch.bmm(w1_EID[e_N], x_ND1)) * torch.bmm(w3_EID[e_N], x_ND1)
    y_ND = torch.bmm(w2_EDI[e_N], h_NI1)[..., 0] * weights_TK.reshape(-1, 1)
    return y_ND.view(T, K, -1).sum(1).to(x_TD.dtype)


register("rms_norm", "torch", rms_norm_torch)
register("qk_norm_rope", "torch", qk_norm_rope_torch)
register("route", "torch", route_torch)
register("moe_experts", "torch", moe_experts_torch)

# Last: moe_grouped falls back to moe_experts_torch, which it imports lazily from here. attention and router
# call the dispatchers above and own the math of the references they back (looked up when those run, so
# either module may be imported first).
from m2rl.model import attention, router
from m2rl.model.moe_grouped import moe_experts_grouped

register("moe_experts", "grouped_mm", moe_experts_grouped)

# ---- linear_logprobs: per-token log-probs (and entropy) through the LM head, never the [N, V] logits ---------
# N tokens, V vocabulary. Kernels: m2rl/kernels/linear_logprob.py (fused, Triton).
def linear_logprobs(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                    return_entropy: bool = False, *, fp32_logits: bool = True, temperature: float = 1.0,
                    chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logprob_N, entropy_N or None), both fp32 and differentiable w.r.t. hidden and weight, for
    z_n = hidden_n @ weight^T / temperature:  logprob_n = log_softmax(z_n)[targets_n],
    entropy_n = -sum_v p_nv log p_nv.

    fp32_logits: the logits from fp32 products (exact for bf16 inputs: the M1 "LM head in fp32");
    False: the logits in the inputs' dtype, cast to fp32 for the softmax. chunk_size: rows per chunk of
    the torch implementation (it holds one [chunk, V] fp32 logits block); fused ones tile on their own."""
    impl = _IMPLS["linear_logprobs"][_choice("linear_logprobs", hidden_ND.device.type)]
    return impl(hidden_ND, weight_VD, targets_N, return_entropy, fp32_logits=fp32_logits,
                temperature=temperature, chunk_size=chunk_size)


def linear_logprobs_torch(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                          return_entropy: bool = False, *, fp32_logits: bool = True, temperature: float = 1.0,
                          chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference: chunks of `chunk_size` rows, each checkpointed under autograd, so backward recomputes
    one chunk's logits at a time instead of keeping them all."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    recompute = torch.is_grad_enabled() and (hidden_ND.requires_grad or weight_VD.requires_grad)
    lps, ents = [], []
    for s in range(0, hidden_ND.shape[0], chunk_size):
        args = (hidden_ND[s:s + chunk_size], weight_VD, targets_N[s:s + chunk_size], return_entropy,
                fp32_logits, temperature)
        lp, ent = checkpoint(_linear_logprobs_chunk, *args, use_reentrant=False) if recompute \
            else _linear_logprobs_chunk(*args)
        lps.append(lp)
        ents.append(ent)
    if not lps:
        empty = torch.zeros(0, dtype=torch.float32, device=hidden_ND.device)
        return empty, empty.clone() if return_entropy else None
    return torch.cat(lps), torch.cat(ents) if return_entropy else None


def _linear_logprobs_chunk(hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                           return_entropy: bool, fp32_logits: bool,
                           temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    if fp32_logits:
        # autocast (learner.bf16) would run this GEMM in bf16: the fp32 head is the point of the option
        with torch.autocast(hidden_ND.device.type, enabled=False):
            logits_NV = F.linear(hidden_ND.float(), weight_VD.float())
    else:
        logits_NV = F.linear(hidden_ND, weight_VD).float()
    if temperature != 1.0:
        logits_NV = logits_NV / temperature
    lse_N = torch.logsumexp(logits_NV, dim=-1)
    logprob_N = logits_NV.gather(1, targets_N[:, None])[:, 0] - lse_N
    if not return_entropy:
        return logprob_N.float(), None
    return logprob_N.float(), (lse_N - (torch.softmax(logits_NV, dim=-1) * logits_NV).sum(-1)).float()


register("linear_logprobs", "torch", linear_logprobs_torch)

# Last: the chunked implementation falls back to linear_logprobs_torch (mixed dtypes), imported lazily from here.
from m2rl.model.linear_logprobs_chunked import linear_logprobs_chunked

register("linear_logprobs", "chunked", linear_logprobs_chunked)
