"""`--method prune`: structured FFN width pruning at the same active budget as the MoE (a baseline).

Keeps, in every layer, the `shared + (N - shared - drop) * k / E` most important neurons (mean |h_n| * ||W_down[:, n]||
on calibration tokens), so the pruned dense FFN has the MoE's active FFN parameter count. Training-free; the
output is a plain dense checkpoint of the same class with a smaller `intermediate_size`. With `refit_down` (the
default, as for the MoE methods) the kept down projections are refitted by least squares (dotmoe.refit), which is
pruning with reconstruction. With `--tokens N` the pruned model is then distilled from the dense one on the same
tokens with the same loss and schedule as a DOT-MoE training run (dotmoe.distill_dense): pruning + distillation.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from dotmoe.architecture import ffn_activations
from dotmoe.artifacts import mark_complete, write_record
from dotmoe.atomic import staged_directory
from dotmoe.calibration_methods import prune_keep
from dotmoe.config import ConvertConfig
from dotmoe.dense_ppl_cache import dense_perplexity
from dotmoe.perplexity import perplexity
from dotmoe.record import ConversionRecord
from dotmoe.resources import StagePeaks
from dotmoe.resume_guards import prepare_output
from dotmoe.run_dir import TRAIN_LOG


def kept_neurons(cfg: ConvertConfig, num_neurons: int) -> int:
    return cfg.shared + round((num_neurons - cfg.shared - cfg.drop) * cfg.top_k / cfg.experts)


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    weight = linear.weight.detach().index_select(dim, index).clone()
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=linear.bias is not None, dtype=weight.dtype, device=weight.device)
    new.weight.data.copy_(weight)
    if linear.bias is not None:
        new.bias.data.copy_(linear.bias.detach() if dim == 1 else linear.bias.detach()[index])
    return new


def _slice_mlp(mlp: nn.Module, index: torch.Tensor) -> None:
    """Keep only the neurons `index` of a gated MLP (in place)."""
    mlp.gate_proj = _slice_linear(mlp.gate_proj, index, 0)
    mlp.up_proj = _slice_linear(mlp.up_proj, index, 0)
    mlp.down_proj = _slice_linear(mlp.down_proj, index, 1)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(index)


def _pruned_problem(mlp: nn.Module, kept: list, layer: int):
    """dotmoe.refit's problem for a pruned MLP: features = the kept neurons' activations (`kept[layer]`, read when
    called: it may be chosen during the refit), target = the full MLP's output; the MLP is sliced when the fitted
    weight arrives."""
    from dotmoe.refit import LayerProblem

    def build(x: torch.Tensor):
        h = ffn_activations(mlp, x)
        return h[:, kept[layer]], mlp.down_proj(h)

    def apply(weight: torch.Tensor) -> None:
        _slice_mlp(mlp, kept[layer])
        mlp.down_proj.weight.copy_(weight.to(mlp.down_proj.weight.dtype))

    return LayerProblem(build, apply)


def prune_convert(cfg: ConvertConfig, prep, peaks=None, precision=None, progress: bool = False):
    """Prune every gated MLP of `prep.model` in place, save it to <out>/model, and write the record. `precision`: the
    run's `dotmoe.precision.PrecisionChoice` (None: fp32); the model is saved in fp32 either way."""
    from pathlib import Path

    from dotmoe.conversion_result import ConvertResult

    t0 = time.time()
    out = Path(cfg.out)
    model, n = prep.model, prep.num_neurons
    with torch.no_grad():
        dense_ppl = dense_perplexity(model, prep.model_path, prep.eval_ids, cfg.seq_len, cfg.seq_len // 2,
                                     progress=progress)
    peaks = peaks if peaks is not None else StagePeaks()
    peaks.mark("dense_eval")
    keep = kept_neurons(cfg, n)
    teacher = None
    if cfg.steps:  # the dense model, before it is pruned in place
        from dotmoe.distill_dense import teacher_copy
        from dotmoe.precision import autocast_dtype

        teacher = teacher_copy(model, autocast_dtype(cfg.mixed_precision))  # it runs under autocast only
    converted = cfg.calibrate_on == "converted"  # kept neurons chosen during the refit, on the pruned inputs
    kept = [None] * len(prep.mlps) if converted else \
        prep.map_calibration_inputs(cfg, lambda i, x: prune_keep(prep.mlps[i], x, keep), progress)
    peaks.mark("calibrate")
    refit_errors, refit_ridges = _slice_and_refit(cfg, prep, kept, keep, converted, progress)
    if refit_errors is not None:
        peaks.mark("refit")
    prepare_output(out, cfg.overwrite)  # every input is checked: only now may an --overwrite'n result go
    from dotmoe.prepare import preflight

    preflight(out, cfg, model, checkpoints=False)  # writable, with room for the model, before any distillation
    trained = None
    if teacher is not None:
        from dotmoe.distill_dense import distill_dense

        if precision is not None and precision.dtype != torch.float32:
            model.to(torch.float32)  # trained weights are fp32 (choose_precision picks fp32 for them anyway)
        trained = distill_dense(model, teacher, prep.seqs, prep.eval_ids, cfg, out / TRAIN_LOG, progress)
        teacher = None
        peaks.mark("train")
    with torch.no_grad():
        ppl = perplexity(model, prep.eval_ids, cfg.seq_len, cfg.seq_len // 2, progress=progress,
                         desc="perplexity (pruned)")
    peaks.mark("evaluate")
    model_dir = out / "model"
    with staged_directory(model_dir) as tmp:  # a crash never leaves a partial model
        if precision is not None and precision.dtype != torch.float32:  # computed in bf16: saved in fp32 as always
            model.to(torch.float32)
        model.save_pretrained(tmp)
        prep.tokenizer.save_pretrained(tmp)
    peaks.mark("export")
    record = _pruned_record(cfg, prep, model_dir, keep, trained, (ppl, dense_ppl), (refit_errors, refit_ridges),
                            peaks, precision, round(time.time() - t0, 1))
    write_record(out, record)
    mark_complete(out)  # last: only now is this a finished result
    return ConvertResult(out_dir=out, partition=torch.stack(kept), record=record)


