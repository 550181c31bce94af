"""The opt-in training-step profiler (DOTMOE_PROFILE) and the autocast of loops accelerate does not wrap."""

from __future__ import annotations

import torch

from dotmoe.precision import autocast
from dotmoe.step_profile import StepProfiler


def test_profiler_writes_the_profiled_steps_only(tmp_path, monkeypatch):
    table = tmp_path / "profile.md"
    monkeypatch.setenv("DOTMOE_PROFILE", str(table))
    monkeypatch.setenv("DOTMOE_PROFILE_STEPS", "2")
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    prof = StepProfiler(first_step=0)
    for step in range(5):  # step 0 warms up, 1-2 are profiled: one mm each, step 3 closes; 3-4 are not counted
        prof.step(step)
        a @ b
        if step == 2:
            a + 1.0
    prof.close()
    text = table.read_text()
    assert text.startswith("steps profiled: 2;")
    mm = next(line for line in text.splitlines() if line.startswith("| aten::mm | [[64, 32], [32, 16]]"))
    assert mm.split("|")[4].strip() == "1"  # calls per step: 2 calls over 2 steps
    assert "aten::add" in text


def test_profiler_unset_does_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("DOTMOE_PROFILE", raising=False)
    prof = StepProfiler(first_step=0)
    for step in range(4):
        prof.step(step)
    prof.close()
    assert prof.prof is None and not list(tmp_path.iterdir())


def test_autocast_follows_mixed_precision():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with autocast("bf16", torch.device("cpu")):
        assert torch.nn.functional.linear(x, w).dtype == torch.bfloat16
    with autocast("no", torch.device("cpu")):
        assert torch.nn.functional.linear(x, w).dtype == torch.float32
