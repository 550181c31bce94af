"""Guards against hostile input: which weight files a model owns, outputs that must not overlap their inputs or
replace a finished export, destinations that can be written, non-finite tensors, sequence lengths, integer lists
(a run's output directory and its resume: dotmoe.resume_guards; signals: dotmoe.stop_signals).

Every check raises a one-line `DotMoeError` before anything is written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from dotmoe.errors import DotMoeError
from dotmoe.run_dir import foreign_export_entries, refuse_foreign
from dotmoe.written import is_leftover, written_by_dotmoe

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

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
    check_replaceable_file(out, "--out", "eval report")
    for plot in companions:
        check_replaceable_file(plot, "the plot written beside --out,", "plot")


def check_replaceable_file(path: Path, flag: str, kind: str) -> None:
    """An existing file at `path` is replaced only if dotmoe wrote it as a file of this `kind` (an earlier eval
    report, ...) and it has not changed since (its directory's record says so): never an input, a user's file,
    another kind of output (a model's config.json) or an edited result, whatever its name."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise DotMoeError(f"{flag} {path} is a directory; give a file name")
    if (path.exists() or path.is_symlink()) and not written_by_dotmoe(path, kind=kind):
        raise DotMoeError(f"{flag} {path} exists and is not an earlier dotmoe {kind} (dotmoe did not write it, "
                          "or it changed since); it is not replaced, even with --overwrite: choose another name")


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

