"""Output-aware starting partitions for real checkpoints: what a neuron contributes to the FFN output decides
whether it is always on (shared), routed or dropped.

Pretrained LLMs carry "massive activations": a few neurons in a few layers whose contribution |h_i| * ||W_down[:, i]||
is thousands of times the median (on SmolLM2-135M, layer 11 neuron 1229 contributes ~2e4 on the first token).
A token routed away from such a neuron loses it, so the most important neurons must be always on; the least
important ones can be dropped to hold the active budget; the rest are clustered by co-activation, so that the
neurons a token needs together sit in the same expert.
"""

from __future__ import annotations

import torch
from torch import nn

from dotmoe.architecture import ffn_activations
from dotmoe.partitions import balanced_kmeans

MAX_IMPORTANCE_TOKENS = 8192  # calibration tokens used for importances and co-activation patterns


@torch.no_grad()
def neuron_contributions(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """|h_i(x)| * ||W_down[:, i]||, [tokens, N] in fp32: how much neuron i adds to each token's FFN output."""
    h = ffn_activations(mlp, x)
    return h.float().abs() * mlp.down_proj.weight.float().norm(dim=0)


@torch.no_grad()
def neuron_importance(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean contribution per neuron [N] on the calibration tokens (the pruning criterion)."""
    return neuron_contributions(mlp, x[:MAX_IMPORTANCE_TOKENS]).mean(0)


class SlicedMLP(nn.Module):
    """The gated MLP restricted to the neurons `index` (a view for partitioning a subset of neurons)."""

    def __init__(self, mlp: nn.Module, index: torch.Tensor):
        super().__init__()
        self.act_fn = mlp.act_fn
        self.gate_proj = _slice(mlp.gate_proj, index, 0)
        self.up_proj = _slice(mlp.up_proj, index, 0)
        self.down_proj = _slice(mlp.down_proj, index, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ffn_activations(self, x))


def _slice(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    weight = linear.weight.detach().index_select(dim, index)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None, dtype=weight.dtype)
    new.weight.data.copy_(weight)
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.detach() if dim == 1 else linear.bias.detach()[index])
    return new


@torch.no_grad()
def coactivation_partition(mlp: nn.Module, x: torch.Tensor, caps: torch.Tensor, shared: int,
                           generator: torch.Generator) -> torch.Tensor:
    """Partition [N]: the `shared` most important neurons -> the shared column (id len(caps)-1), the rest by
    balanced k-means on their contribution patterns over the calibration tokens (co-activation clustering)."""
    contrib = neuron_contributions(mlp, x[:MAX_IMPORTANCE_TOKENS])
    n = contrib.shape[1]
    experts = len(caps) - (1 if shared else 0)
    partition = torch.empty(n, dtype=torch.long)
    order = contrib.mean(0).argsort(descending=True)
    if shared:
        partition[order[:shared]] = experts
    routed = order[shared:]
    partition[routed] = balanced_kmeans(contrib[:, routed].t(), caps[:experts], generator)
    return partition


def with_dropped_neurons(partition_fn, mlp: nn.Module, x: torch.Tensor, caps: torch.Tensor, drop: int):
    """Run `partition_fn(sub_mlp, x, sub_caps)` on all but the `drop` least important neurons, which get the last
    column (the dropped one). Returns (partition [N], whatever else partition_fn returned)."""
    n = mlp.gate_proj.out_features
    kept = neuron_importance(mlp, x).argsort(descending=True)[: n - drop].sort().values
    sub_partition, extra = partition_fn(SlicedMLP(mlp, kept), x, caps[:-1])
    partition = torch.full((n,), len(caps) - 1, dtype=torch.long)
    partition[kept] = sub_partition
    return partition, extra
