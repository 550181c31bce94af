"""Training-free reconstruction: refit the FFN down projections by least squares once the sparsity is fixed.

A converted FFN keeps, for each token, only the neurons of its active experts (or, pruned, a fixed subset).
The dense output it should reproduce is y = W_down h; what it computes is W_down (h * g), g the per-neuron gate.
Because the kept neurons are correlated with the ones a token loses, a new W_down fitted on calibration tokens,

    W' = argmin_W sum_t ||y_t - W z_t||^2 + ridge ||W||^2,   z_t = h_t * g_t,

recovers much of what the missing neurons added (the same idea as pruning with reconstruction, e.g. FLAP or
SparseGPT's layer-wise least squares). The ridge is chosen per layer on held-out calibration tokens. Only W_down
changes, column by column, so every expert keeps its shape and
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

# Ridge (times the mean diagonal of Z^T Z) candidates; each layer takes the one with the lowest error on held-out
# calibration tokens. A fixed value is wrong at one end or the other: on SmolLM2 at 25% active, 1e-4 is best with
# 16k calibration tokens (PPL ratio 6.0 vs 6.4 at 1e-2) but overfits with 4k (19.1 vs 10.3 at 1e-2; chosen per
# layer from 1e-5..1e-1: 9.2, most layers taking 1e-1, hence the grid goes on to 1).
RIDGE_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
HOLDOUT_FRACTION = 0.125

# one layer: inputs x [T, d] -> (features z [T, n], dense target y [T, d], the Linear whose weight [d, n] is refitted)
LayerProblem = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, nn.Linear]]


def _solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + ridge * gram.diagonal().mean().clamp_min(1e-30) * eye, rhs).t()


def _normal_equations(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z^T z, z^T y) in fp64, multiplied in fp32: no fp64 copy of the [tokens, N] features (SparseGPT keeps its
    Hessians in fp32 too; the ridge bounds the condition number)."""
    z, y = z.float(), y.float()
    return (z.t() @ z).double(), (z.t() @ y).double()


