"""Writes that never leave a half-written result: a file or directory is written whole under a temporary name
beside its target, then renamed onto it (a rename within a directory is atomic). A failure (full disk, signal,
bug) removes the temporary and leaves any previous target intact. The one place this is written."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dotmoe.errors import DotMoeError, write_failure


def temporary_name(path: Path, unique: bool = False) -> Path:
    """Where `path` is written before its rename: `NAME.tmp`, or `.NAME.tmp-PID` when several processes may write
    the same file at once (a shared cache)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}" if unique else path.name + ".tmp")


def atomic_write(path: Path, write: Callable[[Path], object], what: str | None = None, note: str = "",
                 unique: bool = False, record: str | None = "result") -> None:
    """`write(tmp)`, then rename `tmp` onto `path` and note it in its directory's record of what dotmoe wrote,
    as a file of kind `record` (None: a cache, not recorded). An OSError (or one a library wrapped) becomes the
    one-line error "cannot write WHAT: REASON (NOTE)"; anything else is re-raised as it is."""
    from dotmoe.written import note_written

    path = Path(path)
    tmp = temporary_name(path, unique)
    try:
        write(tmp)
        os.replace(tmp, path)
        if record:
            note_written(path, kind=record)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        why = write_failure(exc)  # safetensors and torch wrap the OSError
        if why:
            raise DotMoeError(f"cannot write {what or path}: {why}" + (f" ({note})" if note else "")) from exc
        raise


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A fresh temporary directory beside `target` to write into; when the block finishes its files are noted as
    dotmoe's and it replaces `target` (a previous one is renamed aside, then deleted), when the block fails it is
    removed and `target` stays."""
    target = Path(target)
    tmp = temporary_name(target, unique=True)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    from dotmoe.written import note_tree

    try:
        yield tmp
        note_tree(tmp)  # renames keep the sizes and modification times the records hold
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            shutil.rmtree(old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
