"""Where a training step's time goes: torch.profiler over a few steps, written as a table (opt-in, by environment).

    DOTMOE_PROFILE=FILE DOTMOE_PROFILE_STEPS=2 dotmoe convert ... --tokens N

profiles steps 2 .. 1 + DOTMOE_PROFILE_STEPS (the first is a warm-up) and writes to FILE the operators by self CPU
time, grouped by input shapes and dtypes, with the steps' wall time. Unset (the default), it costs nothing.
`benchmarks/train_step_profile.py` runs it on a real model.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


class StepProfiler:
    """Call `step(i)` before each training step i (0-based, from the run's first step) and `close()` after the loop."""

    def __init__(self, first_step: int):
        self.path = os.environ.get("DOTMOE_PROFILE")
        self.steps = int(os.environ.get("DOTMOE_PROFILE_STEPS", "2"))
        self.begin, self.end = first_step + 1, first_step + 1 + self.steps
        self.prof = None
        self.t0 = 0.0

    def step(self, i: int) -> None:
        if not self.path:
            return
        if i == self.begin:
            from torch.profiler import ProfilerActivity, profile

            self.prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif i == self.end:
            self.close()

    def close(self) -> None:
        if self.prof is None:
            return
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        rows: dict[tuple, list[float]] = {}  # (operator, shapes, dtypes) -> [self seconds, calls]
        for e in self.prof.events():
            if e.self_cpu_time_total <= 0:
                continue
            key = (e.name, str(e.input_shapes), str(getattr(e, "input_dtypes", "")))
            row = rows.setdefault(key, [0.0, 0])
            row[0] += e.self_cpu_time_total / 1e6
            row[1] += 1
        total = sum(r[0] for r in rows.values())
        lines = [f"steps profiled: {self.steps}; wall {wall:.2f} s ({wall / self.steps:.2f} s/step); "
                 f"operator self time {total:.2f} s", "",
                 "| operator | input shapes | dtypes | calls / step | self s / step | share |", "|---|---|---|---|---|---|"]
        for (name, shapes, dtypes), (secs, calls) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:40]:
            lines.append(f"| {name} | {shapes[:80]} | {dtypes[:60]} | {calls / self.steps:g} | "
                         f"{secs / self.steps:.3f} | {secs / total:.1%} |")
        by_op: dict[str, float] = {}
        for (name, _, _), (secs, _) in rows.items():
            by_op[name] = by_op.get(name, 0.0) + secs
        lines += ["", "| operator (all shapes) | self s / step | share |", "|---|---|---|"]
        lines += [f"| {k} | {v / self.steps:.3f} | {v / total:.1%} |"
                  for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])[:25]]
        Path(self.path).write_text("\n".join(lines) + "\n")
        self.prof = None
