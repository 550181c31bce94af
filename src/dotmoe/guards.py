"""Guards against hostile input and interrupted runs: which weight files a model owns, outputs that must not
overlap their inputs or replace a finished result, resume checks, non-finite tensors, and SIGINT/SIGTERM.

Every check raises a one-line `DotMoeError` before anything is written.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from dotmoe.errors import DotMoeError, Interrupted

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

from dotmoe.run_dir import (BEST_STATE, CHECKPOINT, COMPLETE, LAYERWISE_CHECKPOINT, LAYERWISE_DIR,  # noqa: F401
                            RUN_FILES, foreign_entries, foreign_export_entries, is_leftover, is_temporary,
                            file_sha256, refuse_foreign, set_aside)

# settings that change where or how a run is written or computed, never its result: a resume may change them
# (gradient checkpointing recomputes the same forward: bit-identical, tests/test_training_memory.py; compile runs
# the same step with fused kernels: the float rounding of the steps after the resume may differ, nothing else;
# auto resolves it only once the model is loaded, after the resume check)
RUN_ONLY_SETTINGS = ("out", "resume", "overwrite", "checkpoint_every", "export_format", "log_every",
                     "gradient_checkpointing", "compile")


# ---------------------------------------------------------------------------------------------- weight files

def model_weight_files(model_dir: str | Path) -> list[Path]:
    """The model's own safetensors files: `model.safetensors`, or the shards its index names (as transformers
    loads them). Any other `*.safetensors` beside them (Mistral repos ship `consolidated.safetensors`, a second
    copy of the weights) is not the model's and is never read."""
    model_dir = Path(model_dir)
    single, index = model_dir / SAFE_WEIGHTS, model_dir / SAFE_INDEX
    if single.exists() or single.is_symlink():
        _require_regular_file(single, "model weights")
        return [single]
    if not (index.exists() or index.is_symlink()):
        raise DotMoeError(f"{model_dir} has no {SAFE_WEIGHTS} or {SAFE_INDEX} (pickled .bin weights are refused "
                          "for safety)")
    _require_regular_file(index, "weight index")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DotMoeError(f"{index} is not a valid safetensors index ({type(exc).__name__}: {exc})") from exc
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise DotMoeError(f"{index}: weight_map must map tensor names to file names")
    files = []
    for name in sorted(set(weight_map.values())):
        f = model_dir / name
        if Path(name).is_absolute() or ".." in Path(name).parts:  # (a symlinked file is fine: the hub cache's are)
            raise DotMoeError(f"{index} names {name!r}, which is outside {model_dir}")
        _require_regular_file(f, f"weight shard listed in {SAFE_INDEX}")
        files.append(f)
    return files


