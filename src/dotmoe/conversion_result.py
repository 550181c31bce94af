"""What a finished conversion returns, and its last step: the export beside it, recorded in its metadata."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dotmoe.config import ConvertConfig


@dataclass
class ConvertResult:
    """What a conversion produced: output dir, final partition [L, N] and the summary written to it."""

    out_dir: Path
    partition: torch.Tensor
    summary: dict


def export_and_record(out: Path, cfg: ConvertConfig, summary: dict, progress: bool, check_tokens: int = 256) -> None:
    """Export the conversion in `out` to `out/model` (unless export_format is none) and record it in the metadata."""
    if cfg.export_format == "none":
        return
    from dotmoe.artifacts import write_meta
    from dotmoe.export import export

    exported = export(out, out / "model", fmt=cfg.export_format, overwrite=True, check_tokens=check_tokens,
                      progress=progress, require_complete=False)
    summary["export"] = exported.summary()
    if "peak_rss_mb" in summary:
        summary["peak_rss_mb"].mark("export")
    write_meta(out, summary)
