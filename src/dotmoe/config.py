"""The conversion config: one typed dataclass, validated at construction, loadable from YAML."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from dotmoe.config_checks import check_choices, check_combinations, check_ranges, check_types
from dotmoe.errors import DotMoeError

# learning rates by what trains (SmolLM2-135M at 25% active, 32k tokens from one training-free start, validation
# PPL 119.6 at the start; benchmarks/results/train_recipes_smollm2-135m-instruct_c16384.md): every weight at 1e-4 with
# router 1e-4 / affinity 1e-3 reached 89.9 after 16k tokens (3e-5: 94.7); router + assignment alone at 3e-3 / 0.05
# reached 113.7 (their rates before; at those rates the router reshuffles its lstsq routing within a few steps).
# The weights' rate from the default 65,536-token start (validation 111.9; _c65536.md): after 32k tokens 79.1 at 1e-4,
# 74.8 at 3e-4, 78.8 at 1e-3
LEARNING_RATES = {"router+assignment": {"lr_router": 3e-3, "lr_affinity": 0.05},
                  "weights": {"lr_router": 1e-4, "lr_affinity": 1e-3}}
# training tokens of a joint conversion when --tokens is not given: the measured recipe above (262,144 tokens: 30
# minutes on one core of an AMX CPU for SmolLM2-135M, within one epoch of the bundled 437,736-token train split)
DEFAULT_TRAIN_TOKENS = 262_144


@dataclass
class ConvertConfig:
    """Every knob of `dotmoe convert` (CLI flags override YAML values, which override these defaults)."""

    model: str = ""
    data: list[str] = field(default_factory=list)
    out: str = "out/dotmoe"
    method: str = "dotmoe"
    mode: str = "joint"  # joint (end-to-end KL) | layerwise (one layer at a time, low memory)
    layer_steps: int = 100  # layerwise: optimizer steps per layer
    global_tokens: int = 0  # layerwise: tokens of joint end-to-end KL training after the layer-wise pass (0 = none)
    # joint: start from an earlier conversion's partition and routers (e.g. a layer-wise one), and from its refitted
    # down projections when it refitted them (no refit before training then: they fit that partition and routers)
    init_from: str = ""
    experts: int = 8
    top_k: int = 2
    # Always-on neurons. By default a `shared_fraction` of the active FFN budget (k/E of the neurons) is an
    # always-on shared expert and the least useful neurons are dropped, so the active budget stays exactly k/E:
    # shared = fraction * N * k / E, drop = shared * (E / k - 1). `shared` / `drop` set neuron counts directly
    # (an explicit `shared` alone adds the shared expert on top of the k/E budget, with drop 0).
    shared_fraction: float | None = None  # None = auto_shared_fraction(k / E)
    shared: int | None = None
    drop: int | None = None  # neurons removed entirely (an OT column whose gate is 0); needs a shared expert
    capacities: list[int] | None = None
    gating: str = "softmax"
    # training tokens; 0 = training-free (partition, router init and refit only). None (default): DEFAULT_TRAIN_TOKENS
    # in the joint mode, while --mode layerwise trains layer_steps per layer (--tokens 0 makes either training-free).
    # Training pays: SmolLM2-135M at 25% active, from the default 65,536-token start, wiki test PPL ratio 5.03
    # training-free -> 2.54 after 262,144 tokens in bf16 (30 minutes on one core of an AMX CPU;
    # benchmarks/results/train_recipes_smollm2-135m-instruct_c65536_xeon.md)
    tokens: int | None = None
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    # what trains: auto = every weight ("full") in a joint run with training tokens, else router+assignment (the
    # layer-wise mode, and nothing trains training-free); a run that full training would not fit in memory fails
    # before it starts and says what to pass instead
    trainable: str = "auto"
    # None: by what trains (LEARNING_RATES). lr_affinity 0 = the starting partition stays frozen
    lr_affinity: float | None = None
    lr_router: float | None = None
    lr_weights: float = 3e-4
    warmup_steps: int | None = None  # None: an eighth of the steps (at least 1); the learning rate then decays (cosine)
    tau_start: float = 1.0
    tau_end: float = 0.1
    sinkhorn_iters: int = 100
    init_affinity: str = "coactivation"
    init_scale: float = 1.0
    init_router: str = "lstsq"
    # calibration tokens (partition, router init, refit). None: 65,536 in the joint mode (on SmolLM2 at 25% active,
    # training-free: PPL ratio 5.64 at 16,384, 5.03 at 65,536, 4.90 at 131,072, for ~2.7x / ~4.9x the 16,384 run's
    # wall time (399 s -> 1,081 s / 1,964 s, cores shared with other jobs); the calibration runs layer by layer, so
    # memory grows only with tokens x d), 16,384 in the layer-wise mode, which
    # keeps every calibration token's FFN inputs and outputs to train each layer on
    calib_tokens: int | None = None
    # where each layer's partition and router are computed from: the dense model's FFN inputs ("dense"), or, during
    # the sequential refit, the inputs the already-converted layers below give it ("converted"; training-free only)
    calibrate_on: str = "dense"
    # after the partition and routers are final: refit each FFN's down projection by least squares so the sparse
    # FFN reproduces the dense one on the calibration tokens, layer by layer (dotmoe.refit). Training-free; joint
    # mode with frozen FFN weights (router+assignment) and --method prune. On SmolLM2 at 25% active: PPL ratio 34.6
    # -> 6.0.
    refit_down: bool = True
    # with refit_down and training (tokens > 0): refit once more before training, so the router and assignment are
    # trained for the refitted FFNs they end with, and trained FFN weights start from the refitted ones (the dense
    # teacher keeps the original weights)
    refit_before_training: bool = True
    # and then refit again after training (frozen FFN weights only); off by default: the router and assignment were
    # trained for the refitted FFNs, and a second refit undid most of that (SmolLM2 at 25% active, 32k tokens:
    # validation PPL 119.6 at the start, 113.7 after training, 118.0 after the second refit)
    refit_after_training: bool = False
    # refit target: the dense FFN's output on the converted inputs (0), or also the residual stream's drift from the
    # dense model's (weight in (0, 1]; Llama-shaped layers, where out = residual + FFN), see dotmoe.refit
    refit_stream: float = 0.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    # intermediate-layer distillation: each decoder layer's output matched to the dense teacher's (relative squared
    # error, mean over layers; TinyBERT / MiniLM-style hidden-state distillation); 0 = the final KL only
    hidden_weight: float = 0.0
    z_weight: float = 1e-3
    lb_weight: float = 1e-2
    kl_temperature: float = 1.0
    # tokens per LM-head chunk of the loss: at most chunk_tokens x vocab logits at once (SmolLM2, router+assignment
    # training: peak RSS 3,167 MB at 1024, 2,557 MB at 256, same loss and tokens/s)
    chunk_tokens: int = 256
    # memory for the frozen teacher's outputs of the training sequences, reused in the passes after the first over a
    # corpus smaller than the token budget (dotmoe.teacher_cache: same result, the teacher's forward skipped); 0: off
    teacher_cache_mb: int = 2048
    # accelerate's autocast for training (no | bf16 | fp16; fp32 master weights and optimizer). auto: bf16 when the
    # model's weights train on hardware with fast bf16 (dotmoe.precision.resolve_mixed_precision), else no
    mixed_precision: str = "auto"
    # compute dtype (dotmoe.precision): auto = bf16 where a probe matmul shows the hardware runs it fast, else fp32;
    # bf16 stores the frozen weights in bf16 (joint mode and prune; trainable router+assignment only)
    precision: str = "auto"
    # recompute each decoder layer in the backward (activation memory / L, one more student forward). None (auto):
    # only when training without it might not fit in memory (dotmoe.training_memory)
    gradient_checkpointing: bool | None = None
    # torch.compile the decoder layers for training (dotmoe.compiled; same method, float rounding of fused
    # kernels). None (auto): on one process, runs of >= 64 steps of models >= 50M parameters
    compile: bool | None = None
    eval_data: list[str] = field(default_factory=list)
    eval_tokens: int = 32_768
    # validation perplexity (eval_data) of the MoE at the start of training and every eval_every optimizer steps
    # (0 = only at the end); with keep_best the run ends with the trainable state of its best validation point
    # (the start included), so training never leaves a model worse on validation than the one it started from
    eval_every: int | None = None  # None: a quarter of the steps when training; 0: only at the end
    keep_best: bool = True
    # tokens of eval_data scored at the start of training and every eval_every steps (the first of them); the final
    # perplexity scores eval_tokens
    val_tokens: int = 8192
    checkpoint_every: int = 50
    max_bad_steps: int = 3  # consecutive non-finite steps (each reverted and skipped) before giving up
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # replace a finished conversion or an interrupted run's checkpoint in `out`
    trust_remote_code: bool = False
    export_format: str = "auto"  # written to <out>/model at the end; "none" skips the export

    def __post_init__(self) -> None:
        check_types(self)
        self._resolve_training()
        check_choices(self)
        check_combinations(self)
        check_ranges(self)

    def _resolve_training(self) -> None:
        """tokens, trainable auto, the learning rates left None and eval_every None, from the run's own settings."""
        if self.tokens is None and self.mode == "joint":
            self.tokens = DEFAULT_TRAIN_TOKENS
        if self.trainable == "auto":
            self.trainable = "full" if self.tokens and self.mode == "joint" else "router+assignment"
        rates = LEARNING_RATES["weights" if self.trains_weights else "router+assignment"]
        for name, value in rates.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        sizes_ok = all(isinstance(v, int) and v >= 1 for v in (self.batch_size, self.grad_accum, self.seq_len))
        steps = self.steps if sizes_ok else 0
        if self.eval_every is None:  # five evaluations in a joint run: the start, every quarter, the end
            trains = self.mode == "joint" and steps > 0
            self.eval_every = max(1, steps // 4) if trains else 0
        if self.warmup_steps is None:
            self.warmup_steps = max(1, steps // 8) if steps else 0

    @property
    def router_fit_top_k(self) -> int | None:
        """The `top_k` argument of the analytic router fit (`layer_setup.lstsq_router`): k for lstsq-topk, else None."""
        return self.top_k if self.init_router == "lstsq-topk" else None

    @property
    def learns_assignment(self) -> bool:
        """Whether the neuron -> expert assignment is learned (DOT-MoE with lr_affinity > 0), not a fixed partition."""
        return self.method == "dotmoe" and self.lr_affinity > 0

    @property
    def trains_weights(self) -> bool:
        """Whether the model's own weights train (trainable experts or full), not only routers and assignment."""
        return self.trainable != "router+assignment"

    @property
    def trains_layers(self) -> bool:
        """--mode layerwise: whether each layer is trained (layer_steps) or converted training-free."""
        return self.tokens != 0

    @property
    def calibration_tokens(self) -> int:
        """`calib_tokens`, or its mode's default when None."""
        if self.calib_tokens is not None:
            return self.calib_tokens
        return 16_384 if self.mode == "layerwise" else 65_536

    @property
    def steps(self) -> int:
        """Joint-mode optimizer steps; 0 for a training-free conversion (tokens 0 or None)."""
        if not self.tokens:
            return 0
        return max(1, self.tokens // (self.batch_size * self.grad_accum * self.seq_len))

    def tau_at(self, step: int, steps: int) -> float:
        """Sinkhorn temperature at `step` of `steps`: geometric from tau_start to tau_end."""
        return self.tau_start * (self.tau_end / self.tau_start) ** (step / max(1, steps - 1))

    def column_capacities(self, num_neurons: int) -> list[int]:
        """OT column sizes: the routed experts' capacities, then the shared expert's and the dropped neurons' (when
        there are such)."""
        from dotmoe.sinkhorn import capacities

        self.resolve_shared(num_neurons)
        routed = capacities(num_neurons - self.shared - self.drop, self.experts, self.capacities)
        return routed + ([self.shared] if self.shared else []) + ([self.drop] if self.drop else [])

    def derive(self, **changes) -> "ConvertConfig":
        """A copy with `changes` (dataclasses.replace) that keeps what the user asked for shared/drop."""
        from dataclasses import replace

        new = replace(self, **changes)
        if hasattr(self, "requested_shared"):
            new.requested_shared = self.requested_shared
        return new

    def global_phase(self) -> "ConvertConfig":
        """The joint run that continues a layer-wise pass in `out/layerwise` (`global_tokens` of KL training)."""
        from dotmoe.run_dir import LAYERWISE_DIR

        # overwrite is off: OUT was cleared (when asked) before the layer-wise pass
        return self.derive(mode="joint", tokens=self.global_tokens, global_tokens=0,
                           init_from=str(Path(self.out) / LAYERWISE_DIR), overwrite=False)

    def to_dict(self, requested: bool = False) -> dict:
        """The fields as a dict; `requested=True` gives shared/drop as the user asked for them (None = derived from
        shared_fraction), which is what a run's identity depends on, whether or not they were resolved yet."""
        out = asdict(self)
        if requested and hasattr(self, "requested_shared"):
            out["shared"], out["drop"] = self.requested_shared
        return out

    def fit_shared_to_export(self, dense_config: dict) -> str:
        """When the shared expert comes from the default `shared_fraction` but the model's MoE format has no shared
        expert (Qwen3-MoE; Mistral's sliding window in Qwen2-MoE), fall back to a plain MoE (shared_fraction 0) and
        return a one-line warning ('' when nothing changed). An explicit --shared (0 included) that the format
        cannot hold fails here, before any work."""
        from dotmoe.export_formats import plan_export

        if self.export_format == "none":
            return ""
        if self.shared:
            plan_export(dense_config, self.export_format, self.shared, self.gating, self.top_k)
            return ""
        if self.shared is not None or self.shared_fraction == 0:  # none asked for: the format must hold none
            plan_export(dense_config, self.export_format, 0, self.gating, self.top_k)
            return ""
        try:
            plan_export(dense_config, self.export_format, 1, self.gating, self.top_k)
        except DotMoeError as exc:
            self.shared_fraction = 0.0
            return f"warning: no always-on shared expert for this model ({exc}); converting a plain MoE instead"
        return ""

    def resolve_shared(self, num_neurons: int) -> None:
        """Turn `shared_fraction` into neuron counts for a model with `num_neurons` FFN neurons (in place)."""
        if not hasattr(self, "requested_shared"):  # what the user asked for (None = from shared_fraction)
            self.requested_shared = (self.shared, self.drop)
        if self.shared is None:
            budget = num_neurons * self.top_k / self.experts  # active neurons per token
            fraction = auto_shared_fraction(self.top_k / self.experts) if self.shared_fraction is None \
                else self.shared_fraction
            per_expert = int(budget * (1 - fraction) / self.top_k)
            self.shared = int(round(budget)) - self.top_k * per_expert if fraction else 0
            if self.drop is None:  # without a shared expert the remainder is routed (dropped neurons need one)
                self.drop = num_neurons - self.shared - self.experts * per_expert if self.shared else 0
        if self.drop is None:
            self.drop = 0

    def validate_for(self, num_neurons: int) -> None:
        """Resolve the shared/dropped neuron counts, then check what needs the model: capacities sum to
        N - shared - drop, shared + drop < N, every expert non-empty."""
        self.resolve_shared(num_neurons)
        if self.shared + self.drop >= num_neurons:
            raise DotMoeError(f"--shared {self.shared} + --drop {self.drop} must be smaller than the intermediate "
                              f"size {num_neurons}")
        if self.drop and not self.shared:
            raise DotMoeError(f"--drop {self.drop} needs a shared expert (--shared > 0): dropped neurons are the OT "
                              "column after it")
        routed = num_neurons - self.shared - self.drop
        if self.capacities is not None and sum(self.capacities) != routed:
            raise DotMoeError(f"capacities sum to {sum(self.capacities)}, but the routed neurons number {routed}"
                              f" (intermediate size {num_neurons} - shared {self.shared} - drop {self.drop})")
        if routed < self.experts:
            raise DotMoeError(f"{routed} routed neurons cannot fill {self.experts} experts")


def auto_shared_fraction(active: float) -> float:
    """The default share of the active budget that is always on, for an active FFN fraction `active` = k/E.

    Measured on SmolLM2-135M, training-free (benchmarks/results/real_models.md): at 25% active 0.25 beats 0.5 (wiki
    PPL ratio 36.9 vs 43.7); at 50% active 0.75 beats 0.25 (6.85 vs 14.8; static pruning 9.37). The larger the
    budget, the more of it should be static: linear between those two points, clamped to [0.25, 0.75]."""
    return min(0.75, max(0.25, 2 * active - 0.25))


def load_yaml_config(path: str | Path) -> dict:
    """Read a YAML config mapping; unknown keys are rejected with the closest valid key suggested."""
    path = Path(path)
    if not path.is_file():
        raise DotMoeError(f"config file not found: {path}" if not path.exists() else
                          f"--config {path} is {'a directory' if path.is_dir() else 'not a regular file'}; give a "
                          "YAML file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DotMoeError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict):
        raise DotMoeError(f"config {path} must be a mapping of option: value")
    known = {f.name for f in fields(ConvertConfig)}
    for key in raw:
        normalised = str(key).replace("-", "_")
        if normalised not in known:
            hint = difflib.get_close_matches(normalised, known, n=1)
            raise DotMoeError(f"unknown config key {key!r} in {path}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    return {str(k).replace("-", "_"): v for k, v in raw.items()}
