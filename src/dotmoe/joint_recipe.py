"""The DOT-MoE conversion recipe: joint OT assignment + router training against the dense teacher.

One `accelerate` loop, so the same code runs on one CPU, one GPU or several (DDP/FSDP via accelerate launch).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from dotmoe.checkpoints import save_checkpoint
from dotmoe.config import ConvertConfig
from dotmoe.conversion_result import ConvertResult
from dotmoe.errors import DotMoeError, Interrupted
from dotmoe.joint_finish import JointFinish
from dotmoe.joint_setup import JointSetup
from dotmoe.joint_state import SNAPSHOT_IN_MEMORY_BYTES, restore_snapshot, revert_to_checkpoint, snapshot
from dotmoe.perplexity import perplexity
from dotmoe.resume_guards import resume_key
from dotmoe.run_dir import BEST_STATE, CHECKPOINT, TRAIN_LOG
from dotmoe.sharding import full_optimizer_state, full_trainable_state, gathered
from dotmoe.step_profile import StepProfiler
from dotmoe.stop_signals import stop_at_step_boundaries, stop_requested
from dotmoe.train import JointStart, bad_terms, start_joint
from dotmoe.written import append_record


def convert_joint(cfg: ConvertConfig, progress: bool = True) -> ConvertResult:
    """The joint (end-to-end KL) conversion into cfg.out, whose state `convert` has checked."""
    return train_joint(start_joint(cfg, progress), progress)


def train_joint(begun: JointStart, progress: bool = True) -> ConvertResult:
    """The joint conversion from its loaded model on (`JointRecipe`): starting partitions and routers, the MoE,
    training, the final refit and evaluation, the record and the export."""
    return JointRecipe(begun, progress).run()


class JointRecipe(JointSetup, JointFinish):
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
                append_record(self.log_path, record)
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
            mine = idx[rank::world]
            batch = self.prep.seqs[mine].to(accelerator.device)  # this process's share of the batch
            with accelerator.accumulate(self.module):
                terms = self.module(batch, self.tau, seq_ids=mine)
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
            append_record(self.log_path, event)
        bar.write(f"non-finite loss at step {step + 1} (terms {event['terms']}, router layers "
                  f"{event['router_layers']}); reverted to the last good state and skipped the batch")
        if self.failures >= self.cfg.max_bad_steps:
            raise DotMoeError(f"{self.failures} consecutive non-finite steps (last at step {step + 1}, terms "
                              f"{', '.join(event['terms'])}); lower the learning rates or check the data. Last good "
                              f"checkpoint: {self.ckpt_path if self.ckpt_path.exists() else 'none yet'}")
