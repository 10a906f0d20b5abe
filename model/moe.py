"""Sparse MoE block of M2: router + SwiGLU experts (no shared expert).

Expert weights are stacked per layer (w1/w3 [E, I, D], w2 [E, D, I]) so fused kernels can take them as
one tensor; checkpoints name them per expert (`experts.{e}.w1.weight`), see checkpoint.py.
"""

from __future__ import annotations

import torch
from m2rl.model import ops
from m2rl.model.config import M2Config
from m2rl.model.router import Router
from torch import nn


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))  # gate
        self.w3 = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))  # up
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))  # down

    def forward(self, x_TD: torch.Tensor, experts_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        return ops.moe_experts(x_TD, self.w1, self.w3, self.w2, experts_TK, weights_TK)


class SparseMoE(nn.Module):
    def __init__(self, config: M2Config) -> None:
        super().__init__()
        self.gate = Router(config.hidden_size, config.num_local_experts, config.num_experts_per_tok,
                           config.scoring_func, config.use_routing_bias)
        self.experts = Experts(config.num_local_experts, config.hidden_size, config.intermediate_size)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        weights_TK, experts_TK = self.gate(x_TD)
        return self.experts(x_TD, experts_TK, weights_TK).view_as(x_BTD)
