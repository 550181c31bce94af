"""The checks of a `ConvertConfig` at construction (dotmoe.config): each value's type, the named options and the
settings that only go together, and every number's range; each raises `DotMoeError` saying what to change."""

from __future__ import annotations

import math
from dataclasses import fields

from dotmoe.errors import DotMoeError
from dotmoe.export_formats import FORMATS as EXPORT_FORMATS
from dotmoe.router import GATING_MODES

METHODS = ("dotmoe", "random", "sequential", "weight-kmeans", "activation", "hidden-kmeans-router", "prune")
TRAINABLE = ("auto", "router+assignment", "experts", "full")
AFFINITY_INITS = ("coactivation", "weight-kmeans", "random")
ROUTER_INITS = ("lstsq", "lstsq-topk", "random")


def check_types(cfg) -> None:
    """Each value has its field's type. Floats also accept ints and numeric strings: YAML 1.1 reads `1e-4`
    (no dot) as the string '1e-4', which would otherwise reach the optimizer."""
    for f in fields(cfg):
        value, kind = getattr(cfg, f.name), f.type
        bad = DotMoeError(f"{f.name} must be {kind.replace(' | None', ' or null')}; got {value!r}")
        if kind == "float | None" and value is None:
            continue
        if kind in ("float", "float | None"):
            if isinstance(value, bool):
                raise bad
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise bad from None
            if not isinstance(value, (int, float)):
                raise bad
            setattr(cfg, f.name, float(value))
        elif kind in ("int", "int | None") and (isinstance(value, bool) or not isinstance(value, int)) and \
                not (kind == "int | None" and value is None):
            raise bad
        elif kind in ("str", "bool") and not isinstance(value, {"str": str, "bool": bool}[kind]):
            raise bad
        elif kind == "bool | None" and value is not None and not isinstance(value, bool):
            raise bad
        elif kind.startswith("list[") and value is not None:
            item = {"list[str]": str, "list[int] | None": int}[kind]
            if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, item) for v in value):
                raise bad


def check_choices(cfg) -> None:
    """Each named option is one of its choices, and the choices that exclude each other are not combined."""

    def choose(name: str, options: tuple[str, ...]) -> None:
        if getattr(cfg, name) not in options:
            raise DotMoeError(f"{name} must be one of {', '.join(options)}; got {getattr(cfg, name)!r}")

    choose("method", METHODS)
    choose("mode", ("joint", "layerwise"))
    if cfg.mode == "layerwise" and cfg.method == "prune":
        raise DotMoeError("--method prune has no layer-wise mode (it trains, with --tokens, in the joint mode)")
    choose("gating", GATING_MODES)
    choose("trainable", TRAINABLE)
    choose("init_affinity", AFFINITY_INITS)
    choose("init_router", ROUTER_INITS)
    from dotmoe.precision import MIXED_PRECISIONS, PRECISIONS

    choose("mixed_precision", MIXED_PRECISIONS)

    choose("precision", PRECISIONS)
    if cfg.precision == "bf16" and cfg.trains_weights:
        raise DotMoeError("--precision bf16 keeps the model's weights in bf16, so it trains only the router and "
                          "assignment (trainable router+assignment); use --precision fp32 to train weights")
    if cfg.precision == "bf16" and cfg.mode == "layerwise":
        raise DotMoeError("--precision bf16 is for the joint mode and --method prune; --mode layerwise runs fp32")
    choose("calibrate_on", ("dense", "converted"))
    if cfg.calibrate_on == "converted" and (cfg.tokens or cfg.mode != "joint" or cfg.init_from or
                                             not cfg.refit_down):
        raise DotMoeError("calibrate_on converted chooses each layer's partition and router inside the "
                          "down-projection refit: it needs the joint mode, training-free (--tokens 0), no "
                          "--init-from and --refit-down")
    choose("export_format", EXPORT_FORMATS + ("none",))


