"""Checkpoint files: written atomically, read back as tensors and plain data only."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dotmoe.errors import DotMoeError, write_failure


def save_checkpoint(obj: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash or a full disk mid-write leaves the previous checkpoint
    intact and no temporary file behind."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    had_one = path.is_file()
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        why = write_failure(exc)  # torch wraps the OSError in a RuntimeError
        if why:
            kept = "the previous checkpoint is intact; free space and rerun with --resume" if had_one else \
                "no checkpoint was written yet"
            raise DotMoeError(f"cannot write the checkpoint {path}: {why} ({kept})") from exc
        raise


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by `save_checkpoint`; tensors and plain data only (no pickled code is run)."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise DotMoeError(f"--resume: cannot read the checkpoint {path} ({type(exc).__name__}); rerun with "
                          "--overwrite instead of --resume to start over") from exc
    if not isinstance(state, dict):
        raise DotMoeError(f"--resume: {path} is not a dotmoe checkpoint; rerun with --overwrite to start over")
    return state
