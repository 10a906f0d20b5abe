"""Fused Triton kernels that plug into `m2rl.model.ops` as alternative implementations of its ops.

Importing a kernel module registers its implementation (`ops.register(op, "triton", fn)`); registering
never selects it: `ops.use` / `ops.using` / `ops.select_defaults` do (model/ops.py owns that choice).
Importing this package registers every kernel module where Triton is installed, and imports nothing
heavy where it is not.

    fused_moe.py    moe_experts: grouped SwiGLU GEMMs over expert-aligned row blocks, CUDA-graph safe
    moe_align.py    the sync-free token-to-expert sort and block alignment those GEMMs read
    rms_norm.py     rms_norm: one program per row, forward and backward
    rope.py         qk_norm_rope: attention's whole-projection q/k RMSNorm fused with partial NeoX RoPE
    router.py       route: sigmoid scores, biased top-k by max-and-mask, renormalised weights
    linear_logprob.py  linear_logprobs: LM head + log-softmax + gather (and entropy), fwd + bwd, no [N, V] logits
                       (fused below 512 rows; from 512 cuBLAS GEMMs on row chunks + Triton row kernels)
    fp8_block_linear.py  x @ (W_fp8 * 128x128 block scales)^T without dequantising W (no op: model/fp8_linear.py)
"""

from __future__ import annotations

import importlib
import importlib.util

KERNEL_MODULES = ("m2rl.kernels.fp8_block_linear", "m2rl.kernels.fused_moe", "m2rl.kernels.linear_logprob",
                  "m2rl.kernels.rms_norm", "m2rl.kernels.rope", "m2rl.kernels.router")
"""Modules that register their implementations on import; each names them in its `OPS` dict."""


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def register_all() -> list[tuple[str, str]]:
    """Import (and so register) every kernel module; returns the (op, implementation) pairs registered,
    none where Triton is missing."""
    if not triton_available():
        return []
    registered = []
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        registered += [(op, "triton") for op in module.OPS]
    return registered


register_all()