def check_combinations(cfg) -> None:
    """The sizes, budgets and modes that only go together (experts, top-k, shared/drop, capacities, init_from,
    prune, resume), counts >= 1 and the loss weights."""
    if cfg.experts < 2:
        raise DotMoeError(f"--experts must be >= 2, got {cfg.experts}")
    if not 1 <= cfg.top_k < cfg.experts:
        raise DotMoeError(f"--top-k must be between 1 and experts-1={cfg.experts - 1}, got {cfg.top_k}")
    if cfg.shared_fraction is not None and not 0 <= cfg.shared_fraction < 1:
        raise DotMoeError(f"shared_fraction must be in [0, 1), got {cfg.shared_fraction}")
    if cfg.shared is not None and cfg.shared < 0:
        raise DotMoeError(f"--shared must be >= 0, got {cfg.shared}")
    if cfg.drop is not None and cfg.drop < 0:
        raise DotMoeError(f"--drop must be >= 0, got {cfg.drop}")
    if cfg.drop and not cfg.shared and (cfg.shared is not None or cfg.shared_fraction == 0):
        raise DotMoeError("--drop needs a shared expert (--shared > 0): dropped neurons are the OT column after it")
    if cfg.capacities is not None and cfg.shared is None:
        cfg.shared = 0  # explicit expert sizes: the shared expert is what the user says (none by default)
    if cfg.capacities is not None and (len(cfg.capacities) != cfg.experts or min(cfg.capacities) < 1):
        raise DotMoeError(f"capacities must be {cfg.experts} sizes >= 1, got {cfg.capacities}")
    if cfg.global_tokens < 0:
        raise DotMoeError(f"global_tokens must be >= 0, got {cfg.global_tokens}")
    if cfg.global_tokens and cfg.mode != "layerwise":
        raise DotMoeError("global_tokens is the joint phase after --mode layerwise; in the joint mode use --tokens")
    if cfg.init_from and cfg.mode != "joint":
        raise DotMoeError("init_from starts a joint conversion; it does not apply to --mode layerwise")
    if cfg.method == "prune" and cfg.tokens and cfg.trainable not in ("auto", "full"):
        raise DotMoeError(f"--method prune --tokens N distills every weight of the pruned model (it has no router "
                          f"or assignment); trainable {cfg.trainable!r} does not apply: leave it at auto or full")
    if cfg.method == "prune" and cfg.tokens and cfg.resume:
        raise DotMoeError("--method prune --tokens N does not checkpoint (a baseline that trains in one go); "
                          "start it again with --overwrite instead of --resume")
    if cfg.init_from and cfg.method == "prune":
        raise DotMoeError("init_from needs an MoE method; --method prune has no partition to start from")
    if cfg.tokens is not None and cfg.tokens < 0:
        raise DotMoeError(f"tokens must be >= 0 (0 = training-free), got {cfg.tokens}")
    if not 0 <= cfg.refit_stream <= 1:
        raise DotMoeError(f"refit_stream must be in [0, 1], got {cfg.refit_stream}")
    for name in ("seq_len", "batch_size", "grad_accum", "sinkhorn_iters", "chunk_tokens", "val_tokens",
                 "calib_tokens", "eval_tokens", "checkpoint_every", "log_every", "max_bad_steps", "layer_steps"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise DotMoeError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.teacher_cache_mb < 0:
        raise DotMoeError(f"teacher_cache_mb must be >= 0 (0: no teacher cache), got {cfg.teacher_cache_mb}")
    if min(cfg.tau_start, cfg.tau_end, cfg.kl_temperature) <= 0:
        raise DotMoeError("tau_start, tau_end and kl_temperature must be > 0")
    if min(cfg.kl_weight, cfg.ce_weight, cfg.hidden_weight, cfg.z_weight, cfg.lb_weight) < 0 or \
            cfg.kl_weight + cfg.ce_weight == 0:
        raise DotMoeError("loss weights must be >= 0 with kl_weight + ce_weight > 0")


def check_ranges(cfg) -> None:
    """Every number in range, not only of the right type: floats finite, counts >= 0, learning rates,
    temperatures and the init scale > 0, the seed a valid RNG seed, and enough evaluation tokens."""
    from dotmoe.perplexity import MIN_EVAL_TOKENS

    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.type == "float" and not math.isfinite(value):
            raise DotMoeError(f"{f.name} must be a finite number, got {value!r}")
        if f.type == "int" and value < 0:
            raise DotMoeError(f"{f.name} must be >= 0, got {value}")
    for name in ("lr_router", "lr_weights", "init_scale"):
        if getattr(cfg, name) <= 0:
            raise DotMoeError(f"{name} must be > 0, got {getattr(cfg, name)}")
    for name in ("eval_every", "warmup_steps"):
        if getattr(cfg, name) < 0:
            raise DotMoeError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.lr_affinity < 0:
        raise DotMoeError(f"lr_affinity must be >= 0 (0 = a frozen partition), got {cfg.lr_affinity}")
    if cfg.lr_affinity == 0 and cfg.method == "dotmoe" and cfg.init_affinity == "random" and not cfg.init_from:
        raise DotMoeError("lr_affinity 0 freezes the starting partition, but init_affinity random has none (its "
                          "partition comes from the optimal transport); choose another init_affinity")
    if cfg.seed >= 2**32:
        raise DotMoeError(f"seed must be between 0 and 2**32 - 1, got {cfg.seed}")
    if cfg.eval_tokens < MIN_EVAL_TOKENS:
        raise DotMoeError(f"eval_tokens must be >= {MIN_EVAL_TOKENS} (a perplexity on fewer tokens means "
                          f"nothing), got {cfg.eval_tokens}")
    if not cfg.out:
        raise DotMoeError("out must be a directory path, got an empty string")
    if any(not d for d in cfg.data + cfg.eval_data):
        raise DotMoeError("data and eval_data must not hold empty file names")

