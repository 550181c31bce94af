"""Training-free reconstruction: refit the FFN down projections by least squares once the sparsity is fixed.

A converted FFN keeps, for each token, only the neurons of its active experts (or, pruned, a fixed subset).
The dense output it should reproduce is y = W_down h; what it computes is W_down (h * g), g the per-neuron gate.
Because the kept neurons are correlated with the ones a token loses, a new W_down fitted on calibration tokens,

    W' = argmin_W sum_t ||y_t - W z_t||^2 + ridge ||W||^2,   z_t = h_t * g_t,

recovers much of what the missing neurons added (the same idea as pruning with reconstruction, e.g. FLAP or
SparseGPT's layer-wise least squares). The ridge is chosen per layer on held-out calibration tokens. Only W_down
changes, column by column, so every expert keeps its shape and
the export stays a stock MoE checkpoint.

The refit is sequential: the calibration tokens go through the converted decoder one layer at a time
(dotmoe.layer_runner, a chunk of sequences per call), each layer refitted on the inputs that the already-converted
layers below it produce, so it also absorbs their error, with the dense FFN's output on those same inputs as the
target. The normal equations are accumulated chunk by chunk, so memory does not grow with the number of
calibration tokens beyond their hidden states (tokens x d). No library does this for a MoE gate pattern, hence the
few lines here.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from dotmoe.architecture import ffn_activations
from dotmoe.layer_runner import CHUNK_SEQUENCES, LayerRunner

# Ridge (times the mean diagonal of Z^T Z) candidates; each layer takes the one with the lowest error on held-out
# calibration tokens. A fixed value is wrong at one end or the other: on SmolLM2 at 25% active, 1e-4 is best with
# 16k calibration tokens (PPL ratio 6.0 vs 6.4 at 1e-2) but overfits with 4k (19.1 vs 10.3 at 1e-2; chosen per
# layer from 1e-5..1e-1: 9.2, most layers taking 1e-1, hence the grid goes on to 1).
RIDGE_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
HOLDOUT_FRACTION = 0.125


@dataclass
class LayerProblem:
    """One layer's least-squares problem: `build` maps the FFN's inputs x [T, d] (one chunk of tokens; called
    once per chunk, so it must not change the model) to (features z [T, n], target y [T, d]); `apply` puts the
    fitted weight [d, n] into the model."""

    build: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    apply: Callable[[torch.Tensor], None]


@dataclass
class StreamTarget:
    """`refit_sequentially`'s residual-stream correction (`refit_stream`): `residual[i]`'s input is layer i's
    residual stream just before the FFN is added, `dense_mode()` a context in which layer i computes the dense
    model's layer (while its problem is being built), `weight` in (0, 1]."""

    residual: list[nn.Module]
    weight: float
    dense_mode: Callable[[], AbstractContextManager]


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
    problem = _Accumulator(_holdout_cut(len(z), HOLDOUT_FRACTION))
    problem.add(z, y)
    weight, ridge, _ = problem.solve()
    return weight, ridge


class _Accumulator:
    """A least-squares problem filled chunk by chunk: the normal equations of its first `cut` tokens (the fitting
    part) and the last tokens themselves (held out, to choose the ridge on; 1/8 of them, so they stay small)."""

    def __init__(self, cut: int):
        self.cut, self.seen = cut, 0
        self.gram: torch.Tensor | float = 0.0
        self.rhs: torch.Tensor | float = 0.0
        self.test_z: list[torch.Tensor] = []
        self.test_y: list[torch.Tensor] = []

    def add(self, z: torch.Tensor, y: torch.Tensor) -> None:
        fit = min(max(self.cut - self.seen, 0), len(z))
        if fit:
            gram, rhs = _normal_equations(z[:fit], y[:fit])
            self.gram, self.rhs = self.gram + gram, self.rhs + rhs
        if fit < len(z):
            self.test_z.append(z[fit:].float())
            self.test_y.append(y[fit:].float())
        self.seen += len(z)

    def solve(self, ridge: float | None = None) -> tuple[torch.Tensor, float, float]:
        """(W [d, n] fitted on all tokens, its ridge (given, or the best of RIDGE_GRID on the held-out tokens when
        fitted on the others), W's relative error on the held-out tokens)."""
        test_z, test_y = torch.cat(self.test_z), torch.cat(self.test_y)
        test_gram, test_rhs = _normal_equations(test_z, test_y)
        if not isinstance(self.gram, torch.Tensor):  # every token held out (a one-token problem)
            self.gram, self.rhs = torch.zeros_like(test_gram), torch.zeros_like(test_rhs)
        if ridge is None:
            ridge = _best_ridge(self.gram, self.rhs, test_z, test_y, RIDGE_GRID)
        weight = _solve(self.gram + test_gram, self.rhs + test_rhs, ridge)
        error = float((test_y - test_z @ weight.float().t()).norm() / test_y.norm().clamp_min(1e-30))
        return weight, ridge, error


