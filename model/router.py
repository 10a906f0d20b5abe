"""The M2 router: sigmoid (or softmax) scores, a correction bias that only chooses, renormalised weights.

    s = sigmoid(gate(h))                      # fp32
    experts = topk(s + e_score_correction_bias)
    w = s[experts] / sum(s[experts])          # unbiased scores, renormalised
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from m2rl.model import ops
from torch import nn


def route(logits_TE: torch.Tensor, bias_E: torch.Tensor | None, k: int,
          scoring_func: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor]:
    """Pure routing math. Returns (weights_TK fp32, experts_TK int64)."""
    logits_TE = logits_TE.float()
    if scoring_func == "sigmoid":
        scores_TE = torch.sigmoid(logits_TE)
    elif scoring_func == "softmax":
        scores_TE = torch.softmax(logits_TE, dim=-1)
    else:
        raise ValueError(f"unknown scoring_func {scoring_func!r}")
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E.float()
    _, experts_TK = torch.topk(choice_TE, k, dim=-1, sorted=False)
    weights_TK = scores_TE.gather(1, experts_TK)
    weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, experts_TK


def routing_bias_update(bias_E: torch.Tensor, load_E: torch.Tensor, rate: float = 1e-3) -> torch.Tensor:
    """DeepSeek-V3-style balancing step (M2's rule is unpublished): raise the bias of under-loaded experts,
    lower it for over-loaded ones, by a fixed `rate`. `load_E` counts tokens routed to each expert."""
    load = load_E.float()
    return bias_E + rate * torch.sign(load.mean() - load)


class Router(nn.Module):
    """gate.weight [E, D] and e_score_correction_bias [E] stay fp32 whatever the model dtype (as vLLM):
    near-ties in top-k flip under bf16 and change which experts run."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, scoring_func: str,
                 use_routing_bias: bool) -> None:
        super().__init__()
        self.top_k = top_k
        self.scoring_func = scoring_func
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        # The bias is not trained by gradients (its update rule is a separate, optional sign step).
        self.e_score_correction_bias: torch.Tensor | None
        if use_routing_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        # Tokens per expert since the last reset, when record_load is on (for routing_bias_update).
        self.record_load = False
        self.load_E: torch.Tensor | None = None

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        # route() through the ops registry: a fused kernel may replace it (kernels/router.py)
        weights_TK, experts_TK = ops.route(logits_TE, self.e_score_correction_bias, self.top_k,
                                           self.scoring_func)
        if self.record_load:
            counts = torch.bincount(experts_TK.reshape(-1), minlength=self.weight.shape[0])
            self.load_E = counts if self.load_E is None else self.load_E + counts
        return weights_TK, experts_TK

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # Keep the router in fp32 through model.to(bfloat16) / .half(); device moves still apply.
        super()._apply(fn, recurse)
        if self.weight.dtype != torch.float32 and self.weight.is_floating_point():
            self.weight.data = self.weight.data.float()
            if self.weight.grad is not None:
                self.weight.grad = self.weight.grad.float()
        bias = self.e_score_correction_bias
        if bias is not None and bias.dtype != torch.float32:
            self.e_score_correction_bias = bias.float()
        return self
