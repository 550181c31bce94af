"""Peak resident memory per stage of a conversion (what `benchmarks/real_models.py` reports)."""

from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> int:
    """The process's peak resident set size so far, in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak / 2**20) if sys.platform == "darwin" else int(peak / 2**10)


class StagePeaks(dict):
    """{stage: peak RSS MiB of the process at the end of that stage}, in the order the stages ran. The peak is
    monotone, so the stage where it grows is the stage that set it."""

    def mark(self, stage: str) -> None:
        self[stage] = peak_rss_mb()
