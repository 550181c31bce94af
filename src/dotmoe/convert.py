"""The conversion's entry point: checks the output, takes its lock, and runs the mode and method asked for
(joint training, layer-wise, or pruning)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from dotmoe.config import ConvertConfig
from dotmoe.conversion_result import ConvertResult
from dotmoe.precision import MIXED_PRECISIONS, choose_precision, resolve_mixed_precision
from dotmoe.resume_guards import check_convert_output


def convert(cfg: ConvertConfig, progress: bool = True) -> ConvertResult:
    """Run the DOT-MoE conversion (or a baseline) and write partition + router + metadata to cfg.out.

    `cfg.out` must be new or empty, unless `resume` (continue its checkpoint) or `overwrite` (replace it); it is
    marked complete (COMPLETE) only after everything else, the export included, is written."""
    from dotmoe.allocator import return_large_blocks_to_the_system
    from dotmoe.run_dir import is_main_rank, output_lock, restore_previous

    return_large_blocks_to_the_system()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # accelerate's device (build_accelerator)
    cfg, precision = _resolve_auto_types(cfg, device, progress)
    if progress and cfg.steps:
        print(f"dotmoe: training {cfg.steps * cfg.batch_size * cfg.grad_accum * cfg.seq_len:,} tokens after the "
              f"conversion (--tokens; --tokens 0 converts training-free)", flush=True)
    check_convert_output(cfg)  # before the lock creates OUT: a refused run writes nothing
    with output_lock(cfg.out):
        check_convert_output(cfg)  # again, now that no other run can change OUT
        try:
            if cfg.mode == "layerwise":
                from dotmoe.layerwise import convert_layerwise

                return convert_layerwise(cfg, progress)
            from dotmoe.joint_recipe import train_joint
            from dotmoe.train import start_joint

            begun = start_joint(cfg, progress, precision)
            if begun.cfg.method == "prune":  # pruning (+ distillation) from the same loaded model
                from dotmoe.prune import prune_convert

                return prune_convert(begun.cfg, begun.prep, begun.peaks, begun.precision, progress)
            return train_joint(begun, progress)
        except BaseException:
            if is_main_rank() and restore_previous(Path(cfg.out)):
                print(f"dotmoe: the run stopped before it saved a checkpoint; {cfg.out} holds its previous result "
                      "again", file=sys.stderr)
            raise


def _resolve_auto_types(cfg: ConvertConfig, device: torch.device, progress: bool):
    """`cfg` with `auto` mixed precision and precision resolved (the run, its checkpoint and its record hold the
    types used), and the joint run's PrecisionChoice (None in layer-wise mode, which computes in fp32). A --resume
    takes an auto choice from its checkpoint: a probe on busy cores must not change a resumed run's types."""
    from dotmoe.resume_guards import resumed_setting

    recorded = resumed_setting(cfg.out, "mixed_precision") if cfg.resume and cfg.mixed_precision == "auto" else None
    if recorded in MIXED_PRECISIONS and recorded != "auto":
        mixed, why = recorded, f"mixed precision {recorded}, as the checkpoint was trained (auto, --resume)"
    else:
        mixed, why = resolve_mixed_precision(cfg.mixed_precision, device, cfg.steps > 0 and cfg.trains_weights)
    if mixed != cfg.mixed_precision:
        cfg = cfg.derive(mixed_precision=mixed)
        if progress:
            print(f"dotmoe: {why}", flush=True)
    if cfg.mode == "layerwise":
        return cfg, None
    recorded = resumed_setting(cfg.out, "precision") if cfg.resume and cfg.precision == "auto" else None
    precision = choose_precision(cfg.precision, device, cfg.trains_weights, recorded)
    return cfg.derive(precision=precision.name), precision
