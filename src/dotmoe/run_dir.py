"""What dotmoe writes into an output directory, and the rules that keep everything else safe.

- Every file dotmoe writes is noted in its directory's record (`.dotmoe-written.json`: name, size, modification
  time; `note_written`, called by every atomic write): `--overwrite` replaces only what dotmoe wrote and nobody
  changed since, never a directory that also holds anything else, whatever the names (`foreign_entries`). The
  file names of a `convert` output and of an export live here too (what readers look for).
- `output_lock`: one run at a time per output directory; a second process is refused, naming the holder.
- `set_aside` / `drop_previous` / `restore_previous`: `--overwrite` moves the previous result aside (a rename), and
  it is deleted only once the new result is complete; a run that stops before it saved a checkpoint puts it back.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dotmoe.errors import DotMoeError
from dotmoe.written import (DESTINATION_LOCK_SUFFIX, INTERNAL, LOCK, PREVIOUS, WRITTEN, is_leftover,
                            not_written_by_dotmoe)

# files of a `dotmoe convert` output directory (artifacts.py / joint_recipe.py / layerwise.py own their contents)
COMPLETE = "COMPLETE"  # written last: its presence is what makes a conversion directory a finished result
CHECKPOINT = "checkpoint.pt"
LAYERWISE_CHECKPOINT = "layerwise_checkpoint.pt"
BEST_STATE = "best_state.pt"  # the trainable state at the best validation perplexity so far (joint training)
LAYERWISE_DIR = "layerwise"
META_FILE = "dotmoe_meta.json"
EXPORT_DIR = "model"
TRAIN_LOG = "train_log.jsonl"  # one JSON record per training step (and evaluation, and skipped bad step)
RUN_FILES = (META_FILE, "assignment.safetensors", "trained_weights.safetensors", TRAIN_LOG, EXPORT_DIR,
             BEST_STATE)

# files an export copies from the dense model, and its remote code (export.py)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
REMOTE_CODE = ("configuration_dotmoe.py", "modeling_dotmoe.py")

HASH_CACHE_MIN_BYTES = 64 * 2**20  # smaller files are rehashed (faster than a cache lookup is worth)


def _hash_cache_file() -> Path:
    from dotmoe.gguf_input import cache_root

    return cache_root() / "sha256.json"


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file, remembered per (path, size, modification time) in this process and, for large files, in
    `<dotmoe cache>/sha256.json` across processes: the dense weights a conversion records (14 GB for a 7B model)
    are then read once, not again by every eval and export (the check a file's size and modification time give,
    as git's index does)."""
    key = f"{path}|{size}|{mtime_ns}"
    cache = _hash_cache_file() if size >= HASH_CACHE_MIN_BYTES else None
    if cache is not None and isinstance(hit := read_json_cache(cache).get(key), str):
        return hit
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    value = digest.hexdigest()
    if cache is not None:
        write_json_cache(cache, {**read_json_cache(cache), key: value})
    return value


def read_json_cache(path: Path) -> dict:
    """A JSON cache file's mapping; {} when there is none yet, or it is unreadable or damaged (recompute)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_json_cache(path: Path, data: dict) -> None:
    """Write a JSON cache file whole, then rename it into place; best effort: a cache that cannot be written costs
    only the recomputation next time."""
    from dotmoe.atomic import atomic_write

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data)), unique=True, record=None)
    except (OSError, DotMoeError):
        pass


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, computed once per (path, size, modification time)."""
    path = Path(path).resolve()
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def is_export(path: Path) -> bool:
    """An exported checkpoint written by dotmoe: its config.json has the `dotmoe` record, its conversion record
    is copied beside it."""
    try:
        return "dotmoe" in json.loads((path / "config.json").read_text()) and (path / META_FILE).is_file()
    except (OSError, ValueError, TypeError):
        return False


def foreign_export_entries(path: Path) -> list[str]:
    """The entries of the export directory `path` that dotmoe did not write or that changed since (all of them
    if it is no export)."""
    if not is_export(path):
        return sorted(e.name for e in path.iterdir() if not is_leftover(e))
    return not_written_by_dotmoe(path)


def foreign_entries(out: Path) -> list[str]:
    """The entries of the `convert --out` directory `out` that dotmoe did not write or that changed since it
    wrote them (its records decide, not the file names); inside the export in `model/` and a layer-wise pass in
    `layerwise/` too."""
    return not_written_by_dotmoe(out)


def refuse_foreign(out: Path, foreign: list[str], what: str) -> None:
    """One line: `out` holds files dotmoe did not write, so it is never replaced, whatever the flags."""
    if foreign:
        shown = ", ".join(n.rstrip("/") for n in foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4
                                                                 else "")
        raise DotMoeError(f"--out {out} holds files that dotmoe did not write or that changed since ({shown}); it "
                          f"is not {what}, even with --overwrite: choose another directory")


# ------------------------------------------------------------------------------------------------ the run lock

