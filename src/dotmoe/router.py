"""Top-k token router and the two gating semantics of DOT-MoE.

- "mask" (paper): each selected expert gets weight exactly 1; gradient reaches the router through the
  straight-through estimator G = R_hard + P - stopgrad(P).
- "softmax" (stock MoE formats): selected expert e gets k * P_e / sum_topk(P); exactly what Mixtral /
  Qwen3-MoE compute with norm_topk_prob once the factor k is folded into the expert down projections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GATING_MODES = ("mask", "softmax")


@dataclass
class RouterOutput:
    """Per-token router quantities ([..., E]): logits, probabilities, hard top-k mask and gate weights."""

    logits: torch.Tensor
    probs: torch.Tensor
    topk_mask: torch.Tensor
    gates: torch.Tensor


class TopKRouter(nn.Module):
    """Linear d -> E router selecting k experts per token."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, gating: str = "softmax"):
        super().__init__()
        if gating not in GATING_MODES:
            raise ValueError(f"gating must be one of {GATING_MODES}, got {gating!r}")
        if not 1 <= top_k < num_experts:
            raise ValueError(f"need 1 <= top_k < num_experts, got k={top_k}, E={num_experts}")
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=hidden_size**-0.5)
        self.top_k, self.gating = top_k, gating

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits = x.float() @ self.weight.float().t()
        probs = logits.softmax(-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        mask = torch.zeros_like(probs).scatter_(-1, top_i, 1.0)
        if self.gating == "mask":
            gates = mask + (probs - probs.detach())  # parenthesised: forward value exactly the mask
        else:
            gates = torch.zeros_like(probs).scatter(-1, top_i, self.top_k * top_p / top_p.sum(-1, keepdim=True))
        return RouterOutput(logits=logits, probs=probs, topk_mask=mask, gates=gates)