def _slice_and_refit(cfg: ConvertConfig, prep, kept: list, keep: int, converted: bool, progress: bool):
    """Slice every MLP to its kept neurons, inside the down-projection refit when asked (each layer on the inputs
    the pruned layers below give it); returns the refit's (errors, ridges), (None, None) without it."""
    model = prep.model
    refit_errors = refit_ridges = None
    if cfg.refit_down:  # slice each layer inside its refit, on the inputs the pruned layers below give it
        from dotmoe.prepare import calibration_sequences
        from dotmoe.refit import refit_sequentially, stream_target

        problems = [_pruned_problem(mlp, kept, i) for i, mlp in enumerate(prep.mlps)]
        calib = calibration_sequences(prep.seqs, cfg)
        # while layer i's problem is built it is still unsliced: the dense layer, no switch needed
        stream = stream_target(model.get_decoder(), len(prep.mlps), cfg.refit_stream, contextlib.nullcontext) \
            if cfg.refit_stream else None
        prepare = (lambda i, x: kept.__setitem__(i, prune_keep(prep.mlps[i], x, keep))) if converted else None
        refit_errors, refit_ridges = refit_sequentially(model.get_decoder(), prep.mlps, problems, calib,
                                                        stream=stream, prepare=prepare, progress=progress)
    else:
        for mlp, index in zip(prep.mlps, kept):
            _slice_mlp(mlp, index)
    model.config.intermediate_size = keep
    return refit_errors, refit_ridges


def _pruned_record(cfg: ConvertConfig, prep, model_dir, keep: int, trained, ppls: tuple[float, float], refit,
                   peaks, precision, wall: float) -> ConversionRecord:
    """The record of a pruned conversion: `ppls` (pruned, dense), `refit` (errors, ridges), `trained` the
    distillation's result (None without training)."""
    from dotmoe.prepare import calibration_sequences

    model, (ppl, dense_ppl), (refit_errors, refit_ridges) = prep.model, ppls, refit
    params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    if not model.config.tie_word_embeddings:
        embed += model.get_output_embeddings().weight.numel()
    return ConversionRecord(
        method="prune", mode="prune", experts=cfg.experts, top_k=cfg.top_k, shared=cfg.shared, drop=cfg.drop,
        gating=None, intermediate_size=prep.num_neurons, kept_neurons=keep, num_layers=len(prep.mlps),
        mlp_modules=prep.mlp_names, base_model=str(prep.model_path.resolve()),
        calibration_tokens=calibration_sequences(prep.seqs, cfg).numel(),
        train_tokens=cfg.steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len, steps=cfg.steps, wall_seconds=wall,
        final_terms={k: v for k, v in trained.history[-1].items() if k not in ("step", "tokens")}
        if trained and trained.history else {}, val_ppl=round(ppl, 4),
        dense_val_ppl=round(dense_ppl, 4), ppl_ratio=round(ppl / dense_ppl, 4),
        eval_curve=trained.eval_curve if trained else [], best_step=trained.best_step if trained else None,
        config=cfg.to_dict(), peak_rss_mb=peaks, stage_seconds=peaks.seconds,
        precision="fp32" if precision is None else precision.name,
        refit_errors=None if refit_errors is None else [round(e, 5) for e in refit_errors],
        refit_ridges=refit_ridges,
        export={"dir": str(model_dir), "architecture": type(model).__name__, "exact": True,
                "total_params": params, "active_params": params, "active_non_embedding_params": params - embed,
                "parity": {}})
