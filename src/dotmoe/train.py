"""The DOT-MoE conversion recipe: joint OT assignment + router training against the dense teacher.

One `accelerate` loop, so the same code runs on one CPU, one GPU or several (DDP/FSDP via accelerate launch).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dotmoe.assignment import AssignmentStats, NeuronAssigner
from dotmoe.checkpoints import load_checkpoint, save_checkpoint
from dotmoe.config import ConvertConfig
from dotmoe.conversion_result import ConvertResult, export_and_record
from dotmoe.data import batch_order
from dotmoe.dense_ppl_cache import dense_perplexity
from dotmoe.distill_dense import teacher_copy
from dotmoe.errors import DotMoeError, Interrupted
from dotmoe.guards import (BEST_STATE, CHECKPOINT, check_resume_settings, prepare_output, resume_key,
                           stop_at_step_boundaries, stop_requested)
from dotmoe.layer_setup import (calibrate_during_refit, initial_partitions, partition_kind, partition_kind_named,
                                refitted_down_projections, starting_point)
from dotmoe.losses import distill_and_lm_loss, expert_load_cv, load_balancing_loss, router_z_loss
from dotmoe.moe_mlp import MoeMLP, install_moe, moe_disabled
from dotmoe.perplexity import perplexity
from dotmoe.precision import PrecisionChoice, autocast_dtype, choose_precision
from dotmoe.record import ConversionRecord
from dotmoe.prepare import Prepared, calibration_sequences, preflight, prepare
from dotmoe.sharding import (full_optimizer_state, full_tensor, full_trainable_state, gathered, has_sharded_parameters,
                             load_full_optimizer_state, load_full_state)
from dotmoe.step_profile import StepProfiler
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
        # accelerate's FSDP auto-wrap reads the decoder layer class from here: one FSDP unit per decoder layer
        self._no_split_modules = list(getattr(model, "_no_split_modules", None) or [])

    def set_assignment(self) -> AssignmentStats:
        """Solve this step's assignment and hand each MoE layer its matrix; return the stats."""
        matrices, stats = self.assigner.refresh()
        for layer, moe in enumerate(self.moes):
            moe.assignment = matrices[layer]
        return stats

    def forward(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        marginal_error = self.set_assignment().marginal_error
        base, head = self.model.get_decoder(), self.model.get_output_embeddings()
        teacher_hidden = None
        if cfg.kl_weight > 0:
            with torch.no_grad():
                if self.teacher is not None:
                    teacher_hidden = self.teacher.get_decoder()(input_ids=input_ids).last_hidden_state
                else:
                    with moe_disabled(self.model):
                        teacher_hidden = base(input_ids=input_ids).last_hidden_state
        hidden = base(input_ids=input_ids).last_hidden_state
        kl, ce = distill_and_lm_loss(hidden, teacher_hidden, input_ids, head, cfg.kl_temperature, cfg.chunk_tokens,
                                     ce_grad=cfg.ce_weight > 0,
                                     teacher_head=None if self.teacher is None else self.teacher.get_output_embeddings())
        routed = [m.last_router for m in self.moes]
        z, lb = router_z_loss(routed), load_balancing_loss(routed)
        loss = cfg.kl_weight * kl + cfg.ce_weight * ce + cfg.z_weight * z + cfg.lb_weight * lb
        return {"loss": loss, "kl": kl.detach(), "ce": ce.detach(), "z": z.detach(), "lb": lb.detach(),
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








def _load_joint_checkpoint(path: Path, cfg: ConvertConfig, steps: int) -> dict:
    """The joint mode's checkpoint, checked: its structure, and that it was written with this run's settings."""
    state = load_checkpoint(path)
    check_resume_settings(path, state.get("config"), resume_key(cfg))
    kinds = {"params": dict, "optimizer": dict, "scheduler": dict, "rng": torch.Tensor, "step": int}
    wrong = [k for k, kind in kinds.items() if not isinstance(state.get(k), kind)]
    if wrong or not 0 <= state["step"] <= steps:
        raise DotMoeError(f"--resume: {path} is damaged ({', '.join(wrong) or 'step out of range'}); rerun with "
                          "--overwrite instead of --resume to start over")
    return state


def _kept_records(log_path: Path, upto: int, events: bool = False) -> list[dict]:
    """The train log's step records (and with `events` the non-finite-step events) up to step `upto`."""
    if not log_path.is_file():
        return []
    records = []
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= upto and \
                (events or "event" not in record):
            records.append(record)
    return records


def _best_so_far(history: list[dict], best_path: Path | None) -> tuple[float, int] | None:
    """(val_ppl, step) of the best evaluation in a resumed run's kept records, when its best state is on disk."""
    if best_path is None or not best_path.is_file():
        return None
    scored = [(r["val_ppl"], r["step"]) for r in history if "val_ppl" in r]
    return min(scored, key=lambda e: (e[0], e[1])) if scored else None


def _trainable_state(module: MoeTrainingModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}


def _snapshot(module: MoeTrainingModule, optimizer) -> tuple[dict, dict]:
    """In-memory copy of the trainable parameters and optimizer state (what a bad step reverts to)."""
    return _trainable_state(module), copy.deepcopy(optimizer.state_dict())


def _restore(module: MoeTrainingModule, optimizer, snapshot: tuple[dict, dict]) -> None:
    params, opt_state = snapshot
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in params:
                p.copy_(params[name])
    optimizer.load_state_dict(copy.deepcopy(opt_state))


# Trainable state (parameters + two AdamW moments) up to this size is snapshotted in memory for a bad step to revert
# to; above it the revert reads the last checkpoint on disk instead (SmolLM2 --trainable full: 1.6 GB of copies)
SNAPSHOT_IN_MEMORY_BYTES = 256 * 2**20


def _revert_to_checkpoint(module: MoeTrainingModule, optimizer, path: Path) -> None:
    """Put the trainable parameters and the optimizer state back to the checkpoint in `path` (every process)."""
    state = load_checkpoint(path)
    load_full_state(module, state["params"])
    load_full_optimizer_state(optimizer, state["optimizer"])


def _bad_terms(terms: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in terms.items() if k != "loss" and not torch.isfinite(v).all()] or ["loss"]




def _accelerator(cfg: ConvertConfig):
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


def start_joint(cfg: ConvertConfig, progress: bool = True) -> JointStart:
    """Set up accelerate and the seeds, choose the precision, load data and model (`prepare`), and resolve
    activation checkpointing from the memory they need. Pruning goes on from here too (dotmoe.convert)."""
    from dotmoe.resources import StagePeaks

    accelerator = _accelerator(cfg)
    _seed_everything(cfg.seed)
    peaks = StagePeaks()
    precision = choose_precision(cfg.precision, accelerator.device, cfg.trains_weights)
    if progress:  # stdout: stderr holds only warnings and the one-line error of a failed run
        print(f"dotmoe: computing in {precision.reason}", flush=True)
    prep = prepare(cfg, precision.dtype)
    check_training_memory(cfg, prep.model)
    if cfg.gradient_checkpointing is None:
        cfg = cfg.derive(gradient_checkpointing=use_gradient_checkpointing(cfg, prep.model))
    peaks.mark("load")
    return JointStart(accelerator, peaks, precision, prep, cfg)


def convert_joint(cfg: ConvertConfig, progress: bool = True) -> ConvertResult:
    """The joint (end-to-end KL) conversion into cfg.out, whose state `convert` has checked."""
    return train_joint(start_joint(cfg, progress), progress)


def train_joint(begun: JointStart, progress: bool = True) -> ConvertResult:
    """The joint conversion from its loaded model on: starting partitions and routers, the MoE, training,
    the final refit and evaluation, the record and the export."""
    from transformers import get_cosine_schedule_with_warmup

    accelerator, peaks, precision, prep, cfg = begun.accelerator, begun.peaks, begun.precision, begun.prep, begun.cfg
    model, model_path, seqs, eval_ids = prep.model, prep.model_path, prep.seqs, prep.eval_ids
    out = Path(cfg.out)
    mlp_names, mlps, num_neurons = prep.mlp_names, prep.mlps, prep.num_neurons
    caps = torch.tensor(cfg.column_capacities(num_neurons))
    if cfg.init_from:  # an earlier conversion's partition and routers, e.g. a layer-wise pass
        partitions, start_routers = starting_point(cfg, len(mlps), num_neurons, caps)
    elif cfg.calibrate_on == "converted":  # chosen layer by layer during the refit (calibrate_during_refit)
        partitions, start_routers = torch.zeros((len(mlps), num_neurons), dtype=torch.long), None
    else:
        needs_inputs = cfg.init_router != "random" or cfg.drop > 0 or \
            partition_kind_named(partition_kind(cfg)).needs_inputs
        calib = calibration_sequences(seqs, cfg) if needs_inputs else None
        partitions, start_routers = initial_partitions(cfg, model, mlps, caps, calib, progress)
    peaks.mark("calibrate")

    teacher = None
    if cfg.trainable != "router+assignment" and cfg.kl_weight > 0:
        teacher = teacher_copy(model, autocast_dtype(cfg.mixed_precision) if accelerator.num_processes == 1 else None)
    moes = install_moe(model, cfg.experts, cfg.top_k, cfg.gating, shared=cfg.shared > 0, dropped=cfg.drop > 0)
    torch.manual_seed(cfg.seed)
    for layer, moe in enumerate(moes):
        moe.router.weight.data.normal_(std=moe.router.weight.shape[1] ** -0.5)
        if start_routers is not None:  # the baseline's own router, the lstsq init, or the --init-from one
            moe.router.weight.data.copy_(start_routers[layer])
    affinity = cfg.init_scale * torch.nn.functional.one_hot(partitions, len(caps)).float()
    if cfg.method == "dotmoe" and cfg.init_affinity == "random" and not cfg.init_from:
        affinity = 0.01 * torch.randn(partitions.shape + (len(caps),), generator=torch.Generator().manual_seed(cfg.seed))
    assigner = NeuronAssigner(affinity, caps, learn=cfg.learns_assignment)
    assigner.iters = cfg.sinkhorn_iters

    groups = [{"params": [m.router.weight for m in moes], "lr": cfg.lr_router, "name": "router"}]
    if assigner.learn:
        groups.append({"params": [assigner.affinity], "lr": cfg.lr_affinity, "name": "affinity"})
    if cfg.trainable != "router+assignment":
        weights = [p for m in moes for p in m.dense.parameters()] if cfg.trainable == "experts" else \
            [p for n, p in model.named_parameters() if ".router." not in n]
        for p in weights:
            p.requires_grad_(True)
        groups.append({"params": weights, "lr": cfg.lr_weights, "name": "weights"})
    for m in moes:
        m.router.weight.requires_grad_(True)
    if cfg.gradient_checkpointing and cfg.steps and getattr(model, "supports_gradient_checkpointing", False):
        # keep only each decoder layer's input for the backward: on SmolLM2-135M (30 layers) the activations of a
        # batch of 8 x 256 tokens otherwise dominate the conversion's memory
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    module = MoeTrainingModule(model, assigner, moes, cfg, teacher)
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
    # the scheduler is not prepared: accelerate would step it once per process, but batch_size is the global
    # batch (split across processes), so one optimizer step is one schedule step
    module, optimizer = accelerator.prepare(module, optimizer)
    raw = accelerator.unwrap_model(module)

    if cfg.batch_size % accelerator.num_processes:
        raise DotMoeError(f"batch_size {cfg.batch_size} (the global batch) must be divisible by the "
                          f"{accelerator.num_processes} processes")
    if accelerator.is_main_process:  # every input is checked: only now may an --overwrite'n result go
        prepare_output(out, cfg.overwrite)
    accelerator.wait_for_everyone()
    preflight(out, cfg, model)
    ckpt_path = out / CHECKPOINT
    log_path = out / "train_log.jsonl"
    order = batch_order(cfg, len(seqs))  # the same for pruning + distillation (dotmoe.distill_dense)
    from accelerate.utils import DistributedType

    fsdp = accelerator.distributed_type == DistributedType.FSDP
    sharded = fsdp or has_sharded_parameters(raw)
    refit_errors = refit_ridges = None  # of the last refit
    start_down = refitted_down_projections(cfg.init_from, mlp_names) if cfg.init_from and cfg.steps else None
    refitted = start_down is not None or bool(cfg.steps and cfg.refit_down and cfg.refit_before_training and
                                              not sharded)  # the down projections differ from the dense ones
    if start_down is not None:  # the --init-from conversion's refitted FFNs: training starts from exactly it
        with torch.no_grad():
            for m, w in zip(raw.moes, start_down):
                m.keep_teacher_down()
                m.dense.down_proj.weight.copy_(w)
    elif cfg.steps and cfg.refit_down and cfg.refit_before_training and not sharded:
        # also with trainable FFN weights (their training then starts from the refitted ones); not with sharded
        # parameters (FSDP: skipped, as the final refit is). From the initial state, so a --resume recomputes the
        # same weights before loading its checkpoint (which holds only the trainable tensors)
        with torch.no_grad():
            raw.assigner.tau = cfg.tau_at(0, cfg.steps)
            raw.set_assignment()
        refit_errors, refit_ridges = refit_moe_down(raw.model.eval(), raw.moes, calibration_sequences(seqs, cfg),
                                                    progress, stream=cfg.refit_stream)  # eval: no dropout,
        raw.model.train()  # and no activation checkpointing around a forward that keeps no graph
        peaks.mark("refit")
    start_step = 0
    history, evals = [], []
    if cfg.resume and ckpt_path.is_file():
        state = _load_joint_checkpoint(ckpt_path, cfg, cfg.steps)
        try:
            load_full_state(raw, state["params"])
            load_full_optimizer_state(optimizer, state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
        except (RuntimeError, KeyError, ValueError, IndexError, TypeError) as exc:
            raise DotMoeError(f"--resume: {ckpt_path} does not fit this model ({type(exc).__name__}); rerun with "
                              "--overwrite instead of --resume to start over") from exc
        start_step = state["step"]
        history = _kept_records(log_path, start_step)  # the steps before the checkpoint, for the summary
        evals = [r["val_ppl"] for r in history if "val_ppl" in r]
        if accelerator.is_main_process and log_path.exists():  # drop the records of steps that are redone
            log_path.write_text("".join(json.dumps(r) + "\n" for r in _kept_records(log_path, start_step, True)))
    elif accelerator.is_main_process:
        log_path.unlink(missing_ok=True)

    dense_ppl = None
    if cfg.eval_every:
        with gathered(raw), moe_disabled(raw.model):
            dense_ppl = dense_perplexity(raw.model.eval(), model_path, eval_ids, cfg.seq_len, cfg.seq_len // 2,
                                         use_cache=accelerator.num_processes == 1, progress=progress)
    best_path = out / BEST_STATE
    best = _best_so_far(history, best_path if start_step else None)  # (val_ppl, step) of the best evaluation

    def evaluate_now(done: int) -> float:
        """Validation perplexity of the MoE as it is after `done` steps; kept as the best state when it is."""
        nonlocal best
        with gathered(raw):
            with torch.no_grad():
                raw.set_assignment()
            ppl = round(perplexity(raw.model.eval(), eval_ids[: cfg.val_tokens], cfg.seq_len, cfg.seq_len // 2), 4)
        raw.model.train()
        evals.append(ppl)
        if cfg.keep_best and (best is None or ppl < best[0]):
            best = (ppl, done)
            state = {"params": full_trainable_state(raw, keep=accelerator.is_main_process), "step": done,
                     "tau": raw.assigner.tau, "val_ppl": ppl, "config": resume_key(cfg)}
            if accelerator.is_main_process:
                save_checkpoint(state, best_path)
        return ppl

    if cfg.eval_every and start_step == 0 and cfg.steps:  # the starting point: what training must beat
        raw.assigner.tau = cfg.tau_at(0, cfg.steps)
        start = {"step": 0, "tokens": 0, "tau": round(raw.assigner.tau, 5), "val_ppl": evaluate_now(0)}
        history.append(start)
        if accelerator.is_main_process:
            with log_path.open("a") as fh:
                fh.write(json.dumps(start) + "\n")
    t0, tokens_done = time.time(), 0
    bar = tqdm(range(start_step, cfg.steps), desc=f"convert ({cfg.method})", unit="step", disable=not progress,
               initial=start_step, total=cfg.steps)
    module.train()
    world, rank = accelerator.num_processes, accelerator.process_index
    failures = 0

    def write_checkpoint(done: int) -> None:
        # whole tensors (gathered on every process under FSDP), so resuming does not depend on the sharding
        main = accelerator.is_main_process  # only it keeps the copies; the others join the gathers
        state = {"params": full_trainable_state(raw, keep=main),
                 "optimizer": full_optimizer_state(optimizer, keep=main), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "step": done,
                 "config": resume_key(cfg)}
        if main:
            save_checkpoint(state, ckpt_path)

    def stop_here(done: int) -> None:
        """SIGINT/SIGTERM arrived (on any process): checkpoint at this step boundary and stop."""
        signum = stop_requested() or 0
        if world > 1:  # decided jointly, so every process takes part in the checkpoint's gathers
            signum = int(accelerator.gather(torch.tensor([signum], device=accelerator.device)).max())
        if signum:
            write_checkpoint(done)
            raise Interrupted(signum, f"at step {done} of {cfg.steps} (checkpoint saved in {ckpt_path})")

    trainable_bytes = 3 * sum(p.numel() * p.element_size() for p in raw.parameters() if p.requires_grad)
    # what a non-finite step reverts to: an in-memory snapshot, or when the trainable state is too large to copy,
    # the last checkpoint on disk (so one is written when training starts)
    good = _snapshot(raw, optimizer) if trainable_bytes <= SNAPSHOT_IN_MEMORY_BYTES else None
    if good is None and cfg.steps > start_step and not ckpt_path.is_file():
        write_checkpoint(start_step)
    stop_at_step_boundaries(True)  # from here a signal only asks for a stop, which stop_here() carries out
    profiler = StepProfiler(start_step)  # DOTMOE_PROFILE=FILE only (dotmoe.step_profile)
    for step in bar:
        stop_here(step)
        profiler.step(step)
        raw.assigner.tau = cfg.tau_at(step, cfg.steps)
        terms_sum: dict[str, float] = {}
        finite = True
        for micro in range(cfg.grad_accum):
            idx = order[(step * cfg.grad_accum + micro) * cfg.batch_size:][: cfg.batch_size]
            batch = seqs[idx[rank::world]].to(accelerator.device)  # this process's share of the global batch
            with accelerator.accumulate(module):
                terms = module(batch)
                finite = bool(accelerator.gather(torch.isfinite(terms["loss"]).float().reshape(1)).min() > 0)
                if not finite:  # decided jointly, so no process waits in a collective the others skip
                    break
                accelerator.backward(terms["loss"])
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + float(accelerator.reduce(v.detach(), "mean")) / cfg.grad_accum
        if not finite:
            failures += 1
            event = {"step": step + 1, "event": "non_finite_loss", "terms": _bad_terms(terms),
                     "router_layers": [i for i, m in enumerate(raw.moes) if m.last_router is not None
                                       and not torch.isfinite(m.last_router.logits).all()],
                     "consecutive_failures": failures}
            optimizer.zero_grad(set_to_none=True)
            if good is not None:
                _restore(raw, optimizer, good)
            else:
                _revert_to_checkpoint(raw, optimizer, ckpt_path)
            if accelerator.is_main_process:
                with log_path.open("a") as fh:
                    fh.write(json.dumps(event) + "\n")
            bar.write(f"non-finite loss at step {step + 1} (terms {event['terms']}, router layers "
                      f"{event['router_layers']}); reverted to the last good state and skipped the batch")
            if failures >= cfg.max_bad_steps:
                raise DotMoeError(f"{failures} consecutive non-finite steps (last at step {step + 1}, terms "
                                  f"{', '.join(event['terms'])}); lower the learning rates or check the data. Last "
                                  f"good checkpoint: {ckpt_path if ckpt_path.exists() else 'none yet'}")
            continue
        failures = 0
        tokens_done += cfg.batch_size * cfg.grad_accum * cfg.seq_len
        record = {"step": step + 1, "tokens": (step + 1) * cfg.batch_size * cfg.grad_accum * cfg.seq_len,
                  "tau": round(raw.assigner.tau, 5), **{k: round(v, 6) for k, v in terms_sum.items()},
                  "tokens_per_s": round(tokens_done / (time.time() - t0), 1)}
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            record["val_ppl"] = evaluate_now(step + 1)
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", kl=f"{record['kl']:.4f}", cv=f"{record['load_cv']:.2f}",
                        err=f"{record['marginal_error']:.1e}", tok_s=f"{record['tokens_per_s']:.0f}")
        if accelerator.is_main_process:
            with log_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            if good is not None:
                good = _snapshot(raw, optimizer)
            write_checkpoint(step + 1)

    profiler.close()
    if cfg.steps > start_step:
        stop_here(cfg.steps)  # a signal during the last step: the final phase runs on --resume
    stop_at_step_boundaries(False)

    raw.eval()
    peaks.mark("train")
    best_step = None
    if best is not None and best_path.is_file():
        best_step = best[1]
        if best_step != cfg.steps:  # training went past its best validation point: back to it
            kept = load_checkpoint(best_path)
            load_full_state(raw, kept["params"])
            raw.assigner.tau = float(kept["tau"])
            if progress:
                print(f"dotmoe: keeping the best validation state, step {best_step} of {cfg.steps} (val PPL "
                      f"{best[0]:.3f}; last {evals[-1]:.3f})", flush=True)
    if cfg.steps == 0:  # training-free: the initial partition at the final temperature
        raw.assigner.tau = cfg.tau_end
    with gathered(raw):  # FSDP: the root's parameters whole; each decoder layer unshards in its own forward
        with torch.no_grad():
            partition = raw.set_assignment().hard
        if dense_ppl is None:  # the dense model: MoE off, original down projections (kept by a refit)
            with moe_disabled(raw.model):
                dense_ppl = dense_perplexity(raw.model, model_path, eval_ids, cfg.seq_len, cfg.seq_len // 2,
                                             use_cache=accelerator.num_processes == 1 and
                                             not cfg.trains_weights,  # else: the trained weights'
                                             progress=progress)
            peaks.mark("dense_eval")
        if refits_down(cfg) and sharded:  # FSDP2 shards: no whole weight to write the refit into (it ran unnoticed
            # into a discarded unsharded copy when the refit wrote inside the layer's forward)
            print("dotmoe: warning: the down-projection refit (--refit-down) does not run under FSDP; skipped",
                  file=sys.stderr)
        elif refits_down(cfg):
            calibrate = calibrate_during_refit(cfg, raw, caps) if cfg.calibrate_on == "converted" else None
            refit_errors, refit_ridges = refit_moe_down(raw.model, raw.moes, calibration_sequences(seqs, cfg),
                                                        progress, keep_teacher=False, stream=cfg.refit_stream,
                                                        prepare=calibrate)  # no teacher needed after
            if calibrate is not None:
                partition = raw.set_assignment().hard
            peaks.mark("refit")
        final_ppl = perplexity(raw.model, eval_ids, cfg.seq_len, cfg.seq_len // 2, progress=progress,
                               desc="perplexity (MoE)")
        peaks.mark("evaluate")
        routers = [full_tensor(m.router.weight.detach()).clone() for m in raw.moes]  # every process (collective)
        if cfg.trains_weights or refitted or refit_errors is not None:
            from dotmoe.artifacts import save_trained_weights, trained_weights

            only = None if cfg.trainable != "router+assignment" else (lambda name: name.endswith("down_proj.weight"))
            weights = trained_weights(raw.model, keep=accelerator.is_main_process, only=only)  # a collective
            if accelerator.is_main_process:
                save_trained_weights(out, weights)
            del weights
    record = ConversionRecord(
        method=cfg.method, mode="joint", experts=cfg.experts, top_k=cfg.top_k, shared=cfg.shared, drop=cfg.drop,
        gating=cfg.gating, capacities=caps.tolist(), intermediate_size=num_neurons, num_layers=len(moes),
        mlp_modules=mlp_names, base_model=str(model_path.resolve()),
        train_tokens=cfg.steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len, steps=cfg.steps,
        processes=accelerator.num_processes, wall_seconds=round(time.time() - t0, 1),
        final_terms={k: v for k, v in history[-1].items() if k not in ("step", "tokens")} if history else {},
        val_ppl=round(final_ppl, 4), dense_val_ppl=round(dense_ppl, 4), ppl_ratio=round(final_ppl / dense_ppl, 4),
        eval_curve=evals, best_step=best_step, eval_steps=[r["step"] for r in history if "val_ppl" in r],
        config=cfg.to_dict(), refit_errors=None if refit_errors is None else [round(e, 5) for e in refit_errors],
        refit_ridges=refit_ridges, peak_rss_mb=peaks, stage_seconds=peaks.seconds, precision=precision.name,
        precision_reason=precision.reason)
    if accelerator.is_main_process:
        from dotmoe.artifacts import save_conversion

        save_conversion(out, partition, routers, record)
    # the export reads the conversion back from disk and loads two models of its own to check parity: release this
    # run's model, optimizer state and snapshots first (SmolLM2 training-free: peak 3,177 MB at the export before)
    module = raw = model = prep = mlps = optimizer = teacher = assigner = good = write_checkpoint = stop_here = None
    moes = terms = None
    accelerator.free_memory()
    gc.collect()
    if accelerator.is_main_process:
        from dotmoe.artifacts import mark_complete

        export_and_record(out, cfg, record, progress)
        mark_complete(out)  # last: only now is this a finished result
        ckpt_path.unlink(missing_ok=True)
        best_path.unlink(missing_ok=True)
    return ConvertResult(out_dir=out, partition=partition, record=record)

