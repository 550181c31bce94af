"""The set-up half of the joint recipe (`JointRecipe` in dotmoe.joint_recipe): the starting partitions and routers,
the MoE, the optimizer, the output directory, the refit before training, a resumed checkpoint, the first evaluation.
"""

from __future__ import annotations

import json

import torch

from dotmoe.assignment import NeuronAssigner
from dotmoe.compiled import compile_decoder_layers
from dotmoe.data import batch_order
from dotmoe.dense_ppl_cache import dense_perplexity
from dotmoe.distill_dense import teacher_copy
from dotmoe.errors import DotMoeError
from dotmoe.joint_state import best_so_far, kept_records, load_refit_checkpoint, load_training_checkpoint
from dotmoe.layer_setup import (initial_partitions, partition_kind, partition_kind_named, refitted_down_projections,
                                starting_point)
from dotmoe.moe_mlp import install_moe, moe_disabled
from dotmoe.precision import autocast_dtype
from dotmoe.prepare import calibration_sequences, preflight
from dotmoe.resume_guards import prepare_output
from dotmoe.sharding import gathered, has_sharded_parameters, load_full_optimizer_state, load_full_state
from dotmoe.teacher_cache import make_teacher_cache
from dotmoe.train import MoeTrainingModule, refit_moe_down
from dotmoe.written import append_record, note_written