def _holder(lock_file: Path) -> str:
    try:
        info = json.loads(lock_file.read_text())
        return f"process {info['pid']} on {info['host']} ({info['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def is_main_rank() -> bool:
    """Rank 0 of a distributed run (torchrun sets RANK), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def _acquire(lock_file: Path, out: Path, other: str, unwritable: str):
    """Take the OS lock `lock_file` for writing `out` at once (a held one: refused, naming its holder, "choose
    another `other`") and note the holder in it; the caller releases it."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_file), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise DotMoeError(f"--out {out} is being written by {_holder(lock_file)}; wait for it to finish or choose "
                          f"another {other}") from None
    except OSError as exc:
        raise DotMoeError(f"{unwritable}: {exc.strerror or exc}") from exc
    try:
        lock_file.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                         "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:200]}))
    except OSError:
        pass  # the lock holds without its note (e.g. a full disk): the refusal then names "another process"
    return lock


@contextmanager
def output_lock(out: str | Path) -> Iterator[None]:
    """Hold `out/.dotmoe.lock` for the run (an OS file lock: released when the process dies, however it dies). A
    second run on the same directory is refused at once, naming the holder. A directory this run created and
    left empty is removed again. Distributed ranks other than 0 do not lock (rank 0 holds it for the run)."""
    out = Path(out)
    if not is_main_rank():
        yield
        return
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DotMoeError(f"output directory {out} is not writable: {exc.strerror or exc}") from exc
    lock_file = out / LOCK
    lock = _acquire(lock_file, out, "directory", f"output directory {out} is not writable")
    try:
        yield
    finally:
        lock.release()
        if out.is_dir() and not any(e.name != LOCK for e in out.iterdir()):  # nothing written: leave no trace
            lock_file.unlink(missing_ok=True)
            for path in created:  # innermost first
                try:
                    path.rmdir()
                except OSError:
                    break


@contextmanager
def destination_lock(path: str | Path) -> Iterator[None]:
    """One process at a time writes `path`, an output that is replaced whole (an export directory, a report or
    text file): an OS lock on `.NAME.dotmoe.lock` beside it, removed afterwards; a second process is refused at
    once, naming the holder (as `output_lock` does for a conversion)."""
    path = Path(path)
    if not path.parent.is_dir():  # nothing there to race for yet; the writer makes it (and the checks name a
        yield                     # place that cannot be made)
        return
    lock_file = path.parent / f".{path.name}{DESTINATION_LOCK_SUFFIX}"
    lock = _acquire(lock_file, path, "name", f"cannot write --out {path} (in {path.parent})")
    try:
        yield
    finally:
        lock_file.unlink(missing_ok=True)
        lock.release()


# ------------------------------------------------------------------------------- replacing a previous result

def set_aside(out: Path) -> None:
    """`--overwrite`, just before the new run writes: move what `out` holds into `out/.dotmoe-previous` (renames
    only). Where a previous result is already set aside (an earlier --overwrite run that stopped), it is the one
    kept, and what the stopped run wrote is deleted."""
    previous = out / PREVIOUS
    if not any(e.name not in INTERNAL for e in out.iterdir()):
        return  # nothing to replace
    keep = not previous.exists()
    if keep:
        previous.mkdir()
    record = out / WRITTEN
    if record.exists():  # the record goes with the files it describes
        record.rename(previous / WRITTEN) if keep else record.unlink()
    if keep and (out / COMPLETE).exists():  # the marker first: a crash while moving never looks finished
        (out / COMPLETE).rename(previous / COMPLETE)
    for entry in list(out.iterdir()):
        if entry.name in INTERNAL:
            continue
        if keep:
            entry.rename(previous / entry.name)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def drop_previous(out: Path) -> None:
    """The new result is complete: the one it replaces goes."""
    shutil.rmtree(out / PREVIOUS, ignore_errors=True)


def has_checkpoint(out: Path) -> bool:
    """A checkpoint `--resume` can continue (the joint one, the layer-wise one, or a finished layer-wise pass)."""
    lw = out / LAYERWISE_DIR
    return any(p.is_file() for p in (out / CHECKPOINT, out / LAYERWISE_CHECKPOINT, lw / COMPLETE,
                                     lw / LAYERWISE_CHECKPOINT))


def restore_previous(out: Path) -> bool:
    """A run that replaced a result stopped before finishing: with no checkpoint to resume, delete what it wrote
    and put the previous result back (returns True); with one, keep both (the previous stays set aside until
    the resumed run completes)."""
    previous = out / PREVIOUS
    if not previous.is_dir() or (out / COMPLETE).exists() or has_checkpoint(out):
        return False
    for entry in list(out.iterdir()):
        if entry.name in INTERNAL:
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    (out / WRITTEN).unlink(missing_ok=True)
    for entry in sorted(previous.iterdir(), key=lambda e: (e.name == WRITTEN, e.name == COMPLETE)):  # marker last
        entry.rename(out / entry.name)
    previous.rmdir()
    return True
