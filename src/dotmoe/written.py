"""The record of what dotmoe wrote in a directory, and what a run leaves behind that is never a result.

Every file dotmoe writes is noted in its directory's `.dotmoe-written.json` (name -> size, modification time in ns,
kind: `note_written`, called by every atomic write and staged directory): `--overwrite` replaces only what dotmoe
wrote and nobody changed since (`written_by_dotmoe`), never a file a user put there or edited, whatever its name.
Imports nothing of dotmoe but its errors, so the writers (dotmoe.atomic) can use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LOCK = ".dotmoe.lock"  # held by the run writing the directory
PREVIOUS = ".dotmoe-previous"  # the result an --overwrite run replaces, until the new one is complete
WRITTEN = ".dotmoe-written.json"  # per directory: the size and modification time of each file dotmoe wrote there
INTERNAL = frozenset((LOCK, PREVIOUS, WRITTEN))
DESTINATION_LOCK_SUFFIX = ".dotmoe.lock"  # `.NAME.dotmoe.lock` beside an output replaced whole (run_dir)


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def read_written(directory: Path) -> dict:
    """`directory`'s record of the files dotmoe wrote there: name -> [size, modification time in ns, kind]."""
    try:
        data = json.loads((Path(directory) / WRITTEN).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, list)}


def _write_record(directory: Path, data: dict) -> None:
    # written whole and renamed into place, without atomic_write (which notes every file it writes here)
    record = directory / WRITTEN
    tmp = record.with_name(f"{WRITTEN}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data))
        os.replace(tmp, record)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def note_written(*paths: Path, kind: str = "result") -> None:
    """Record files dotmoe has just written, each in its directory's record with its `kind` (e.g. "eval report"):
    `--overwrite` later replaces a file only if it is still exactly what dotmoe wrote (same name, size and
    modification time; and, for a single-file output, the same kind), never a file a user put there or changed
    since, whatever its name."""
    by_dir: dict[Path, list[Path]] = {}
    for path in map(Path, paths):
        if path.is_file() and not path.is_symlink():
            by_dir.setdefault(path.parent, []).append(path)
    for directory, files in by_dir.items():
        data = read_written(directory)
        data.update({f.name: [*_stamp(f), kind] for f in files})
        _write_record(directory, data)


def note_tree(root: Path) -> None:
    """`note_written` for every file under `root` (a directory dotmoe has just written whole)."""
    for directory in [Path(root), *(p for p in Path(root).rglob("*") if p.is_dir() and not p.is_symlink())]:
        files = [e for e in directory.iterdir() if e.name not in INTERNAL and e.is_file() and not e.is_symlink()]
        if files:
            note_written(*files)


def written_by_dotmoe(entry: Path, record: dict | None = None, kind: str | None = None) -> bool:
    """`entry` is what dotmoe wrote: a file its directory's record lists with the same size and modification
    time (and `kind`, if given), or a directory (not a link) holding only such files and directories."""
    if entry.is_symlink():
        return False
    if entry.is_dir():
        inner = read_written(entry)
        return all(is_leftover(e) or written_by_dotmoe(e, inner) for e in entry.iterdir())
    record = read_written(entry.parent) if record is None else record
    try:
        noted = record.get(entry.name) or []
        return entry.is_file() and noted[:2] == _stamp(entry) and kind in (None, *noted[2:])
    except OSError:
        return False


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line to a log dotmoe writes (e.g. `train_log.jsonl`) and note the file as dotmoe's."""
    with Path(path).open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    note_written(path)


def not_written_by_dotmoe(directory: Path) -> list[str]:
    """The entries of `directory` that dotmoe did not write, or that changed since it wrote them (relative names;
    inside a directory entry, the first file that is not dotmoe's)."""
    record, foreign = read_written(directory), []
    for entry in sorted(directory.iterdir()):
        if is_leftover(entry) or written_by_dotmoe(entry, record):
            continue
        if entry.is_dir() and not entry.is_symlink():
            foreign += [f"{entry.name}/{n}" for n in not_written_by_dotmoe(entry)]
        else:
            foreign.append(entry.name)
    return foreign


def is_temporary(entry: Path) -> bool:
    """A temporary file or directory a killed run may leave behind (never part of a result)."""
    return entry.name.startswith((".dotmoe-write-test-", ".model.tmp-", ".model.old-", f"{WRITTEN}.tmp-")) or \
        entry.name.endswith(".tmp")


def is_leftover(entry: Path) -> bool:
    """Temporary files, empty directories (e.g. made by a run stopped before it wrote anything) and the locks."""
    return (entry.name in INTERNAL or is_temporary(entry) or entry.name.endswith(DESTINATION_LOCK_SUFFIX)
            or entry.is_dir() and not entry.is_symlink() and not any(entry.iterdir()))
