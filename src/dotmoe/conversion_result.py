"""What a finished conversion returns, and its last step: the export beside it, recorded in its metadata."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dotmoe.config import ConvertConfig
from dotmoe.record import ConversionRecord


@dataclass
class ConvertResult:
    """What a conversion produced: output dir, final partition [L, N] and the record written to it."""

    out_dir: Path
    partition: torch.Tensor
    record: ConversionRecord

    @property
    def summary(self) -> dict:
        """The record in its JSON form (as written to dotmoe_meta.json)."""
        return self.record.to_dict()


def export_and_record(out: Path, cfg: ConvertConfig, record: ConversionRecord, progress: bool,
                      check_tokens: int = 256) -> None:
    """Export the conversion in `out` to `out/model` (unless export_format is none) and record it in the metadata."""
    if cfg.export_format == "none":
        return
    from dotmoe.artifacts import write_record
    from dotmoe.export import export

    exported = export(out, out / "model", fmt=cfg.export_format, overwrite=True, check_tokens=check_tokens,
                      progress=progress, require_complete=False)
    record.export = exported.summary()
    if record.peak_rss_mb is not None:
        record.peak_rss_mb.mark("export")
    write_record(out, record)
