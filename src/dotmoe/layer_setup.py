"""A layer's starting point: its partition of the FFN neurons into experts and its router, from the method's
own partition and router, the least-squares router fit, or an earlier conversion (`init_from`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dotmoe.config import ConvertConfig
from dotmoe.errors import DotMoeError
from dotmoe.layer_runner import map_layer_inputs
from dotmoe.partitions import random_partition, sequential_partition, weight_kmeans_partition

# Scale of the lstsq router's logits (standardised scores times this). Softer logits bring the selected experts'
# softmax gates (k * p_e / sum_topk p) closer to 1, i.e. closer to the dense FFN; the top-k choice is unchanged.
# SmolLM2-135M, E=8/k=2, training-free: PPL ratio 39.4 / 34.6 / 35.1 / 35.7 at 1 / 0.3 / 0.1 / 0.01, and with the
# down-projection refit 6.02 at 1 vs 5.60 at 0.3.
LSTSQ_ROUTER_SCALE = 0.3
ROUTER_FIT_CHUNK = 4096  # tokens per chunk of the router fit's contribution norms


def lstsq_router(mlp: nn.Module, x: torch.Tensor, partition: torch.Tensor, num_experts: int,
                 top_k: int | None = None) -> torch.Tensor:
    """Analytic router init: least-squares map x -> standardised norm of each expert's output contribution
    ||(|h_i| * ||W_down[:, i]||)_{i in e}|| (output-aware: a neuron with a large down projection counts more),
    times LSTSQ_ROUTER_SCALE. With `top_k`: onto the standardised indicator of each token's top-k experts by that
    norm (the oracle's choice) instead of the norms themselves."""
    from dotmoe.output_aware import neuron_contributions

    members = [partition == e for e in range(num_experts)]
    scores = []
    for xs in x.split(ROUTER_FIT_CHUNK):  # in chunks: all tokens' contributions at once would be [tokens, N]
        contrib = neuron_contributions(mlp, xs)
        scores.append(torch.stack([contrib[:, m].norm(dim=-1) for m in members], dim=-1))
    scores = torch.cat(scores)
    if top_k:
        scores = torch.zeros_like(scores).scatter_(-1, scores.topk(top_k, dim=-1).indices, 1.0)
    scores = LSTSQ_ROUTER_SCALE * (scores - scores.mean(-1, keepdim=True)) / scores.std(-1, keepdim=True).clamp_min(1e-6)
    ridge = 1e-3 * x.pow(2).mean()
    w = torch.linalg.solve(x.t() @ x + ridge * x.shape[0] * torch.eye(x.shape[1]), x.t() @ scores)
    return w.t().contiguous()


@dataclass(frozen=True)
class PartitionKind:
    """How one starting partition is made: `make(mlp, x, caps, shared, gen)` -> (partition [N], router [E, d] or
    None), whether it needs the layer's FFN inputs x (calibration), and whether it gives its own router."""

    make: Callable[[nn.Module, torch.Tensor | None, torch.Tensor, int, torch.Generator],
                   tuple[torch.Tensor, torch.Tensor | None]]
    needs_inputs: bool
    gives_router: bool = False


def _activation(mlp, x, caps, shared, gen):
    from dotmoe.calibration_methods import activation_partition

    return activation_partition(mlp, x, caps, shared, gen)


def _hidden_kmeans(mlp, x, caps, shared, gen):
    from dotmoe.calibration_methods import hidden_kmeans_partition

    return hidden_kmeans_partition(mlp, x, caps, shared, gen)


def _coactivation(mlp, x, caps, shared, gen):
    from dotmoe.output_aware import coactivation_partition

    return coactivation_partition(mlp, x, caps, shared, gen), None


def _weight_kmeans(mlp, x, caps, shared, gen):
    return weight_kmeans_partition(mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), caps, gen), None


# every starting partition by name (a method's own, or dotmoe's `init_affinity`); `random` for dotmoe means the
# OT chooses from a random affinity, but its starting partition (unused then) is the random one
PARTITION_KINDS: dict[str, PartitionKind] = {
    "activation": PartitionKind(_activation, needs_inputs=True, gives_router=True),
    "hidden-kmeans-router": PartitionKind(_hidden_kmeans, needs_inputs=True, gives_router=True),
    "coactivation": PartitionKind(_coactivation, needs_inputs=True),
    "random": PartitionKind(lambda mlp, x, caps, shared, gen: (random_partition(caps, gen), None), needs_inputs=False),
    "sequential": PartitionKind(lambda mlp, x, caps, shared, gen: (sequential_partition(caps), None),
                                needs_inputs=False),
    "weight-kmeans": PartitionKind(_weight_kmeans, needs_inputs=False),
}


def partition_kind_named(kind: str) -> PartitionKind:
    """The registered partition `kind`; an unknown name is an error naming the known ones."""
    if kind not in PARTITION_KINDS:
        raise DotMoeError(f"unknown partition {kind!r}; known: {', '.join(PARTITION_KINDS)}")
    return PARTITION_KINDS[kind]