class JointSetup:
    """`JointRecipe.setup` and its steps; the state they build lives on the recipe (`self`)."""

    def setup(self) -> None:
        partitions, start_routers = self._starting_point()
        self.peaks.mark("calibrate")
        self._setup_moe(partitions, start_routers)
        self._setup_optimizer()
        self._setup_output()
        self._refit_before_training()
        self._resume()
        self._evaluate_start()

    def _starting_point(self) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Each layer's starting partition [L, N] and routers (None: random ones)."""
        cfg, prep = self.cfg, self.prep
        num_layers, caps = len(prep.mlps), self.caps
        if cfg.resume and not cfg.steps and self.ckpt_path.is_file():  # a training-free run stopped after its refit
            self.resumed = load_refit_checkpoint(self.ckpt_path, cfg, num_layers, prep.num_neurons)
            return self.resumed["partition"], self.resumed["routers"]
        if cfg.init_from:  # an earlier conversion's partition and routers, e.g. a layer-wise pass
            return starting_point(cfg, num_layers, prep.num_neurons, caps)
        if cfg.calibrate_on == "converted":  # chosen layer by layer during the refit (calibrate_during_refit)
            return torch.zeros((num_layers, prep.num_neurons), dtype=torch.long), None
        needs_inputs = cfg.init_router != "random" or cfg.drop > 0 or \
            partition_kind_named(partition_kind(cfg)).needs_inputs
        calib = calibration_sequences(prep.seqs, cfg) if needs_inputs else None
        return initial_partitions(cfg, prep.model, prep.mlps, caps, calib, self.progress)

    def _setup_moe(self, partitions: torch.Tensor, start_routers: list[torch.Tensor] | None) -> None:
        """The teacher copy (when the FFN weights train), the MoE layers, their routers and the assigner."""
        cfg, model = self.cfg, self.prep.model
        self.teacher = None
        if cfg.trainable != "router+assignment" and cfg.kl_weight > 0:
            self.teacher = teacher_copy(model, autocast_dtype(cfg.mixed_precision)
                                        if self.accelerator.num_processes == 1 else None)
        self.moes = install_moe(model, cfg.experts, cfg.top_k, cfg.gating, shared=cfg.shared > 0,
                                dropped=cfg.drop > 0)
        torch.manual_seed(cfg.seed)
        for layer, moe in enumerate(self.moes):
            moe.router.weight.data.normal_(std=moe.router.weight.shape[1] ** -0.5)
            if start_routers is not None:  # the baseline's own router, the lstsq init, the --init-from or resumed one
                if start_routers[layer].shape != moe.router.weight.shape:  # copy_ would broadcast a wrong shape
                    raise DotMoeError(f"layer {layer}'s starting router has shape {tuple(start_routers[layer].shape)}"
                                      f", not {tuple(moe.router.weight.shape)}")
                moe.router.weight.data.copy_(start_routers[layer])
        affinity = cfg.init_scale * torch.nn.functional.one_hot(partitions, len(self.caps)).float()
        if cfg.method == "dotmoe" and cfg.init_affinity == "random" and not cfg.init_from and self.resumed is None:
            affinity = 0.01 * torch.randn(partitions.shape + (len(self.caps),),
                                          generator=torch.Generator().manual_seed(cfg.seed))
        self.assigner = NeuronAssigner(affinity, self.caps, learn=cfg.learns_assignment, iters=cfg.sinkhorn_iters)
        self.tau = cfg.tau_at(0, cfg.steps)  # the assignment's temperature now: the schedule's at each step

    def _setup_optimizer(self) -> None:
        """Parameter groups (router, affinity, weights), AdamW, the cosine schedule, and accelerate's wrapping."""
        from transformers import get_cosine_schedule_with_warmup

        cfg, model, moes = self.cfg, self.prep.model, self.moes
        groups = [{"params": [m.router.weight for m in moes], "lr": cfg.lr_router, "name": "router"}]
        if self.assigner.learn:
            groups.append({"params": [self.assigner.affinity], "lr": cfg.lr_affinity, "name": "affinity"})
        if cfg.trainable != "router+assignment":
            weights = [p for m in moes for p in m.dense.parameters()] if cfg.trainable == "experts" else \
                [p for n, p in model.named_parameters() if ".router." not in n]
            for p in weights:
                p.requires_grad_(True)
            groups.append({"params": weights, "lr": cfg.lr_weights, "name": "weights"})
        for m in moes:
            m.router.weight.requires_grad_(True)
        if cfg.gradient_checkpointing and cfg.steps and getattr(model, "supports_gradient_checkpointing", False):
            # keep only each decoder layer's input for the backward: on SmolLM2-135M (30 layers) the activations of
            # a batch of 8 x 256 tokens otherwise dominate the conversion's memory
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if cfg.compile and cfg.steps:
            compile_decoder_layers(model, *([self.teacher] if self.teacher is not None else []))
        module = MoeTrainingModule(model, self.assigner, moes, cfg, self.teacher)
        if self.teacher is not None:  # the frozen copy's outputs never change (without it the teacher is the model)
            module.teacher_cache = make_teacher_cache(cfg, len(self.prep.seqs), autocast_dtype(cfg.mixed_precision),
                                                      self.accelerator.device)
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        self.scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)
        # the scheduler is not prepared: accelerate would step it once per process, but batch_size is the global
        # batch (split across processes), so one optimizer step is one schedule step
        self.module, self.optimizer = self.accelerator.prepare(module, optimizer)
        self.raw = self.accelerator.unwrap_model(self.module)

    def _setup_output(self) -> None:
        """The last checks before anything is written, the output directory, and the batch order."""
        from accelerate.utils import DistributedType

        cfg, accelerator = self.cfg, self.accelerator
        if cfg.batch_size % accelerator.num_processes:
            raise DotMoeError(f"batch_size {cfg.batch_size} (the global batch) must be divisible by the "
                              f"{accelerator.num_processes} processes")
        if accelerator.is_main_process:  # every input is checked: only now may an --overwrite'n result go
            prepare_output(self.out, cfg.overwrite)
        accelerator.wait_for_everyone()
        preflight(self.out, cfg, self.prep.model)
        self.order = batch_order(cfg, len(self.prep.seqs))  # the same for pruning + distillation (distill_dense)
        fsdp = accelerator.distributed_type == DistributedType.FSDP
        self.sharded = fsdp or has_sharded_parameters(self.raw)

    def _refit_before_training(self) -> None:
        """Training starts from refitted down projections: the --init-from conversion's, or a refit of its own."""
        cfg, raw = self.cfg, self.raw
        start_down = refitted_down_projections(cfg.init_from, self.prep.mlp_names) if cfg.init_from and cfg.steps \
            else None
        refit_now = start_down is None and bool(cfg.steps and cfg.refit_down and cfg.refit_before_training
                                                and not self.sharded)
        self.refitted = start_down is not None or refit_now
        if start_down is not None:  # the --init-from conversion's refitted FFNs: training starts from exactly it
            with torch.no_grad():
                for m, w in zip(raw.moes, start_down):
                    m.keep_teacher_down()
                    m.dense.down_proj.weight.copy_(w)
        elif refit_now:
            # also with trainable FFN weights (their training then starts from the refitted ones); not with sharded
            # parameters (FSDP: skipped, as the final refit is). From the initial state, so a --resume recomputes
            # the same weights before loading its checkpoint (which holds only the trainable tensors)
            with torch.no_grad():
                raw.set_assignment(self.tau)
            self.refit_errors, self.refit_ridges = refit_moe_down(
                raw.model.eval(), raw.moes, calibration_sequences(self.prep.seqs, cfg), self.progress,
                stream=cfg.refit_stream)  # eval: no dropout,
            raw.model.train()  # and no activation checkpointing around a forward that keeps no graph
            self.peaks.mark("refit")

    def _resume(self) -> None:
        """A --resume'd training checkpoint's parameters, optimizer, schedule, RNG and log; else a fresh log."""
        cfg, raw, log_path = self.cfg, self.raw, self.log_path
        if cfg.resume and self.ckpt_path.is_file() and self.resumed is None:
            state = load_training_checkpoint(self.ckpt_path, cfg, cfg.steps)
            try:
                load_full_state(raw, state["params"])
                load_full_optimizer_state(self.optimizer, state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
                torch.set_rng_state(state["rng"])
            except (RuntimeError, KeyError, ValueError, IndexError, TypeError) as exc:
                raise DotMoeError(f"--resume: {self.ckpt_path} does not fit this model ({type(exc).__name__}); "
                                  "rerun with --overwrite instead of --resume to start over") from exc
            self.start_step = state["step"]
            self.tau = cfg.tau_at(max(self.start_step - 1, 0), cfg.steps)  # the last trained step's temperature
            self.history = kept_records(log_path, self.start_step)  # the steps before the checkpoint, for the summary
            self.evals = [r["val_ppl"] for r in self.history if "val_ppl" in r]
            if self.accelerator.is_main_process and log_path.exists():  # drop the records of steps that are redone
                log_path.write_text("".join(json.dumps(r) + "\n" for r in kept_records(log_path, self.start_step,
                                                                                       True)))
                note_written(log_path)
        elif self.accelerator.is_main_process:
            log_path.unlink(missing_ok=True)

    def _evaluate_start(self) -> None:
        """The dense model's validation PPL and the starting point's, what training must beat."""
        cfg, raw, prep = self.cfg, self.raw, self.prep
        if cfg.eval_every:
            with gathered(raw), moe_disabled(raw.model):
                self.dense_ppl = dense_perplexity(raw.model.eval(), prep.model_path, prep.eval_ids, cfg.seq_len,
                                                  cfg.seq_len // 2, use_cache=self.accelerator.num_processes == 1,
                                                  progress=self.progress)
        self.best = best_so_far(self.history, self.best_path if self.start_step else None)
        if cfg.eval_every and self.start_step == 0 and cfg.steps:
            start = {"step": 0, "tokens": 0, "tau": round(self.tau, 5), "val_ppl": self.evaluate(0)}
            self.history.append(start)
            if self.accelerator.is_main_process:
                append_record(self.log_path, start)
