"""The DOT-MoE conversion recipe: joint OT assignment + router training against the dense teacher.

One `accelerate` loop, so the same code runs on one CPU, one GPU or several (DDP/FSDP via accelerate launch).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from dotmoe.assignment import NeuronAssigner
from dotmoe.checkpoints import load_checkpoint, save_checkpoint
from dotmoe.compiled import compile_decoder_layers
from dotmoe.config import ConvertConfig
from dotmoe.conversion_result import ConvertResult, export_and_record
from dotmoe.data import batch_order
from dotmoe.dense_ppl_cache import dense_perplexity
from dotmoe.distill_dense import teacher_copy
from dotmoe.errors import DotMoeError, Interrupted
from dotmoe.guards import (BEST_STATE, CHECKPOINT, prepare_output, resume_key, stop_at_step_boundaries,
                           stop_requested)
from dotmoe.joint_state import (SNAPSHOT_IN_MEMORY_BYTES, best_so_far, kept_records, load_refit_checkpoint,
                                load_training_checkpoint, restore_snapshot, revert_to_checkpoint,
                                save_refit_checkpoint, snapshot)
from dotmoe.layer_setup import (calibrate_during_refit, initial_partitions, partition_kind, partition_kind_named,
                                refitted_down_projections, starting_point)
from dotmoe.moe_mlp import install_moe, moe_disabled
from dotmoe.perplexity import perplexity
from dotmoe.precision import autocast_dtype
from dotmoe.prepare import calibration_sequences, preflight
from dotmoe.record import ConversionRecord
from dotmoe.run_dir import TRAIN_LOG
from dotmoe.sharding import (full_optimizer_state, full_tensor, full_trainable_state, gathered, has_sharded_parameters,
                             load_full_optimizer_state, load_full_state)
from dotmoe.step_profile import StepProfiler
from dotmoe.train import JointStart, MoeTrainingModule, bad_terms, refit_moe_down, refits_down, start_joint


def convert_joint(cfg: ConvertConfig, progress: bool = True) -> ConvertResult:
    """The joint (end-to-end KL) conversion into cfg.out, whose state `convert` has checked."""
    return train_joint(start_joint(cfg, progress), progress)


def train_joint(begun: JointStart, progress: bool = True) -> ConvertResult:
    """The joint conversion from its loaded model on (`JointRecipe`): starting partitions and routers, the MoE,
    training, the final refit and evaluation, the record and the export."""
    return JointRecipe(begun, progress).run()


class JointRecipe:
    """One joint conversion, as a recipe (torchtune style): `setup` builds the starting point, the MoE, the
    optimizer and the run state (resumed from a checkpoint when asked), `train` runs the loop, `finish` keeps the
    best validation state, refits, evaluates, records and exports. Each step is one method."""

    def __init__(self, begun: JointStart, progress: bool = True):
        self.accelerator, self.peaks, self.precision, self.cfg = begun.accelerator, begun.peaks, begun.precision, \
            begun.cfg
        self.prep, begun.prep = begun.prep, None  # taken over, so the model can be released before the export
        self.progress = progress
        self.out = Path(self.cfg.out)
        self.ckpt_path, self.best_path, self.log_path = (self.out / CHECKPOINT, self.out / BEST_STATE,
                                                         self.out / TRAIN_LOG)
        self.caps = torch.tensor(self.cfg.column_capacities(self.prep.num_neurons))
        self.resumed = None  # a training-free run's refitted state, when it resumes from one
        self.refit_errors = self.refit_ridges = None  # of the last refit
        self.refitted = False  # the down projections differ from the dense ones
        self.start_step, self.history, self.evals = 0, [], []
        self.dense_ppl = None
        self.best = None  # (val_ppl, step) of the best evaluation

    def run(self) -> ConvertResult:
        self.setup()
        self.train()
        return self.finish()

    # ---------------------------------------------------------------------------------------------------- setup

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
                with self.log_path.open("a") as fh:
                    fh.write(json.dumps(start) + "\n")

    # ------------------------------------------------------------------------------------------------- training

    def evaluate(self, done: int) -> float:
        """Validation perplexity of the MoE as it is after `done` steps; kept as the best state when it is."""
        cfg, raw = self.cfg, self.raw
        with gathered(raw):
            with torch.no_grad():
                raw.set_assignment(self.tau)
            ppl = round(perplexity(raw.model.eval(), self.prep.eval_ids[: cfg.val_tokens], cfg.seq_len,
                                   cfg.seq_len // 2), 4)
        raw.model.train()
        self.evals.append(ppl)
        if cfg.keep_best and (self.best is None or ppl < self.best[0]):
            self.best = (ppl, done)
            main = self.accelerator.is_main_process
            state = {"params": full_trainable_state(raw, keep=main), "step": done, "tau": self.tau,
                     "val_ppl": ppl, "config": resume_key(cfg)}
            if main:
                save_checkpoint(state, self.best_path)
        return ppl

    def write_checkpoint(self, done: int) -> None:
        """The training checkpoint after `done` steps: whole tensors (gathered on every process under FSDP), so
        resuming does not depend on the sharding."""
        main = self.accelerator.is_main_process  # only it keeps the copies; the others join the gathers
        state = {"params": full_trainable_state(self.raw, keep=main),
                 "optimizer": full_optimizer_state(self.optimizer, keep=main),
                 "scheduler": self.scheduler.state_dict(), "rng": torch.get_rng_state(), "step": done,
                 "config": resume_key(self.cfg)}
        if main:
            save_checkpoint(state, self.ckpt_path)

    def stop_here(self, done: int) -> None:
        """SIGINT/SIGTERM arrived (on any process): checkpoint at this step boundary and stop."""
        signum = stop_requested() or 0
        if self.accelerator.num_processes > 1:  # decided jointly, so every process takes part in the gathers
            signum = int(self.accelerator.gather(torch.tensor([signum], device=self.accelerator.device)).max())
        if signum:
            self.write_checkpoint(done)
            raise Interrupted(signum, f"at step {done} of {self.cfg.steps} (checkpoint saved in {self.ckpt_path})")

    def train(self) -> None:
        """The training loop from `start_step`: a stop request checkpoints at a step boundary."""
        cfg, raw = self.cfg, self.raw
        self.t0, self.tokens_done = time.time(), 0
        bar = tqdm(range(self.start_step, cfg.steps), desc=f"convert ({cfg.method})", unit="step",
                   disable=not self.progress, initial=self.start_step, total=cfg.steps)
        self.module.train()
        self.failures = 0
        trainable_bytes = 3 * sum(p.numel() * p.element_size() for p in raw.parameters() if p.requires_grad)
        # what a non-finite step reverts to: an in-memory snapshot, or when the trainable state is too large to
        # copy, the last checkpoint on disk (so one is written when training starts)
        self.good = snapshot(raw, self.optimizer) if trainable_bytes <= SNAPSHOT_IN_MEMORY_BYTES else None
        if self.good is None and cfg.steps > self.start_step and not self.ckpt_path.is_file():
            self.write_checkpoint(self.start_step)
        stop_at_step_boundaries(True)  # from here a signal only asks for a stop, which stop_here() carries out
        profiler = StepProfiler(self.start_step)  # DOTMOE_PROFILE=FILE only (dotmoe.step_profile)
        for step in bar:
            self.stop_here(step)
            profiler.step(step)
            record = self._train_step(step, bar)
            if record is None:
                continue
            self.history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", kl=f"{record['kl']:.4f}", cv=f"{record['load_cv']:.2f}",
                            err=f"{record['marginal_error']:.1e}", tok_s=f"{record['tokens_per_s']:.0f}")
            if self.accelerator.is_main_process:
                with self.log_path.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                if self.good is not None:
                    self.good = snapshot(raw, self.optimizer)
                self.write_checkpoint(step + 1)
        profiler.close()
        if cfg.steps > self.start_step:
            self.stop_here(cfg.steps)  # a signal during the last step: the final phase runs on --resume
        stop_at_step_boundaries(False)

    def _train_step(self, step: int, bar) -> dict | None:
        """One optimizer step (its micro-batches); its log record, or None when its loss was not finite (reverted,
        logged and skipped)."""
        cfg, accelerator, optimizer = self.cfg, self.accelerator, self.optimizer
        world, rank = accelerator.num_processes, accelerator.process_index
        self.tau = cfg.tau_at(step, cfg.steps)
        terms_sum: dict[str, float] = {}
        finite = True
        for micro in range(cfg.grad_accum):
            idx = self.order[(step * cfg.grad_accum + micro) * cfg.batch_size:][: cfg.batch_size]
            batch = self.prep.seqs[idx[rank::world]].to(accelerator.device)  # this process's share of the batch
            with accelerator.accumulate(self.module):
                terms = self.module(batch, self.tau)
                finite = bool(accelerator.gather(torch.isfinite(terms["loss"]).float().reshape(1)).min() > 0)
                if not finite:  # decided jointly, so no process waits in a collective the others skip
                    break
                accelerator.backward(terms["loss"])
                optimizer.step()
                if accelerator.sync_gradients:
                    self.scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + float(accelerator.reduce(v.detach(), "mean")) / cfg.grad_accum
        if not finite:
            self._skip_bad_step(step, terms, bar)
            return None
        self.failures = 0
        tokens = cfg.batch_size * cfg.grad_accum * cfg.seq_len
        self.tokens_done += tokens
        record = {"step": step + 1, "tokens": (step + 1) * tokens, "tau": round(self.tau, 5),
                  **{k: round(v, 6) for k, v in terms_sum.items()},
                  "tokens_per_s": round(self.tokens_done / (time.time() - self.t0), 1)}
        if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            record["val_ppl"] = self.evaluate(step + 1)
        return record

    def _skip_bad_step(self, step: int, terms: dict[str, torch.Tensor], bar) -> None:
        """A non-finite loss: revert to the last good state, log the event, stop after too many in a row."""
        raw = self.raw
        self.failures += 1
        event = {"step": step + 1, "event": "non_finite_loss", "terms": bad_terms(terms),
                 "router_layers": [i for i, r in enumerate(raw.routing) if r is not None
                                   and not torch.isfinite(r.logits).all()],
                 "consecutive_failures": self.failures}
        self.optimizer.zero_grad(set_to_none=True)
        if self.good is not None:
            restore_snapshot(raw, self.optimizer, self.good)
        else:
            revert_to_checkpoint(raw, self.optimizer, self.ckpt_path)
        if self.accelerator.is_main_process:
            with self.log_path.open("a") as fh:
                fh.write(json.dumps(event) + "\n")
        bar.write(f"non-finite loss at step {step + 1} (terms {event['terms']}, router layers "
                  f"{event['router_layers']}); reverted to the last good state and skipped the batch")
        if self.failures >= self.cfg.max_bad_steps:
            raise DotMoeError(f"{self.failures} consecutive non-finite steps (last at step {step + 1}, terms "
                              f"{', '.join(event['terms'])}); lower the learning rates or check the data. Last good "
                              f"checkpoint: {self.ckpt_path if self.ckpt_path.exists() else 'none yet'}")

    # ---------------------------------------------------------------------------------------------------- finish

    def finish(self) -> ConvertResult:
        """Back to the best validation state, the final refit and evaluation, the record, the save and export."""
        self.raw.eval()
        self.peaks.mark("train")
        best_step = self._keep_best()
        if self.cfg.steps == 0:  # training-free: the initial partition at the final temperature
            self.raw.assigner.tau = self.cfg.tau_end
        with gathered(self.raw):  # FSDP: the root's parameters whole; each decoder layer unshards in its own forward
            partition, final_ppl, routers = self._refit_and_evaluate()
        record = self._record(final_ppl, best_step)
        if self.accelerator.is_main_process:
            from dotmoe.artifacts import save_conversion

            save_conversion(self.out, partition, routers, record)
        self._release()
        if self.accelerator.is_main_process:
            from dotmoe.artifacts import mark_complete

            export_and_record(self.out, self.cfg, record, self.progress)
            mark_complete(self.out)  # last: only now is this a finished result
            self.ckpt_path.unlink(missing_ok=True)
            self.best_path.unlink(missing_ok=True)
        return ConvertResult(out_dir=self.out, partition=partition, record=record)

    def _keep_best(self) -> int | None:
        """Load the best validation state when training went past it; its step (None: no best state kept)."""
        best = self.best
        if best is None or not self.best_path.is_file():
            return None
        if best[1] != self.cfg.steps:  # training went past its best validation point: back to it
            kept = load_checkpoint(self.best_path)
            load_full_state(self.raw, kept["params"])
            self.tau = float(kept["tau"])
            if self.progress:
                print(f"dotmoe: keeping the best validation state, step {best[1]} of {self.cfg.steps} (val PPL "
                      f"{best[0]:.3f}; last {self.evals[-1]:.3f})", flush=True)
        return best[1]

    def _refit_and_evaluate(self) -> tuple[torch.Tensor, float, list[torch.Tensor]]:
        """The final partition, the dense PPL (when not measured yet), the final refit, the MoE's PPL, the routers,
        and the trained/refitted weights saved; returns (partition, MoE PPL, routers)."""
        cfg, raw, prep, accelerator = self.cfg, self.raw, self.prep, self.accelerator
        with torch.no_grad():
            partition = raw.set_assignment(self.tau).hard
        if self.dense_ppl is None:  # the dense model: MoE off, original down projections (kept by a refit)
            with moe_disabled(raw.model):
                self.dense_ppl = dense_perplexity(raw.model, prep.model_path, prep.eval_ids, cfg.seq_len,
                                                  cfg.seq_len // 2, use_cache=accelerator.num_processes == 1 and
                                                  not cfg.trains_weights,  # else: the trained weights'
                                                  progress=self.progress)
            self.peaks.mark("dense_eval")
        partition = self._final_refit(partition)
        final_ppl = perplexity(raw.model, prep.eval_ids, cfg.seq_len, cfg.seq_len // 2, progress=self.progress,
                               desc="perplexity (MoE)")
        self.peaks.mark("evaluate")
        routers = [full_tensor(m.router.weight.detach()).clone() for m in raw.moes]  # every process (collective)
        if cfg.trains_weights or self.refitted or self.refit_errors is not None:
            from dotmoe.artifacts import save_trained_weights, trained_weights

            only = None if cfg.trainable != "router+assignment" else (lambda name: name.endswith("down_proj.weight"))
            weights = trained_weights(raw.model, keep=accelerator.is_main_process, only=only)  # a collective
            if accelerator.is_main_process:
                save_trained_weights(self.out, weights)
            del weights
        return partition, final_ppl, routers

    def _final_refit(self, partition: torch.Tensor) -> torch.Tensor:
        """The down-projection refit after training (or a resumed run's, read back); returns the partition (which
        `calibrate_on: converted` chooses during the refit)."""
        cfg, raw, resumed = self.cfg, self.raw, self.resumed
        if not refits_down(cfg):
            return partition
        if self.sharded:  # FSDP2 shards: no whole weight to write the refit into (it ran unnoticed into a
            # discarded unsharded copy when the refit wrote inside the layer's forward)
            print("dotmoe: warning: the down-projection refit (--refit-down) does not run under FSDP; skipped",
                  file=sys.stderr)
        elif resumed is not None:  # the refit this run made before it was stopped
            if not torch.equal(partition, resumed["partition"]) or any(
                    w.shape != m.dense.down_proj.weight.shape for m, w in zip(raw.moes, resumed["down"])):
                raise DotMoeError(f"--resume: {self.ckpt_path} is damaged (its partition or down projections do "
                                  "not fit this conversion); rerun with --overwrite instead of --resume to start over")
            with torch.no_grad():
                for m, w in zip(raw.moes, resumed["down"]):
                    m.dense.down_proj.weight.copy_(w)
            self.refit_errors, self.refit_ridges = resumed["refit_errors"], resumed["refit_ridges"]
        else:
            calibrate = calibrate_during_refit(cfg, raw, self.caps) if cfg.calibrate_on == "converted" else None
            self.refit_errors, self.refit_ridges = refit_moe_down(
                raw.model, raw.moes, calibration_sequences(self.prep.seqs, cfg), self.progress, keep_teacher=False,
                stream=cfg.refit_stream, prepare=calibrate)  # no teacher needed after
            if calibrate is not None:
                partition = raw.set_assignment(self.tau).hard
            if not cfg.steps and self.accelerator.is_main_process:  # the slow part is done: a stop resumes here
                save_refit_checkpoint(self.ckpt_path, cfg, partition, raw.moes, self.refit_errors, self.refit_ridges)
            self.peaks.mark("refit")
        return partition

    def _record(self, final_ppl: float, best_step: int | None) -> ConversionRecord:
        cfg, prep, errors = self.cfg, self.prep, self.refit_errors
        return ConversionRecord(
            method=cfg.method, mode="joint", experts=cfg.experts, top_k=cfg.top_k, shared=cfg.shared, drop=cfg.drop,
            gating=cfg.gating, capacities=self.caps.tolist(), intermediate_size=prep.num_neurons,
            num_layers=len(self.moes), mlp_modules=prep.mlp_names, base_model=str(prep.model_path.resolve()),
            train_tokens=cfg.steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len, steps=cfg.steps,
            processes=self.accelerator.num_processes, wall_seconds=round(time.time() - self.t0, 1),
            final_terms={k: v for k, v in self.history[-1].items() if k not in ("step", "tokens")}
            if self.history else {},
            val_ppl=round(final_ppl, 4), dense_val_ppl=round(self.dense_ppl, 4),
            ppl_ratio=round(final_ppl / self.dense_ppl, 4), eval_curve=self.evals, best_step=best_step,
            eval_steps=[r["step"] for r in self.history if "val_ppl" in r], config=cfg.to_dict(),
            refit_errors=None if errors is None else [round(e, 5) for e in errors], refit_ridges=self.refit_ridges,
            peak_rss_mb=self.peaks, stage_seconds=self.peaks.seconds, precision=self.precision.name,
            precision_reason=self.precision.reason)

    def _release(self) -> None:
        """The export reads the conversion back from disk and loads two models of its own to check parity: this
        run's model, optimizer state and snapshots go first (SmolLM2 training-free: peak 3,177 MB at the export
        before)."""
        self.module = self.raw = self.prep = self.optimizer = self.scheduler = self.teacher = None
        self.assigner = self.good = self.moes = self.resumed = None
        self.accelerator.free_memory()
        gc.collect()
