"""Data-driven baselines that look at calibration activations (not only weights).

- `activation` (CMoE-style): neurons are described by their binary activation pattern over calibration tokens
  (a neuron "fires" on a token when |h| is in that token's top 10%). The most frequently firing neurons form
  the shared expert; the rest are clustered into balanced experts by balanced k-means on the patterns. The
  analytic router scores expert e with the gate row of its representative neuron (the one closest to the
  cluster centroid).
- `hidden-kmeans-router` (LLaMA-MoE-v2-style): calibration hidden states are clustered into E groups; expert e
  gets the neurons most important (mean |h|) on group e, with a balanced OT assignment; the router rows are the
  group centroids.
- `prune`: structured width pruning; neuron importance = mean |h_n| * ||W_down[:, n]||.

Balanced clustering uses the OT machinery (Sinkhorn + greedy rounding, O(N E d) per iteration), not LAPJV on an
N x N matrix, so it scales to 70B-size FFNs.
"""

from __future__ import annotations

import torch
from torch import nn

from dotmoe.architecture import ffn_activations
from dotmoe.partitions import balanced_kmeans
from dotmoe.rounding import greedy_round
from dotmoe.sinkhorn import sinkhorn_log

FIRE_FRACTION = 0.1  # a neuron fires on a token when |h| is in the token's top 10% (CMoE's binarisation)
MAX_PATTERN_TOKENS = 4096  # pattern length; caps memory at N x 4096 floats per layer


@torch.no_grad()
def neuron_activations(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """H = act(x W_gate) * (x W_up), [tokens, N] in fp32."""
    return ffn_activations(mlp, x).float()


@torch.no_grad()
def activation_partition(mlp: nn.Module, x: torch.Tensor, caps: torch.Tensor, shared: int,
                         generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CMoE-style partition [N] (shared expert = id len(caps)-1 when shared > 0) and analytic router [E, d]."""
    h = neuron_activations(mlp, x[:MAX_PATTERN_TOKENS]).abs()
    n = h.shape[1]
    k = max(1, int(FIRE_FRACTION * n))
    fires = torch.zeros_like(h).scatter_(1, h.topk(k, dim=1).indices, 1.0)  # [T, N]
    partition = torch.empty(n, dtype=torch.long)
    routed = torch.arange(n)
    experts = len(caps) - (1 if shared else 0)
    if shared:
        rate = fires.mean(0)
        top = rate.topk(shared).indices
        partition[top] = experts
        keep = torch.ones(n, dtype=torch.bool)
        keep[top] = False
        routed = routed[keep]
    patterns = fires[:, routed].t()  # [N_routed, T]
    partition[routed] = balanced_kmeans(patterns, caps[:experts], generator)
    # representative neuron of each expert: highest cosine similarity to the expert's mean pattern
    unit = nn.functional.normalize(patterns, dim=-1)
    gate = mlp.gate_proj.weight.float()
    router = torch.empty(experts, gate.shape[1])
    for e in range(experts):
        members = routed[partition[routed] == e]
        centroid = nn.functional.normalize(unit[partition[routed] == e].mean(0), dim=0)
        rep = members[(unit[partition[routed] == e] @ centroid).argmax()]
        router[e] = gate[rep]
    return partition, router


@torch.no_grad()
def hidden_kmeans_partition(mlp: nn.Module, x: torch.Tensor, caps: torch.Tensor, shared: int,
                            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaMA-MoE-v2-style partition [N] and centroid router [E, d] from k-means of calibration hidden states."""
    experts = len(caps) - (1 if shared else 0)
    xs = x[:MAX_PATTERN_TOKENS].float()
    token_caps = torch.full((experts,), len(xs) // experts)
    token_caps[: len(xs) - int(token_caps.sum())] += 1
    cluster = balanced_kmeans(xs, token_caps, generator)  # [T]
    h = neuron_activations(mlp, xs).abs()  # [T, N]
    importance = torch.stack([h[cluster == e].mean(0) for e in range(experts)], dim=1)  # [N, E]
    partition = torch.empty(h.shape[1], dtype=torch.long)
    routed = torch.arange(h.shape[1])
    if shared:  # neurons important everywhere are shared
        top = importance.min(1).values.topk(shared).indices
        partition[top] = experts
        keep = torch.ones(h.shape[1], dtype=torch.bool)
        keep[top] = False
        routed = routed[keep]
    scores = importance[routed] / importance[routed].sum(1, keepdim=True).clamp_min(1e-12)
    plan = sinkhorn_log(torch.log(scores.clamp_min(1e-12)), caps[:experts].float(), tau=0.1, iters=100).plan
    partition[routed] = greedy_round(plan, caps[:experts])
    centroids = nn.functional.normalize(torch.stack([xs[cluster == e].mean(0) for e in range(experts)]), dim=-1)
    router = centroids * (5.0 / xs.norm(dim=-1).median())  # logits ~ 5 x cosine similarity
    return partition, router


@torch.no_grad()
def prune_keep(mlp: nn.Module, x: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (sorted) of the `keep` most important neurons: mean |h_n| * ||W_down[:, n]|| (over x in chunks: all
    tokens' activations at once would be [tokens, N])."""
    h = sum(neuron_activations(mlp, xs).abs().sum(0) for xs in x.split(4096)) / len(x)
    importance = h * mlp.down_proj.weight.float().norm(dim=0)
    return importance.topk(keep).indices.sort().values
