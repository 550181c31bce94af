"""Heuristic balanced partitions of neurons into experts (baselines and initialisations for DOT-MoE)."""

from __future__ import annotations

import torch

from dotmoe.rounding import greedy_round
from dotmoe.sinkhorn import sinkhorn_log


def random_partition(caps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """LLaMA-MoE random split: a random permutation cut into blocks of the capacities."""
    experts = torch.repeat_interleave(torch.arange(len(caps)), caps)
    return experts[torch.randperm(len(experts), generator=generator)]


def sequential_partition(caps: torch.Tensor) -> torch.Tensor:
    """Contiguous blocks: neurons 0..c_0-1 -> expert 0, and so on."""
    return torch.repeat_interleave(torch.arange(len(caps)), caps)


def balanced_kmeans(features: torch.Tensor, caps: torch.Tensor, generator: torch.Generator, iters: int = 15,
                    tau: float = 0.05) -> torch.Tensor:
    """Balanced spherical k-means: assignment step = balanced OT on cosine similarity + greedy rounding.

    Scales as O(N E d) per iteration (no N x N matrix), unlike LAPJV-based balanced clustering.
    """
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    e = len(caps)
    centroids = x[torch.randperm(len(x), generator=generator)[:e]].clone()
    assign = torch.zeros(len(x), dtype=torch.long)
    for _ in range(iters):
        sim = x @ centroids.t()
        plan = sinkhorn_log(sim, caps.float(), tau=tau, iters=50).plan
        new = greedy_round(plan, caps)
        if torch.equal(new, assign):
            break
        assign = new
        centroids = torch.nn.functional.normalize(
            torch.zeros(e, x.shape[1]).index_add_(0, assign, x), dim=-1)
    return assign


def weight_kmeans_partition(gate_weight: torch.Tensor, up_weight: torch.Tensor, caps: torch.Tensor,
                            generator: torch.Generator) -> torch.Tensor:
    """MoEfication/LTE-style: balanced k-means on normalised rows of [W_gate | W_up]."""
    feats = torch.cat([torch.nn.functional.normalize(gate_weight.float(), dim=-1),
                       torch.nn.functional.normalize(up_weight.float(), dim=-1)], dim=-1)
    return balanced_kmeans(feats, caps, generator)