def stream_target(decoder: nn.Module, num_ffns: int, weight: float,
                  dense_mode: Callable[[], AbstractContextManager]) -> StreamTarget:
    """The `stream` argument of `refit_sequentially` for `decoder`'s layers, checked to be Llama-shaped (out =
    residual + FFN, the FFN's input normalised by post_attention_layernorm)."""
    from dotmoe.errors import DotMoeError

    layers = list(getattr(decoder, "layers", []))
    residual = [getattr(layer, "post_attention_layernorm", None) for layer in layers]
    if len(layers) != num_ffns or None in residual or \
            any(hasattr(layer, "post_feedforward_layernorm") for layer in layers):
        raise DotMoeError("--refit-stream needs Llama-shaped decoder layers (out = residual + FFN, the FFN input "
                          "normalised by post_attention_layernorm); this model's are not")
    return StreamTarget(residual, weight, dense_mode)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


@torch.no_grad()
def _layer_problem(runner: LayerRunner, i: int, hidden: torch.Tensor, module: nn.Module, builder: LayerProblem,
                   problem: "_Accumulator", chunk: int, stream: StreamTarget | None,
                   dense_out: torch.Tensor | None) -> "_Accumulator":
    """Layer i's least-squares problem accumulated over every chunk of `hidden` (its inputs), running the layer only
    up to its FFN; with `stream`, the target also pulls the residual back to the dense layer's output `dense_out`."""
    state: dict[str, torch.Tensor] = {}
    chunks = iter(range(len(hidden.split(chunk))))

    def collect(x: torch.Tensor) -> None:
        z, y = builder.build(x)
        if stream is not None:
            c = next(chunks)
            dense = _rows(dense_out[c * chunk: (c + 1) * chunk])
            y = y + stream.weight * (dense.to(y.dtype) - state["residual"].to(y.dtype) - y)
        problem.add(z, y)

    hooks = []
    if stream is not None:
        hooks.append(stream.residual[i].register_forward_pre_hook(
            lambda module, args: state.__setitem__("residual", _rows(args[0]))))
    try:  # the layer only up to its FFN's input: the FFN's own output is not needed to build the problem
        runner.feed(i, hidden, module, collect)
    finally:
        for hook in hooks:
            hook.remove()
    return problem


@torch.no_grad()
def refit_sequentially(decoder: nn.Module, modules: list[nn.Module], problems: list[LayerProblem],
                       calib_ids: torch.Tensor, ridge: float | None = None, progress: bool = False,
                       stream: StreamTarget | None = None, chunk: int = CHUNK_SEQUENCES,
                       prepare: Callable[[int, torch.Tensor], None] | None = None,
                       ) -> tuple[list[float], list[float]]:
    """Refit every layer's down projection on `calib_ids` [B, S], layer by layer through `decoder`.

    `modules[i]` is the FFN module of decoder layer i; `problems[i]` builds its least-squares problem from that
    module's inputs. Layer i runs once on every chunk to accumulate its problem, gets its weight, then runs again
    to give the layer above its (now converted) inputs. `ridge` None: chosen per layer on held-out calibration
    tokens (the last 1/8). Returns each layer's relative error ||y - W' z|| / ||y|| on those held-out tokens after
    the final fit (which also saw them), and its ridge.

    `stream`: also correct the drift of the residual stream. With r the converted residual before the FFN and
    D the dense model's layer output, both on the same tokens (the dense model's own stream runs alongside),
    the target becomes y + weight * (D - r - y), at weight 1 the FFN output that puts the converted stream back
    on the dense one (Llama-shaped layers: out = r + FFN).

    `prepare(i, x)`: called with layer i's inputs x [T, d] (all tokens, from the converted layers below) before its
    problem is built, e.g. to choose that layer's partition and router on them (one more pass over the layer)."""
    runner = LayerRunner(decoder, calib_ids, chunk)
    if len(modules) != len(runner):
        from dotmoe.errors import DotMoeError

        raise DotMoeError(f"{len(modules)} FFN modules for {len(runner)} decoder layers: the refit needs one gated "
                          "FFN per decoder layer")
    cut = _holdout_cut(calib_ids.numel(), HOLDOUT_FRACTION)
    errors: list[float] = [float("nan")] * len(modules)
    ridges: list[float] = [float("nan")] * len(modules)
    hidden = dense_hidden = runner.hidden
    for i in tqdm(range(len(modules)), desc="refit down_proj", unit="layer", disable=not progress):
        if prepare is not None:
            inputs: list[torch.Tensor] = []
            runner.feed(i, hidden, modules[i], lambda x: inputs.append(x.float()))
            prepare(i, torch.cat(inputs))
            del inputs
        dense_out = None
        if stream is not None:  # the dense model's layer i on the dense stream (before any hook is registered)
            with stream.dense_mode():
                dense_out = runner.run(i, dense_hidden)
        problem = _layer_problem(runner, i, hidden, modules[i], problems[i], _Accumulator(cut), chunk, stream,
                                 dense_out)
        weight, ridges[i], errors[i] = problem.solve(ridge)
        problems[i].apply(weight)
        hidden = runner.run(i, hidden)
        if dense_out is not None:
            dense_hidden = dense_out
    return errors, ridges


def moe_problem(moe: nn.Module) -> LayerProblem:
    """The least-squares problem of a MoeMLP: features h * gates, target the dense FFN output (the original down
    projection, kept by the MoeMLP before its first refit, so a second refit still targets the dense model)."""
    mlp = moe.dense

    def build(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = ffn_activations(mlp, x)
        return h * moe.neuron_gates(x).to(h.dtype), moe.dense_down(h)

    return LayerProblem(build, lambda weight: mlp.down_proj.weight.copy_(weight.to(mlp.down_proj.weight.dtype)))
