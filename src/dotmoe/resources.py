"""Peak resident memory and wall time per stage of a conversion (what `benchmarks/real_models.py` and
`benchmarks/conversion_speed.py` report)."""

from __future__ import annotations

import resource
import sys
import time


def peak_rss_mb() -> int:
    """The process's peak resident set size so far, in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak / 2**20) if sys.platform == "darwin" else int(peak / 2**10)


class StagePeaks(dict):
    """{stage: peak RSS MiB of the process at the end of that stage}, in the order the stages ran. The peak is
    monotone, so the stage where it grows is the stage that set it. `seconds[stage]`: the wall time from the
    previous mark (or the creation) to this one."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self[stage] = peak_rss_mb()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._last, 2)
        self._last = now
