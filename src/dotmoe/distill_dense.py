"""Distillation of a dense student (the pruned model of `--method prune --tokens N`) against the dense teacher.

The strong baseline a user would try first: prune to the MoE's active budget, then train every weight on the same
tokens, in the same order, with the same loss (forward KL to the teacher + the optional LM term), optimizer (AdamW),
learning-rate schedule (warmup, cosine decay) and validation schedule as the joint DOT-MoE training
(`dotmoe.joint_recipe.JointRecipe`), keeping the best validation state. It has no routers or assignment, so it does not
need convert_joint's machinery; it keeps the best state in memory and does not checkpoint (a pruned run is refused
with --resume: an interrupted one is started again).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from dotmoe.compiled import compile_decoder_layers
from dotmoe.config import ConvertConfig
from dotmoe.data import batch_order
from dotmoe.errors import DotMoeError
from dotmoe.losses import distillation_terms
from dotmoe.perplexity import perplexity
from dotmoe.precision import autocast, autocast_dtype
from dotmoe.teacher_cache import TeacherCache, make_teacher_cache


@dataclass
class DistillResult:
    """Validation curve (start included), the step whose state the student ends with, and the per-step records."""

    eval_curve: list[float] = field(default_factory=list)
    best_step: int | None = None
    history: list[dict] = field(default_factory=list)


def _batch_terms(student: nn.Module, teacher: nn.Module, batch: torch.Tensor, cfg: ConvertConfig,
                 cache: TeacherCache | None = None, seq_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One micro-batch's loss (first) and its terms: KL to the teacher, CE, and with hidden_weight the layer term.
    `cache`: the teacher's outputs by sequence index (`seq_ids`, the batch's indices)."""
    with autocast(cfg.mixed_precision, batch.device):  # as accelerate does in the joint run
        layers_too = cfg.hidden_weight > 0  # every layer's output, not only the last

        def teacher_forward(ids):
            return teacher.get_decoder()(input_ids=ids, output_hidden_states=layers_too)

        with torch.no_grad():
            target = None
            if cfg.kl_weight > 0 or layers_too:
                target = teacher_forward(batch) if cache is None or seq_ids is None \
                    else cache.teacher_output(teacher_forward, batch, seq_ids)
        out = student.get_decoder()(input_ids=batch, output_hidden_states=layers_too)
        kl, ce, hid = distillation_terms(out, target, batch, student.get_output_embeddings(), cfg,
                                         teacher_head=teacher.get_output_embeddings())
    loss = cfg.kl_weight * kl + cfg.ce_weight * ce
    if hid is not None:
        loss = loss + cfg.hidden_weight * hid
    return {"loss": loss, "kl": kl, "ce": ce, **({"hidden": hid} if hid is not None else {})}


def _optimizer(student: nn.Module, teacher: nn.Module, cfg: ConvertConfig):
    """Every student weight trainable (checkpointed and compiled when asked), AdamW and the cosine schedule."""
    from transformers import get_cosine_schedule_with_warmup

    teacher.eval().requires_grad_(False)
    student.requires_grad_(True)
    if cfg.gradient_checkpointing and getattr(student, "supports_gradient_checkpointing", False):
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile and cfg.steps:
        compile_decoder_layers(student, teacher)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr_weights, weight_decay=0.0)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.steps)


def distill_dense(student: nn.Module, teacher: nn.Module, seqs: torch.Tensor, eval_ids: torch.Tensor,
                  cfg: ConvertConfig, log_path: Path | None = None, progress: bool = True) -> DistillResult:
    """Train every weight of `student` for cfg.steps optimizer steps against the frozen `teacher`; validation
    perplexity (first cfg.val_tokens of `eval_ids`) at the start and every cfg.eval_every steps. With cfg.keep_best
    the student ends with the weights of its best validation point."""
    optimizer, scheduler = _optimizer(student, teacher, cfg)
    cache = make_teacher_cache(cfg, len(seqs), autocast_dtype(cfg.mixed_precision), seqs.device)
    order = batch_order(cfg, len(seqs))
    result, best = DistillResult(), None
    log = log_path.open("w") if log_path is not None else None

    def write(record: dict) -> None:
        result.history.append(record)
        if log is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()

    def evaluate(done: int) -> float:
        nonlocal best
        with torch.no_grad():
            ppl = round(perplexity(student.eval(), eval_ids[: cfg.val_tokens], cfg.seq_len, cfg.seq_len // 2), 4)
        student.train()
        result.eval_curve.append(ppl)
        if cfg.keep_best and (best is None or ppl < best[0]):
            best = (ppl, done, {k: v.detach().clone() for k, v in student.state_dict().items()})
        return ppl

    try:
        if cfg.eval_every:
            write({"step": 0, "tokens": 0, "val_ppl": evaluate(0)})
        student.train()
        t0, per_step = time.time(), cfg.batch_size * cfg.grad_accum * cfg.seq_len
        bar = tqdm(range(cfg.steps), desc="convert (prune + distillation)", unit="step", disable=not progress)
        for step in bar:
            terms: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                idx = order[(step * cfg.grad_accum + micro) * cfg.batch_size:][: cfg.batch_size]
                batch_terms = _batch_terms(student, teacher, seqs[idx], cfg, cache, idx)
                if not torch.isfinite(batch_terms["loss"]):
                    raise DotMoeError(f"non-finite loss at step {step + 1} of the pruned model's distillation; "
                                      "lower --lr-weights or check the data")
                (batch_terms["loss"] / cfg.grad_accum).backward()
                for name, value in batch_terms.items():
                    terms[name] = terms.get(name, 0.0) + float(value.detach()) / cfg.grad_accum
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            record = {"step": step + 1, "tokens": (step + 1) * per_step, **{k: round(v, 6) for k, v in terms.items()},
                      "tokens_per_s": round((step + 1) * per_step / (time.time() - t0), 1)}
            if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                record["val_ppl"] = evaluate(step + 1)
            bar.set_postfix(kl=f"{record['kl']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            write(record)
    finally:
        if log is not None:
            log.close()
    return _finish(student, cfg, result, best, progress)


def _finish(student: nn.Module, cfg: ConvertConfig, result: DistillResult, best, progress: bool) -> DistillResult:
    """Checkpointing off, the student frozen and, when training went past its best validation point, back to it."""
    if cfg.gradient_checkpointing and getattr(student, "supports_gradient_checkpointing", False):
        student.activation_checkpointing_disable()
    student.eval().requires_grad_(False)
    if best is not None:
        result.best_step = best[1]
        if best[1] != cfg.steps:  # training went past its best validation point: back to it
            student.load_state_dict(best[2])
            if progress:
                print(f"dotmoe: keeping the best validation state, step {best[1]} of {cfg.steps} (val PPL "
                      f"{best[0]:.3f}; last {result.eval_curve[-1]:.3f})", flush=True)
    return result


def teacher_copy(model: nn.Module, linear_dtype: torch.dtype | None = None) -> nn.Module:
    """A frozen copy of the dense model (taken before it is pruned or trained in place). `linear_dtype`: the autocast
    dtype the teacher will run under; its Linear layers are stored in it, which autocast would otherwise re-cast from
    fp32 at every call (a frozen weight is not in autocast's cache) to the same values. The output embedding stays: it
    may share its weight with the input embedding, whose dtype sets the residual stream's."""
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    if linear_dtype is not None:
        head = teacher.get_output_embeddings()
        for module in teacher.modules():
            if isinstance(module, nn.Linear) and module is not head:
                module.to(linear_dtype)
    return teacher
