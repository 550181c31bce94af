"""--precision: the choice follows the measured matmul rates, and a bf16 conversion stays close to the fp32 one."""

from __future__ import annotations

import pytest
import torch

from dotmoe.errors import DotMoeError
from dotmoe.precision import BF16_MIN_SPEEDUP, choose_precision, matmul_gflops

CPU = torch.device("cpu")


def test_auto_takes_bf16_only_when_the_probe_shows_it_fast(monkeypatch):
    import dotmoe.precision as precision

    rates = {torch.float32: 100.0}
    monkeypatch.setattr(precision, "matmul_gflops", lambda dtype, device: rates[dtype])
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])  # no AMX: the probe decides
    monkeypatch.setattr(precision, "_DECIDED", {})
    rates[torch.bfloat16] = 100.0 * BF16_MIN_SPEEDUP * 1.01  # an AMX-like CPU
    choice = choose_precision("auto", CPU, trains_weights=False)
    assert choice.dtype == torch.bfloat16 and "151.5 vs fp32 100.0 GFLOPS" in choice.reason
    rates[torch.bfloat16] = 1.2  # the same process probes once: a busy moment later does not flip the choice
    assert choose_precision("auto", CPU, trains_weights=False) == choice
    monkeypatch.setattr(precision, "_DECIDED", {})  # emulated bf16 (AVX2 only), in a new process
    choice = choose_precision("auto", CPU, trains_weights=False)
    assert choice.dtype == torch.float32 and "bf16 1.2 vs fp32 100.0 GFLOPS" in choice.reason
    assert choose_precision("auto", CPU, trains_weights=True).dtype == torch.float32  # fp32 master weights needed
    assert choose_precision("fp32", CPU, trains_weights=False).dtype == torch.float32
    assert choose_precision("bf16", CPU, trains_weights=False).dtype == torch.bfloat16
    resumed = choose_precision("auto", CPU, trains_weights=False, recorded="bf16")  # the checkpoint's type
    assert resumed.dtype == torch.bfloat16 and "as the checkpoint computed" in resumed.reason
    assert choose_precision("fp32", CPU, trains_weights=False, recorded="bf16").dtype == torch.float32
    with pytest.raises(DotMoeError, match="trains only the router and assignment"):
        choose_precision("bf16", CPU, trains_weights=True)
    with pytest.raises(DotMoeError, match="precision must be one of"):
        choose_precision("fp16", CPU, trains_weights=False)


def test_matmul_probe_measures_a_positive_rate():
    """A finite positive rate; not a speed bound (on 2 loaded cores it measured 0.02 GFLOPS, idle ~100)."""
    import math

    rate = matmul_gflops(torch.float32, CPU, (64, 64, 64), min_seconds=0.005)
    assert math.isfinite(rate) and rate > 0, rate


def test_bf16_conversion_is_close_to_fp32(tiny_llama_dir, tiny_text, tmp_path):
    """The same training-free conversion in bf16 (weights stored in bf16, routers and least squares in fp32) and in
    fp32: the perplexity ratios agree within 2%, the record says which precision ran, and the export is fp32."""
    import json

    from dotmoe.config import ConvertConfig
    from dotmoe.convert import convert

    ratios = {}
    for name in ("fp32", "bf16"):
        cfg = ConvertConfig(model=str(tiny_llama_dir), data=[str(tiny_text)], eval_data=[str(tiny_text)],
                            out=str(tmp_path / name), experts=4, top_k=2, seq_len=32, batch_size=4,
                            calib_tokens=512, eval_tokens=512, precision=name, tokens=0)
        summary = convert(cfg, progress=False).summary
        assert summary["precision"] == name
        ratios[name] = summary["ppl_ratio"]
        exported = json.loads((tmp_path / name / "model" / "config.json").read_text())
        assert exported["dtype"] == "float32"
    assert abs(ratios["bf16"] / ratios["fp32"] - 1) < 0.02, ratios


def test_an_amx_cpu_computes_in_bf16_however_busy_its_cores(monkeypatch):
    import dotmoe.precision as precision

    monkeypatch.setattr(precision, "matmul_gflops", lambda dtype, device: 1.2 if dtype == torch.bfloat16 else 100.0)
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["amx_bf16", "avx512_bf16"])
    monkeypatch.setattr(precision, "_DECIDED", {})
    choice = choose_precision("auto", CPU, trains_weights=False)
    assert choice.dtype == torch.bfloat16 and "has amx_bf16" in choice.reason and "bf16 1.2 vs fp32 100.0" in choice.reason
    assert choose_precision("auto", CPU, trains_weights=True).dtype == torch.float32


def test_matmul_probe_takes_the_fastest_call_not_the_mean(monkeypatch):
    """Another process sharing the cores slows some calls: the probe reports the fastest (here 0.25 s of 1, 0.5,
    0.25), so a busy moment does not decide the conversion's float type."""
    from dotmoe import precision

    clock = iter([0.0, 0.0, 1.0, 1.0, 1.5, 1.5, 1.75, 1.75])
    monkeypatch.setattr(precision.time, "perf_counter", lambda: next(clock))
    rate = matmul_gflops(torch.float32, CPU, (64, 32, 16), min_seconds=0.05)
    assert rate == pytest.approx(2 * 64 * 32 * 16 / 0.25 / 1e9)


def test_an_avx512_bf16_cpu_takes_bf16_unless_it_measures_slower(monkeypatch):
    """Native bf16 dot products without AMX: the probe only guards against a slower bf16 (a busy-core probe measured
    1.50x-2.27x minutes apart on one machine, and the 1.5x rule of flagless CPUs decided both ways)."""
    import dotmoe.precision as precision

    rates = {torch.float32: 100.0, torch.bfloat16: 120.0}
    monkeypatch.setattr(precision, "matmul_gflops", lambda dtype, device: rates[dtype])
    for flags, speed, dtype in ((["avx512_bf16"], 120.0, torch.bfloat16), (["avx512_bf16"], 90.0, torch.float32),
                                ([], 120.0, torch.float32)):
        monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: flags)
        monkeypatch.setattr(precision, "_DECIDED", {})
        rates[torch.bfloat16] = speed
        assert choose_precision("auto", CPU, trains_weights=False).dtype == dtype, (flags, speed)