@torch.no_grad()
def least_squares_down(z: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """W [d, n] minimising ||y - z W^T||^2 + ridge * mean(diag(z^T z)) ||W||^2.

    Columns of z that are zero on every token (neurons never active, e.g. dropped ones) get weight 0."""
    return _solve(*_normal_equations(z, y), ridge)


def _best_ridge(gram: torch.Tensor, rhs: torch.Tensor, test_z: torch.Tensor, test_y: torch.Tensor,
                grid: tuple[float, ...]) -> float:
    test_z, test_y = test_z.float(), test_y.float()
    errors = [float((test_y - test_z @ _solve(gram, rhs, r).float().t()).pow(2).sum()) for r in grid]
    return grid[min(range(len(grid)), key=errors.__getitem__)]


def _holdout_cut(tokens: int, holdout: float) -> int:
    return tokens - max(1, int(tokens * holdout))


@torch.no_grad()
def choose_ridge(z: torch.Tensor, y: torch.Tensor, grid: tuple[float, ...] = RIDGE_GRID,
                 holdout: float = HOLDOUT_FRACTION) -> float:
    """The ridge of `grid` whose fit on all but the last `holdout` of the tokens predicts those best."""
    cut = _holdout_cut(len(z), holdout)
    return _best_ridge(*_normal_equations(z[:cut], y[:cut]), z[cut:], y[cut:], grid)


@torch.no_grad()
def fit_layer(z: torch.Tensor, y: torch.Tensor, ridge: float | None = None) -> tuple[torch.Tensor, float]:
    """(W [d, n], ridge): `least_squares_down` on all tokens, the ridge given or chosen as `choose_ridge` does
    (the normal equations of the two token parts are computed once and added)."""
    if ridge is not None:
        return least_squares_down(z, y, ridge), ridge
    cut = _holdout_cut(len(z), HOLDOUT_FRACTION)
    gram, rhs = _normal_equations(z[:cut], y[:cut])
    ridge = _best_ridge(gram, rhs, z[cut:], y[cut:], RIDGE_GRID)
    test_gram, test_rhs = _normal_equations(z[cut:], y[cut:])
    return _solve(gram + test_gram, rhs + test_rhs, ridge), ridge


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def layer_outputs(decoder: nn.Module, layers: list[nn.Module], calib_ids: torch.Tensor) -> list[torch.Tensor]:
    """Each decoder layer's output hidden states [T, d] on `calib_ids` (one forward; forward hooks, so the final
    norm that `output_hidden_states` applies to the last entry is not in them)."""
    outs: list[torch.Tensor] = [torch.empty(0)] * len(layers)

    def hook_for(i: int):
        def hook(module, args, output):
            out = _layer_output(output)
            outs[i] = out.reshape(-1, out.shape[-1]).detach().clone()
        return hook

    hooks = [layer.register_forward_hook(hook_for(i)) for i, layer in enumerate(layers)]
    try:
        decoder(input_ids=calib_ids)
    finally:
        for h in hooks:
            h.remove()
    return outs


def stream_target(decoder: nn.Module, num_ffns: int, calib_ids: torch.Tensor,
                  weight: float) -> tuple[list[nn.Module], list[torch.Tensor], float]:
    """The `stream` argument of `refit_sequentially`: the residual modules and the layer outputs of `decoder`,
    which must compute the dense model now (one forward of `calib_ids`; memory: layers x tokens x d floats)."""
    from dotmoe.errors import DotMoeError

    layers = list(getattr(decoder, "layers", []))
    residual = [getattr(layer, "post_attention_layernorm", None) for layer in layers]
    if len(layers) != num_ffns or None in residual or \
            any(hasattr(layer, "post_feedforward_layernorm") for layer in layers):
        raise DotMoeError("--refit-stream needs Llama-shaped decoder layers (out = residual + FFN, the FFN input "
                          "normalised by post_attention_layernorm); this model's are not")
    return residual, layer_outputs(decoder, layers, calib_ids), weight


@torch.no_grad()
def refit_sequentially(decoder: nn.Module, modules: list[nn.Module], problems: list[LayerProblem],
                       calib_ids: torch.Tensor, ridge: float | None = None, progress: bool = False,
                       stream: tuple[list[nn.Module], list[torch.Tensor], float] | None = None,
                       ) -> tuple[list[float], list[float]]:
    """Refit every layer's down projection in one forward of `calib_ids` [B, S] through `decoder`.

    `modules[i]` is the FFN module whose input is layer i's x; `problems[i](x)` builds that layer's least-squares
    problem (called before its forward, so the forward already uses the refitted weight). `ridge` None: chosen
    per layer on held-out calibration tokens (`choose_ridge`). Returns each layer's relative error
    ||y - W' z|| / ||y|| on the calibration tokens after the refit, and its ridge.

    `stream` = (residual modules, dense layer outputs, weight): also correct the drift of the residual stream.
    `residual[i]`'s input is layer i's residual stream just before the FFN is added (r), `dense[i]` the dense
    model's layer-i output on the same tokens; the target becomes y + weight * (dense[i] - r - y), at weight 1
    the FFN output that puts the converted stream back on the dense one (Llama-shaped layers: out = r + FFN)."""
    errors: list[float] = [float("nan")] * len(modules)
    ridges: list[float] = [float("nan")] * len(modules)
    bar = tqdm(total=len(modules), desc="refit down_proj", unit="layer", disable=not progress)
    residual: list[torch.Tensor | None] = [None] * len(modules)

    def residual_hook_for(i: int):
        def hook(module, args):
            residual[i] = args[0].reshape(-1, args[0].shape[-1])
        return hook

    def hook_for(i: int):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            z, y, down = problems[i](x)
            if stream is not None:
                drift = stream[1][i].to(y.dtype) - residual[i].to(y.dtype) - y
                y = y + stream[2] * drift
                residual[i] = None
            weight, ridges[i] = fit_layer(z, y, ridge)
            down.weight.copy_(weight.to(down.weight.dtype))
            y = y.float()
            errors[i] = float((y - z.float() @ weight.float().t()).norm() / y.norm().clamp_min(1e-30))
            bar.update(1)
        return hook

    hooks = [m.register_forward_pre_hook(hook_for(i)) for i, m in enumerate(modules)]
    if stream is not None:
        hooks += [m.register_forward_pre_hook(residual_hook_for(i)) for i, m in enumerate(stream[0])]
    try:
        decoder(input_ids=calib_ids)
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    return errors, ridges


def moe_problem(moe: nn.Module) -> LayerProblem:
    """The least-squares problem of a MoeMLP: features h * gates, target the dense FFN output (the original down
    projection, kept by the MoeMLP before its first refit, so a second refit still targets the dense model)."""

    def build(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, nn.Linear]:
        mlp = moe.dense
        h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        return h * moe.neuron_gates(x).to(h.dtype), moe.dense_down(h), mlp.down_proj

    return build
