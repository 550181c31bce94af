"""The last half of the joint recipe (`JointRecipe` in dotmoe.joint_recipe): back to the best validation state, the
final refit and evaluation, the record, the save and the export.
"""

from __future__ import annotations

import gc
import sys
import time

import torch

from dotmoe.checkpoints import load_checkpoint
from dotmoe.conversion_result import ConvertResult, export_and_record
from dotmoe.dense_ppl_cache import dense_perplexity
from dotmoe.errors import DotMoeError
from dotmoe.joint_state import save_refit_checkpoint
from dotmoe.layer_setup import calibrate_during_refit
from dotmoe.moe_mlp import moe_disabled
from dotmoe.perplexity import perplexity
from dotmoe.prepare import calibration_sequences
from dotmoe.record import ConversionRecord
from dotmoe.sharding import full_tensor, gathered, load_full_state
from dotmoe.train import refit_moe_down, refits_down


class JointFinish:
    """`JointRecipe.finish` and its steps; the state they read lives on the recipe (`self`)."""


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
            calibration_tokens=calibration_sequences(prep.seqs, cfg).numel(),  # the number used, not calib_tokens
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
