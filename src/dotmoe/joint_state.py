"""What a joint run keeps on disk and in memory to survive a stop: the training checkpoint, a training-free run's
refitted state, the train log's kept records, the best validation state's bookkeeping, and the in-memory snapshot a
non-finite step reverts to."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from dotmoe.checkpoints import load_checkpoint, save_checkpoint
from dotmoe.config import ConvertConfig
from dotmoe.errors import DotMoeError
from dotmoe.resume_guards import check_resume_settings, resume_key
from dotmoe.sharding import load_full_optimizer_state, load_full_state


def load_training_checkpoint(path: Path, cfg: ConvertConfig, steps: int) -> dict:
    """The joint mode's checkpoint, checked: its structure, and that it was written with this run's settings."""
    state = load_checkpoint(path)
    check_resume_settings(path, state.get("config"), resume_key(cfg))
    kinds = {"params": dict, "optimizer": dict, "scheduler": dict, "rng": torch.Tensor, "step": int}
    wrong = [k for k, kind in kinds.items() if not isinstance(state.get(k), kind)]
    if wrong or not 0 <= state["step"] <= steps:
        raise DotMoeError(f"--resume: {path} is damaged ({', '.join(wrong) or 'step out of range'}); rerun with "
                          "--overwrite instead of --resume to start over")
    return state


REFITTED = "refitted"  # the stage a training-free run's checkpoint holds (written after its refit)


def save_refit_checkpoint(path: Path, cfg: ConvertConfig, partition: torch.Tensor, moes: list,
                           errors: list[float], ridges: list[float]) -> None:
    """A training-free run's state right after its refit (the slow part): partition, routers and refitted down
    projections, so an interruption during the evaluation or the export resumes from here (`--resume`)."""
    save_checkpoint({"stage": REFITTED, "step": 0, "partition": partition.clone(),
                     "routers": [m.router.weight.detach().clone() for m in moes],
                     "down": [m.dense.down_proj.weight.detach().clone() for m in moes],
                     "refit_errors": list(errors), "refit_ridges": list(ridges), "config": resume_key(cfg)}, path)


def load_refit_checkpoint(path: Path, cfg: ConvertConfig, num_layers: int, num_neurons: int) -> dict:
    """`save_refit_checkpoint`'s state, checked: its settings are this run's, its shapes this model's."""
    state = load_checkpoint(path)
    check_resume_settings(path, state.get("config"), resume_key(cfg))
    partition = state.get("partition")
    per_layer = ("routers", "down", "refit_errors", "refit_ridges")
    if not (state.get("stage") == REFITTED and isinstance(partition, torch.Tensor)
            and tuple(partition.shape) == (num_layers, num_neurons)
            and all(isinstance(state.get(k), list) and len(state[k]) == num_layers for k in per_layer)
            and all(isinstance(t, torch.Tensor) for t in state["routers"] + state["down"])):
        raise DotMoeError(f"--resume: {path} is damaged (not a refitted training-free state of this model); rerun "
                          "with --overwrite instead of --resume to start over")
    return state


def kept_records(log_path: Path, upto: int, events: bool = False) -> list[dict]:
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


def best_so_far(history: list[dict], best_path: Path | None) -> tuple[float, int] | None:
    """(val_ppl, step) of the best evaluation in a resumed run's kept records, when its best state is on disk."""
    if best_path is None or not best_path.is_file():
        return None
    scored = [(r["val_ppl"], r["step"]) for r in history if "val_ppl" in r]
    return min(scored, key=lambda e: (e[0], e[1])) if scored else None


def _trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}


def snapshot(module: nn.Module, optimizer) -> tuple[dict, dict]:
    """In-memory copy of the trainable parameters and optimizer state (what a bad step reverts to)."""
    return _trainable_state(module), copy.deepcopy(optimizer.state_dict())


def restore_snapshot(module: nn.Module, optimizer, saved: tuple[dict, dict]) -> None:
    """Put `snapshot`'s copy back into the module's trainable parameters and the optimizer."""
    params, opt_state = saved
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in params:
                p.copy_(params[name])
    optimizer.load_state_dict(copy.deepcopy(opt_state))


# Trainable state (parameters + two AdamW moments) up to this size is snapshotted in memory for a bad step to revert
# to; above it the revert reads the last checkpoint on disk instead (SmolLM2 --trainable full: 1.6 GB of copies)
SNAPSHOT_IN_MEMORY_BYTES = 256 * 2**20


def revert_to_checkpoint(module: nn.Module, optimizer, path: Path) -> None:
    """Put the trainable parameters and the optimizer state back to the checkpoint in `path` (every process)."""
    state = load_checkpoint(path)
    load_full_state(module, state["params"])
    load_full_optimizer_state(optimizer, state["optimizer"])
