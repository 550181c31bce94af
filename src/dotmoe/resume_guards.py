"""Guards of a run's output directory and its resume: what `--out` holds, when it may be replaced or continued,
the settings a checkpoint must match, the set-aside of an `--overwrite`, and what to run after an interruption.

Every check raises a one-line `DotMoeError` before anything is written.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import torch

from dotmoe.errors import DotMoeError
from dotmoe.guards import check_separate
from dotmoe.run_dir import (CHECKPOINT, COMPLETE, LAYERWISE_CHECKPOINT, LAYERWISE_DIR, RUN_FILES, file_sha256,
                            foreign_entries, refuse_foreign, set_aside)
from dotmoe.written import is_leftover, is_temporary

# settings that change where or how a run is written or computed, never its result: a resume may change them
# (gradient checkpointing recomputes the same forward: bit-identical, tests/test_training_memory.py; compile runs
# the same step with fused kernels: the float rounding of the steps after the resume may differ, nothing else;
# auto resolves it only once the model is loaded, after the resume check; the teacher cache gives the numbers the
# teacher would: bit-identical, tests/test_teacher_cache.py)
RUN_ONLY_SETTINGS = ("out", "resume", "overwrite", "checkpoint_every", "export_format", "log_every",
                     "gradient_checkpointing", "compile", "teacher_cache_mb")


def output_state(out: str | Path) -> str:
    """What a `convert --out` directory holds: new | empty | file | complete | resumable | unfinished | other."""
    out = Path(out)
    if not out.exists():
        return "file" if out.is_symlink() else "new"
    if not out.is_dir():
        return "file"
    names = {e.name for e in out.iterdir() if not is_leftover(e)}
    if not names:
        return "empty"
    if COMPLETE in names:
        return "complete"
    lw = out / LAYERWISE_DIR
    if names & {CHECKPOINT, LAYERWISE_CHECKPOINT} or (lw / COMPLETE).is_file() or (lw / LAYERWISE_CHECKPOINT).is_file():
        return "resumable"
    if names & set(RUN_FILES) or LAYERWISE_DIR in names:
        return "unfinished"
    return "other"


def check_convert_output(cfg) -> None:
    """`convert --out` against `--resume` / `--overwrite`: a finished result or an interrupted run's checkpoint
    is never replaced silently, `--resume` needs something to resume, and the output overlaps no input."""
    from dotmoe.paths import default_data_file, reference_model_dir

    out = Path(cfg.out)
    if cfg.resume and cfg.overwrite:
        raise DotMoeError("--resume continues the run in --out and --overwrite starts it over; pass only one")
    state = output_state(out)
    if state == "file":
        raise DotMoeError(f"--out {out} " + ("is a dangling symbolic link" if out.is_symlink() and not out.exists()
                                             else "exists and is not a directory"))
    check_separate(out, {"model": [cfg.model or reference_model_dir()],
                         "data file": cfg.data or [default_data_file("train", cfg.model)],
                         "evaluation data file": cfg.eval_data or [default_data_file("validation", cfg.model)],
                         "--init-from conversion": [cfg.init_from]})
    if cfg.resume:
        if state != "resumable":
            why = {"complete": "it holds a finished conversion (pass --overwrite to redo it)",
                   "unfinished": "it holds an unfinished conversion without a checkpoint (pass --overwrite to start "
                                 "over)",
                   "other": "it holds no dotmoe checkpoint",
                   "new": "it does not exist"}.get(state, "it holds no checkpoint")
            raise DotMoeError(f"--resume: nothing to resume in {out}: {why}")
        _check_resume_target(out, cfg)
        return
    if state in ("new", "empty"):
        return
    refuse_foreign(out, foreign_entries(out), "replaced")  # --overwrite replaces only what dotmoe wrote
    if cfg.overwrite:
        return
    why = {"complete": "holds a finished conversion", "resumable": "holds an interrupted run's checkpoint "
           "(pass --resume to continue it)", "unfinished": "holds an unfinished conversion"}.get(state, "is not empty")
    raise DotMoeError(f"--out {out} {why}; pass --overwrite to replace it, or choose another directory")


def _peek_settings(path: Path):
    """The settings recorded in a checkpoint (memory-mapped: nothing large is read), or None."""
    try:
        state = torch.load(path, weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise DotMoeError(f"--resume: cannot read the checkpoint {path} ({type(exc).__name__}); rerun with "
                          "--overwrite instead of --resume to start over") from exc
    return state.get("config") if isinstance(state, dict) else None


def resumed_setting(out: str | Path, name: str):
    """The value of setting `name` that the training checkpoint in `out` was written with (None: no such checkpoint
    or setting). A --resume takes an `auto` choice from it, so a probe that measures differently on resume (busy
    cores) neither refuses the resume nor changes the run."""
    path = Path(out) / CHECKPOINT
    settings = _peek_settings(path) if path.is_file() else None
    return settings.get(name) if isinstance(settings, dict) else None


def _check_resume_target(out: Path, cfg) -> None:
    """Before the model loads: the checkpoint this run would continue exists and was written with its settings
    (the run checks again when it reads it)."""
    if cfg.mode == "layerwise" and cfg.global_tokens:
        if (out / CHECKPOINT).is_file():  # the global phase's own checkpoint
            check_resume_settings(out / CHECKPOINT, _peek_settings(out / CHECKPOINT), resume_key(cfg.global_phase()))
            return
        path, mine = out / LAYERWISE_DIR / LAYERWISE_CHECKPOINT, resume_key(cfg, "global_tokens")
        if (out / LAYERWISE_DIR / COMPLETE).is_file():
            return  # a finished layer-wise pass: compared with this run's settings when the run starts
    elif cfg.mode == "layerwise":
        path, mine = out / LAYERWISE_CHECKPOINT, resume_key(cfg, "global_tokens")
    else:
        path, mine = out / CHECKPOINT, resume_key(cfg)
    if path.is_file():
        check_resume_settings(path, _peek_settings(path), mine)
        return
    for other, ignore in ((out / CHECKPOINT, ()), (out / LAYERWISE_CHECKPOINT, ("global_tokens",))):
        if other.is_file():  # another mode's checkpoint: say which settings differ
            check_resume_settings(other, _peek_settings(other), resume_key(cfg.derive(global_tokens=0), *ignore))
    raise DotMoeError(f"--resume: {out} holds no checkpoint that this {cfg.mode} run can continue")


def prepare_output(out: str | Path, overwrite: bool) -> None:
    """Just before a conversion writes: remove a killed run's temporary files, and with `overwrite` set the
    previous contents aside (`run_dir.set_aside`: deleted only once the new result is complete)."""
    out = Path(out)
    if not out.is_dir():
        return
    for entry in list(out.iterdir()):
        if is_temporary(entry):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    if overwrite:
        set_aside(out)


def settings_key(settings: dict, *ignore: str) -> dict:
    """The settings (a ConvertConfig as a dict) a checkpoint must match to be resumed: all but those that only say
    where or how to write, and `ignore`."""
    return {k: v for k, v in settings.items() if k not in RUN_ONLY_SETTINGS + ignore}


def resume_key(cfg, *ignore: str) -> dict:
    """`settings_key` of a ConvertConfig, with the sha256 of its data files (same paths, other text: not the
    same run)."""
    from dotmoe.paths import default_data_file

    key = settings_key(cfg.to_dict(requested=True), *ignore)
    files = {"data": cfg.data or [default_data_file("train", cfg.model)],
             "eval_data": cfg.eval_data or [default_data_file("validation", cfg.model)]}
    try:
        key["data_sha256"] = {k: [file_sha256(f) for f in v] for k, v in files.items()}
    except OSError:
        pass  # a missing file is reported, with its name, when the data is read
    return key


def _is_default(name: str, value) -> bool:
    """Whether `value` is ConvertConfig's default for setting `name`: a checkpoint written before the setting
    existed ran with exactly that behaviour (e.g. `hidden_weight` 0.0: no layer term)."""
    from dataclasses import MISSING, fields

    from dotmoe.config import ConvertConfig

    default = next((f.default for f in fields(ConvertConfig) if f.name == name), MISSING)
    return default is not MISSING and value == default


def check_resume_settings(path: Path, saved, mine: dict) -> None:
    """A checkpoint's recorded settings equal this run's; else a one-line error naming the ones that differ."""
    if not isinstance(saved, dict):
        raise DotMoeError(f"--resume: {path} records no settings (written by another dotmoe version?); rerun "
                          "with --overwrite to start over")
    changed = sorted(k for k in mine.keys() | saved.keys() if mine.get(k) != saved.get(k)
                     and not (k == "data_sha256" and k not in saved)  # checkpoints from before data digests
                     and not (k not in saved and _is_default(k, mine[k]))  # a setting added since, left as it was
                     and not (k == "precision" and saved.get(k) == "auto"))  # from before auto was recorded resolved
    if "data_sha256" in changed:
        raise DotMoeError(f"--resume: the data files changed since {path} was written (same paths, other "
                          "contents); resume with the data it was trained on, or start over with --overwrite")
    if changed:
        detail = ", ".join(f"{k} {saved.get(k)!r} -> {mine.get(k)!r}" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise DotMoeError(f"--resume: {path} was written with other settings ({detail}{more}); rerun with them, or "
                          "with --overwrite instead of --resume to start over")


def convert_hint(out: str | Path, argv: list[str]) -> str:
    """What to run after an interrupted `convert`: resume it, or rerun it when nothing resumable was saved."""
    args = [a for a in argv if a not in ("--resume", "--overwrite")]
    state = output_state(out)
    if state == "resumable":
        return "resume with: " + shlex.join(["dotmoe", *args, "--resume"])
    if state in ("new", "empty"):
        return "nothing was saved yet; rerun: " + shlex.join(["dotmoe", *args])
    if state == "complete":
        return f"the conversion in {out} had already finished"
    return "no checkpoint was saved yet; start over with: " + shlex.join(["dotmoe", *args, "--overwrite"])
