"""Training-free reconstruction: refit the FFN down projections by least squares once the sparsity is fixed.

A converted FFN keeps, for each token, only the neurons of its active experts (or, pruned, a fixed subset).
The dense output it should reproduce is y = W_down h; what it computes is W_down (h * g), g the per-neuron gate.
Because the kept neurons are correlated with the ones a token loses, a new W_down fitted on calibration tokens,

    W' = argmin_W sum_t ||y_t - W z_t||^2 + ridge,   z_t = h_t * g_t,

recovers much of what the missing neurons added (the same idea as pruning with reconstruction, e.g. FLAP or
SparseGPT's layer-wise least squares). Only W_down changes, column by column, so every expert keeps its shape and
the export stays a stock MoE checkpoint.

The refit is sequential: one forward of the calibration tokens through the converted decoder, each layer refitted
(in a forward pre-hook) on the inputs that the already-converted layers below it produce, so it also absorbs
their error, with the dense FFN's output on those same inputs as the target. No library does this for a MoE
gate pattern, hence the few lines here.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

DEFAULT_RIDGE = 1e-4  # times the mean diagonal of Z^T Z; best of 1e-2 / 1e-4 on SmolLM2 (ratio 6.4 / 6.0 at 25%)

# one layer: inputs x [T, d] -> (features z [T, n], dense target y [T, d], the Linear whose weight [d, n] is refitted)
LayerProblem = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, nn.Linear]]


@torch.no_grad()
def least_squares_down(z: torch.Tensor, y: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """W [d, n] minimising ||y - z W^T||^2 + ridge * mean(diag(z^T z)) ||W||^2 (fp64 normal equations).

    Columns of z that are zero on every token (neurons never active, e.g. dropped ones) get weight 0."""
    z, y = z.double(), y.double()
    gram = z.t() @ z
    gram += ridge * gram.diagonal().mean().clamp_min(1e-30) * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, z.t() @ y).t()


@torch.no_grad()
def refit_sequentially(decoder: nn.Module, modules: list[nn.Module], problems: list[LayerProblem],
                       calib_ids: torch.Tensor, ridge: float = DEFAULT_RIDGE, progress: bool = False) -> list[float]:
    """Refit every layer's down projection in one forward of `calib_ids` [B, S] through `decoder`.

    `modules[i]` is the FFN module whose input is layer i's x; `problems[i](x)` builds that layer's least-squares
    problem (called before its forward, so the forward already uses the refitted weight). Returns each layer's
    relative error ||y - W' z|| / ||y|| on the calibration tokens after the refit."""
    errors: list[float] = [float("nan")] * len(modules)
    bar = tqdm(total=len(modules), desc="refit down_proj", unit="layer", disable=not progress)

    def hook_for(i: int):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            z, y, down = problems[i](x)
            weight = least_squares_down(z, y, ridge)
            down.weight.copy_(weight.to(down.weight.dtype))
            errors[i] = float((y.double() - z.double() @ weight.t()).norm() / y.double().norm().clamp_min(1e-30))
            bar.update(1)
        return hook

    hooks = [m.register_forward_pre_hook(hook_for(i)) for i, m in enumerate(modules)]
    try:
        decoder(input_ids=calib_ids)
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    return errors


def moe_problem(moe: nn.Module) -> LayerProblem:
    """The least-squares problem of a MoeMLP: features h * gates, target the dense FFN output (its down_proj,
    still the dense one when the problem is built)."""

    def build(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, nn.Linear]:
        mlp = moe.dense
        h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        return h * moe.neuron_gates(x).to(h.dtype), mlp.down_proj(h), mlp.down_proj

    return build