def layer_partition(kind: str, mlp: nn.Module, x: torch.Tensor | None, caps: torch.Tensor, shared: int,
                    gen: torch.Generator, drop: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer's starting partition [N] (shared column = id E, dropped column = id E+1) for a partition `kind`
    (`PARTITION_KINDS`), and the method's own analytic router [E, d] when it has one.

    With `drop` > 0 every kind first drops the `drop` least important neurons (output-aware importance, as
    pruning does) and partitions the rest its own way, so all methods lose the same neurons."""
    from dotmoe.output_aware import with_dropped_neurons

    if drop:
        return with_dropped_neurons(lambda sub, xs, sub_caps: layer_partition(kind, sub, xs, sub_caps, shared, gen),
                                    mlp, x, caps, drop)
    return partition_kind_named(kind).make(mlp, x, caps, shared, gen)


def partition_kind(cfg: ConvertConfig) -> str:
    """The partition a conversion starts from: the method's own, or for dotmoe its affinity init."""
    return cfg.init_affinity if cfg.method == "dotmoe" else cfg.method


def calibrate_layer(cfg: ConvertConfig, mlp: nn.Module, x: torch.Tensor | None, caps: torch.Tensor,
                    gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One layer's starting partition [N] and router [E, d] (the method's own, else the lstsq init when asked for
    and x is given, else None) from its FFN inputs x [T, d]."""
    part, router = layer_partition(partition_kind(cfg), mlp, x, caps, cfg.shared, gen, cfg.drop)
    if router is None and cfg.init_router != "random" and x is not None:
        router = lstsq_router(mlp, x, part, cfg.experts, cfg.router_fit_top_k)
    return part, router


def calibrate_during_refit(cfg: ConvertConfig, raw, caps: torch.Tensor):
    """`refit_sequentially`'s `prepare` (`raw`: the joint run's MoeTrainingModule) for `calibrate_on: converted`: layer i's partition and router are chosen on
    its inputs from the converted layers below (not the dense model's), then its down projection is refitted."""
    from dotmoe.rounding import one_hot_assignment

    gen = torch.Generator().manual_seed(cfg.seed)

    def prepare(i: int, x: torch.Tensor) -> None:
        moe = raw.moes[i]
        part, router = calibrate_layer(cfg, moe.dense, x, caps, gen)
        raw.assigner.affinity[i] = cfg.init_scale * torch.nn.functional.one_hot(part, len(caps)).float()
        moe.assignment = one_hot_assignment(part, len(caps))
        if router is not None:
            moe.router.weight.copy_(router)

    return prepare


def initial_partitions(cfg: ConvertConfig, model: nn.Module, mlps: list[nn.Module], caps: torch.Tensor,
                       calib: torch.Tensor | None, progress: bool = False
                       ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """Starting partition [L, N] of every layer (for baselines: the final one) and the starting routers (the
    method's analytic ones, else the lstsq init when asked for, else None: random). `calib` [B, S] are the
    calibration sequences (None for the methods that need no activations)."""
    gen = torch.Generator().manual_seed(cfg.seed)

    def layer(i: int, x: torch.Tensor | None):
        return calibrate_layer(cfg, mlps[i], x, caps, gen)

    pairs = map_layer_inputs(model, mlps, calib, layer, progress=progress) if calib is not None else \
        [layer(i, None) for i in range(len(mlps))]
    routers = [r for _, r in pairs]
    return torch.stack([p for p, _ in pairs]), None if routers[0] is None else routers


def starting_point(cfg: ConvertConfig, num_layers: int, num_neurons: int,
                   caps: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Partition [L, N] and routers of the conversion in `cfg.init_from`, checked against this conversion's shape."""
    from dotmoe.artifacts import load_conversion
    from dotmoe.gguf_input import resolve_model
    from dotmoe.paths import reference_model_dir

    start = load_conversion(cfg.init_from)
    record = start.record
    model = resolve_model(cfg.model or reference_model_dir()).resolve()
    if Path(record.base_model).resolve() != model:
        raise DotMoeError(f"--init-from {cfg.init_from} is a conversion of {record.base_model}, not of {model}")
    mine = {"experts": cfg.experts, "shared": cfg.shared, "drop": cfg.drop, "num_layers": num_layers,
            "intermediate_size": num_neurons, "capacities": caps.tolist()}
    theirs = {k: getattr(record, k) for k in mine}
    if theirs != mine:
        diff = ", ".join(f"{k} {theirs[k]} vs {v}" for k, v in mine.items() if theirs[k] != v)
        raise DotMoeError(f"--init-from {cfg.init_from} does not match this conversion: {diff}")
    if record.top_k != cfg.top_k or record.gating != cfg.gating:
        raise DotMoeError(f"--init-from {cfg.init_from} was trained with top_k {record.top_k} and "
                          f"{record.gating} gating; this conversion uses top_k {cfg.top_k} and {cfg.gating}")
    return start.partition, start.routers


def refitted_down_projections(init_from: str, mlp_names: list[str]) -> list[torch.Tensor] | None:
    """The down projections a (training-free) `--init-from` conversion refitted, one per MLP, when it holds exactly
    those (its other weights untouched); else None. Training from such a start needs no refit of its own: they
    were fitted for the partition and routers it starts from."""
    from safetensors.torch import load_file

    from dotmoe.artifacts import TRAINED_WEIGHTS_FILE

    file = Path(init_from) / TRAINED_WEIGHTS_FILE
    if not file.is_file():
        return None
    try:
        weights = load_file(str(file))
    except Exception as exc:  # safetensors raises several types for truncated or foreign files
        raise DotMoeError(f"--init-from: corrupt convert output: {file}: {exc}") from exc
    names = [f"{n}.down_proj.weight" for n in mlp_names]
    if set(weights) != set(names):
        return None
    return [weights[n].float() for n in names]
