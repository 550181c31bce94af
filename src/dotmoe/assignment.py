"""Per-layer neuron -> expert assignment: learned OT (DOT-MoE) or a fixed partition (baselines)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dotmoe.rounding import greedy_round, one_hot_assignment, straight_through
from dotmoe.sinkhorn import sinkhorn_log


@dataclass
class AssignmentStats:
    """What one refresh produced: hard partition per layer [L, N] and the worst Sinkhorn marginal error."""

    hard: torch.Tensor
    marginal_error: float


class NeuronAssigner(nn.Module):
    """Holds the affinity A [L, N, E'] (E' = E, +1 column when a shared expert is used) and capacities.

    `learn=True` (DOT-MoE): each refresh solves the OT, rounds greedily and builds the straight-through
    matrix. `learn=False`: A is only a container for a fixed partition (its argmax), no gradient. `iters`:
    Sinkhorn iterations per refresh; the temperature is an argument of each refresh (its schedule is the caller's).
    """

    def __init__(self, affinity: torch.Tensor, caps: torch.Tensor, learn: bool, iters: int = 100):
        super().__init__()
        if affinity.dim() != 3 or affinity.shape[-1] != len(caps):
            raise ValueError(f"affinity must be [L, N, {len(caps)}], got {list(affinity.shape)}")
        self.register_buffer("caps", caps.clone().long())
        self.affinity = nn.Parameter(affinity.float().clone(), requires_grad=learn)
        self.learn = learn
        self.iters = iters

    @property
    def num_layers(self) -> int:
        return self.affinity.shape[0]

    def refresh(self, tau: float = 1.0) -> tuple[torch.Tensor, AssignmentStats]:
        """Assignment matrices [L, N, E'] for this step at temperature `tau` (hard forward, soft backward) and
        their stats."""
        if not self.learn:
            hard = self.affinity.argmax(-1)
            return one_hot_assignment(hard, len(self.caps)), AssignmentStats(hard, 0.0)
        result = sinkhorn_log(self.affinity, self.caps.float(), tau=tau, iters=self.iters)
        hard = torch.stack([greedy_round(p, self.caps) for p in result.plan.detach()])
        matrix = straight_through(one_hot_assignment(hard, len(self.caps)), result.plan)
        return matrix, AssignmentStats(hard, float(result.marginal_error.max()))