def _require_regular_file(path: Path, what: str) -> None:
    if not path.exists():
        raise DotMoeError(f"{what} {path} is missing" + (" (a dangling symlink)" if path.is_symlink() else ""))
    if not path.is_file():
        raise DotMoeError(f"{what} {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise DotMoeError(f"{what} {path} is not readable")


def check_finite(named: Iterable[tuple[str, torch.Tensor]], where: str) -> None:
    """Every floating tensor is finite; else a one-line error naming the first bad tensor."""
    for name, t in named:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DotMoeError(f"non-finite weights (NaN/inf) in {where}: tensor {name}")


def check_seq_len(length: int, config, what: str) -> None:
    """`length` tokens fit the model's `max_position_embeddings` (when it declares one)."""
    limit = config.get("max_position_embeddings") if isinstance(config, dict) else \
        getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and not isinstance(limit, bool) and length > limit:
        raise DotMoeError(f"{what} is {length} tokens, above the model's max_position_embeddings {limit}")


# -------------------------------------------------------------------------------------------- output paths

def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError on a symlink loop
        raise DotMoeError(f"{path} cannot be resolved: {exc}") from exc


def _relation(out: Path, other: Path) -> str | None:
    a, b = _resolve(out), _resolve(other)
    if a == b:
        return "is"
    if b in a.parents:
        return "lies inside"
    if a in b.parents:
        return "contains"
    return None


def check_separate(out: str | Path, inputs: dict[str, Iterable[str | Path]], flag: str = "--out") -> None:
    """`out` neither is, contains nor lies inside any input (by resolved path), so writing or replacing it can
    never destroy what the command reads."""
    for label, paths in inputs.items():
        for p in paths:
            if p and (rel := _relation(Path(out), Path(p))):
                raise DotMoeError(f"{flag} {out} {rel} the {label} {p}; write the output somewhere separate")


def _check_ancestors(path: Path, flag: str) -> None:
    """The nearest existing ancestor of `path` is a directory (so `path` can be created under it)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise DotMoeError(f"cannot write {flag} {path}: {parent} is a file, not a directory")
            return


def write_probe(directory: Path) -> None:
    """Write and remove a probe file in `directory` (per process: distributed ranks check at once); raises the
    OSError of a directory that takes no files."""
    probe = directory / f".dotmoe-write-test-{os.getpid()}"
    probe.write_bytes(b"0")
    probe.unlink(missing_ok=True)


def check_file_destination(path: str | Path, flag: str) -> None:
    """A file can be created at `path`: it is not a directory, no existing ancestor is a regular file, and the
    directory it goes into (or its nearest existing ancestor) takes a file (a probe written and removed), so a
    read-only destination is found before the work, not after it."""
    path = Path(path)
    if path.is_dir():
        raise DotMoeError(f"{flag} {path} is a directory; give a file name")
    _check_ancestors(path, flag)
    parent = next((p for p in path.parents if p.exists()), Path("."))
    try:
        write_probe(parent)
    except OSError as exc:
        raise DotMoeError(f"cannot write {flag} {path}: {exc.strerror or exc} in {parent}") from exc


def check_report_destination(out: str | Path, companions: Iterable[Path] = ()) -> None:
    """`eval --out`: a .json file that can be created, and where a file exists already (at `out` or at one of
    its `companions`, the plots) only an earlier report or plot, never an input such as a model's config.json."""
    out = Path(out)
    if out.suffix != ".json":
        raise DotMoeError(f"--out {out} must be a .json file name")
    check_file_destination(out, "--out")
    if out.exists():
        try:
            earlier = json.loads(out.read_text())
        except (OSError, ValueError):
            earlier = None
        if not (isinstance(earlier, dict) and "ppl" in earlier and "model" in earlier):
            raise DotMoeError(f"--out {out} exists and is not an earlier dotmoe eval report; it is not replaced")
    for plot in companions:
        if plot.is_dir() or plot.exists() and read_head(plot) != b"\x89PNG\r\n\x1a\n":
            raise DotMoeError(f"the plot {plot} (written beside --out) exists and is not a PNG; it is not replaced")


def read_head(path: Path, n: int = 8) -> bytes:
    """The first `n` bytes of a file (b"" when it cannot be read)."""
    try:
        with path.open("rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


def check_directory_destination(path: str | Path, flag: str) -> None:
    """A directory can be made at `path`: it is not a file or a symlink, and no existing ancestor is a file."""
    path = Path(path)
    if path.is_symlink():
        raise DotMoeError(f"{flag} {path} is a symbolic link; pass the directory it points to")
    if path.exists() and not path.is_dir():
        raise DotMoeError(f"{flag} {path} exists and is not a directory")
    _check_ancestors(path, flag)


def check_export_destination(convert_dir: Path, out: Path, base_model: Path, overwrite: bool) -> None:
    """`dotmoe export --out`: a directory (not a file or symlink) that is separate from the conversion and its
    dense model (the conversion's own `model/` slot excepted), and empty unless `overwrite`."""
    check_directory_destination(out, "--out")
    if out.resolve() != (convert_dir / "model").resolve():
        check_separate(out, {"conversion": [convert_dir]})
    check_separate(out, {"dense model": [base_model]})
    if out.exists() and any(not is_leftover(e) for e in out.iterdir()):
        refuse_foreign(out, foreign_export_entries(out), "replaced")
        if not overwrite:
            raise DotMoeError(f"{out} holds an earlier export (pass --overwrite to replace it)")


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


def check_resume_settings(path: Path, saved, mine: dict) -> None:
    """A checkpoint's recorded settings equal this run's; else a one-line error naming the ones that differ."""
    if not isinstance(saved, dict):
        raise DotMoeError(f"--resume: {path} records no settings (written by another dotmoe version?); rerun "
                          "with --overwrite to start over")
    changed = sorted(k for k in mine.keys() | saved.keys() if mine.get(k) != saved.get(k)
                     and not (k == "data_sha256" and k not in saved))  # checkpoints from before data digests
    if "data_sha256" in changed:
        raise DotMoeError(f"--resume: the data files changed since {path} was written (same paths, other "
                          "contents); resume with the data it was trained on, or start over with --overwrite")
    if changed:
        detail = ", ".join(f"{k} {saved.get(k)!r} -> {mine.get(k)!r}" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise DotMoeError(f"--resume: {path} was written with other settings ({detail}{more}); rerun with them, or "
                          "with --overwrite instead of --resume to start over")


# ------------------------------------------------------------------------------------------------ signals

class _StopState:
    installed = False
    deferred = False
    signum: int | None = None


_STOP = _StopState()


def _on_signal(signum, frame) -> None:
    if _STOP.deferred and _STOP.signum is None:
        _STOP.signum = signum  # the training loop stops at the next step boundary, after a checkpoint
        return
    raise Interrupted(signum)  # anywhere else (or a second signal): stop now


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` (a KeyboardInterrupt), or under `stop_at_step_boundaries(True)` ask
    the training loop to checkpoint and stop at the next step boundary. Main thread only; the old handlers come back
    after."""
    if threading.current_thread() is not threading.main_thread() or _STOP.installed:
        yield
        return
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    _STOP.installed, _STOP.signum = True, None
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        _STOP.installed, _STOP.deferred, _STOP.signum = False, False, None


def stop_at_step_boundaries(on: bool) -> None:
    """While on, a signal only sets `stop_requested()`, which the training loop polls at step boundaries; turning
    it off with a request pending stops at once. `stop_on_signals` turns it off when its block ends, however."""
    _STOP.deferred = on
    if not on and _STOP.signum is not None:  # arrived after the loop's last poll
        raise Interrupted(_STOP.signum)


def stop_requested() -> int | None:
    """The signal number of a pending stop request (SIGINT/SIGTERM during a deferred region), or None."""
    return _STOP.signum


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


# ------------------------------------------------------------------------------------------------ numbers

def positive_ints(text: str, flag: str) -> list[int]:
    """A comma-separated list of integers >= 1 (e.g. `--batch 1,8`)."""
    try:
        values = [int(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise DotMoeError(f"{flag} takes comma-separated integers >= 1, got {text!r}")
    return values

