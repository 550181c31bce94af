"""The pieces of DOT-MoE's joint training: the training module (the MoE model + assigner whose forward returns one
batch's loss terms against the dense teacher), the down-projection refit, and a run's start (accelerate, seeds,
precision, the loaded model). The recipe that strings them together is `dotmoe.joint_recipe`.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from dotmoe.assignment import AssignmentStats, NeuronAssigner
from dotmoe.compiled import compile_by_default
from dotmoe.config import ConvertConfig
from dotmoe.errors import DotMoeError
from dotmoe.losses import distillation_terms, expert_load_cv, load_balancing_loss, router_z_loss
from dotmoe.moe_mlp import MoeMLP, moe_disabled, recorded_routing
from dotmoe.precision import PrecisionChoice, choose_precision
from dotmoe.prepare import Prepared, prepare
from dotmoe.router import RouterOutput
from dotmoe.teacher_cache import TeacherCache
from dotmoe.training_memory import check_training_memory, use_gradient_checkpointing

if TYPE_CHECKING:  # accelerate and the stage peaks load lazily, when a run starts
    from accelerate import Accelerator

    from dotmoe.resources import StagePeaks


class MoeTrainingModule(nn.Module):
    """Model with MoE-ified MLPs + assigner; forward returns the loss terms of one batch."""

    def __init__(self, model: nn.Module, assigner: NeuronAssigner, moes: list[MoeMLP], cfg: ConvertConfig,
                 teacher: nn.Module | None):
        super().__init__()
        self.model, self.assigner, self.cfg = model, assigner, cfg
        self.moes = moes
        self.teacher = teacher  # a frozen copy, only when the FFN weights themselves are trained
        self.teacher_cache: TeacherCache | None = None  # the copy's outputs by sequence (set by the run's setup)
        self.routing: list[RouterOutput | None] = []  # each layer's router output in the last forward (for reports)
        # accelerate's FSDP auto-wrap reads the decoder layer class from here: one FSDP unit per decoder layer
        self._no_split_modules = list(getattr(model, "_no_split_modules", None) or [])

    def set_assignment(self, tau: float) -> AssignmentStats:
        """Solve this step's assignment at temperature `tau`, hand each MoE layer its matrix; return the stats."""
        matrices, stats = self.assigner.refresh(tau)
        for layer, moe in enumerate(self.moes):
            moe.assignment = matrices[layer]
        return stats

    def forward(self, input_ids: torch.Tensor, tau: float, seq_ids: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """The batch's loss terms; `seq_ids`: the batch's sequence indices, for the teacher cache."""
        cfg = self.cfg
        marginal_error = self.set_assignment(tau).marginal_error
        base, head = self.model.get_decoder(), self.model.get_output_embeddings()
        layers_too = cfg.hidden_weight > 0  # every layer's output, not only the last
        teacher_out = None
        if cfg.kl_weight > 0 or layers_too:
            with torch.no_grad():
                if self.teacher is not None:
                    def teacher_forward(ids):
                        return self.teacher.get_decoder()(input_ids=ids, output_hidden_states=layers_too)

                    teacher_out = teacher_forward(input_ids) if self.teacher_cache is None or seq_ids is None \
                        else self.teacher_cache.teacher_output(teacher_forward, input_ids, seq_ids)
                else:
                    with moe_disabled(self.model):
                        teacher_out = base(input_ids=input_ids, output_hidden_states=layers_too)
        with recorded_routing(self.moes) as routed:
            out = base(input_ids=input_ids, output_hidden_states=layers_too)
        self.routing = routed
        kl, ce, hid = distillation_terms(out, teacher_out, input_ids, head, cfg, teacher_head=None
                                         if self.teacher is None else self.teacher.get_output_embeddings())
        z, lb = router_z_loss(routed), load_balancing_loss(routed)
        loss = cfg.kl_weight * kl + cfg.ce_weight * ce + cfg.z_weight * z + cfg.lb_weight * lb
        layer_terms = {}  # logged only when it trains
        if hid is not None:
            loss, layer_terms = loss + cfg.hidden_weight * hid, {"hidden": hid.detach()}
        return {"loss": loss, "kl": kl.detach(), "ce": ce.detach(), **layer_terms, "z": z.detach(), "lb": lb.detach(),
                "load_cv": torch.tensor(expert_load_cv(routed)), "marginal_error": torch.tensor(marginal_error)}


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def refits_down(cfg: ConvertConfig) -> bool:
    """Whether this conversion ends with the least-squares refit of the down projections (dotmoe.refit): asked
    for, the FFN weights were not trained end to end (that training already adapted them), and, when training
    started from refitted FFNs, only with `refit_after_training` (the router and assignment were trained for them;
    SmolLM2, 32k tokens: validation PPL 113.7 at the end of training, 118.0 after a second refit)."""
    if not cfg.refit_down or cfg.trains_weights:
        return False
    return not cfg.steps or not cfg.refit_before_training or cfg.refit_after_training


def refit_moe_down(model: nn.Module, moes: list[MoeMLP], calib: torch.Tensor, progress: bool,
                   keep_teacher: bool = True, stream: float = 0.0, prepare=None) -> tuple[list[float], list[float]]:
    """Refit every MoeMLP's down projection on `calib` [B, S] (sequentially, see dotmoe.refit); returns the
    per-layer relative errors and ridges. The refitted down projections are saved as trained weights, which the
    export writes. `stream` > 0: the target also corrects the residual stream's drift (`refit_stream`)."""
    from dotmoe.refit import moe_problem, refit_sequentially, stream_target

    if keep_teacher:  # the dense teacher (KL, dense perplexity) keeps the original weights
        for m in moes:
            m.keep_teacher_down()
    decoder = model.get_decoder()
    stream_args = stream_target(decoder, len(moes), stream, lambda: moe_disabled(model)) if stream else None
    return refit_sequentially(decoder, moes, [moe_problem(m) for m in moes], calib, progress=progress,
                              stream=stream_args, prepare=prepare)


def bad_terms(terms: dict[str, torch.Tensor]) -> list[str]:
    """The loss terms of a non-finite step that are not finite (the total, when every term is)."""
    return [k for k, v in terms.items() if k != "loss" and not torch.isfinite(v).all()] or ["loss"]


def build_accelerator(cfg: ConvertConfig):
    """The accelerate `Accelerator` a joint run computes with: `cfg`'s mixed precision and gradient accumulation, CPU
    when no GPU is found; an FSDP config that accelerate would silently run as DDP is refused. A launcher that needs
    another set-up (tests/fsdp_cpu_launch.py: FSDP2 on CPU) replaces this function."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    if AcceleratorState._shared_state and PartialState().num_processes == 1 and \
            AcceleratorState().mixed_precision != cfg.mixed_precision:
        # accelerate keeps one precision per process, but one process may run several conversions (a library user,
        # a benchmark: training-free, then trained in bf16); with a single process and the earlier conversion
        # finished, its state can be dropped (accelerate's own tests reset it so)
        AcceleratorState._reset_state()
    try:
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                                  cpu=not torch.cuda.is_available())
    except ValueError as exc:  # accelerate keeps one process-wide state (precision, device)
        raise DotMoeError(f"cannot set up accelerate with mixed_precision={cfg.mixed_precision!r} in this process "
                          f"(an earlier conversion here used other settings); run it in a new process: {exc}") from exc
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and \
            accelerator.distributed_type != DistributedType.FSDP:
        # accelerate falls back to DDP without a word: every process would hold the whole model
        raise DotMoeError(f"the accelerate config asks for FSDP, but accelerate runs FSDP only on GPUs/accelerators "
                          f"and this run is {accelerator.distributed_type.value} (no GPU found); use "
                          "configs/accelerate/ddp.yaml on CPU")
    return accelerator


@dataclass
class JointStart:
    """A joint run up to its loaded model: the accelerator, the stage peaks, the precision the frozen weights
    compute in, the prepared inputs, and the config with the choices made at load resolved."""

    accelerator: Accelerator
    peaks: StagePeaks
    precision: PrecisionChoice
    prep: Prepared
    cfg: ConvertConfig


def start_joint(cfg: ConvertConfig, progress: bool = True, precision: PrecisionChoice | None = None) -> JointStart:
    """Set up accelerate and the seeds, choose the precision (unless `precision` holds the choice made), load data
    and model (`prepare`), and resolve activation checkpointing from the memory they need. Pruning goes on from
    here too (dotmoe.convert)."""
    from dotmoe.resources import StagePeaks

    accelerator = build_accelerator(cfg)
    _seed_everything(cfg.seed)
    peaks = StagePeaks()
    if precision is None:
        precision = choose_precision(cfg.precision, accelerator.device, cfg.trains_weights)
    if progress:  # stdout: stderr holds only warnings and the one-line error of a failed run
        print(f"dotmoe: computing in {precision.reason}", flush=True)
    prep = prepare(cfg, precision.dtype)
    check_training_memory(cfg, prep.model)
    if cfg.gradient_checkpointing is None:
        cfg = cfg.derive(gradient_checkpointing=use_gradient_checkpointing(cfg, prep.model))
    if cfg.compile is None:
        cfg = cfg.derive(compile=compile_by_default(cfg.steps, sum(p.numel() for p in prep.model.parameters()),
                                                    accelerator.num_processes, accelerator.device))
    if cfg.compile and cfg.steps and progress:
        print("dotmoe: compiling the training step (torch.compile; the first steps take about a minute longer; "
              "compile: false in a --config turns it off)", flush=True)
    peaks.mark("load")
    return JointStart(accelerator, peaks, precision, prep, cfg)
