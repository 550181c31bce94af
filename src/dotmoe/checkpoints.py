"""Checkpoint files: written atomically, read back as tensors and plain data only."""

from __future__ import annotations

from pathlib import Path

import torch

from dotmoe.atomic import atomic_write
from dotmoe.errors import DotMoeError


def save_checkpoint(obj: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash or a full disk mid-write leaves the previous checkpoint
    intact and no temporary file behind."""
    kept = "the previous checkpoint is intact; free space and rerun with --resume" if path.is_file() else \
        "no checkpoint was written yet"
    atomic_write(path, lambda tmp: torch.save(obj, tmp), what=f"the checkpoint {path}", note=kept)


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
