"""Which float type a conversion computes in: bf16 where the hardware multiplies it fast, else fp32.

bf16 pays only where the matrix units take it natively (CUDA GPUs with bf16; CPUs with AMX or AVX512-BF16). On a
CPU without them, torch's bf16 matmul is emulated: on this project's AVX2 machines (AMD EPYC, 2 cores) it ran at
1-2 GFLOPS against 90-180 GFLOPS in fp32 (`benchmarks/conversion_speed.py` measures both), so bf16 there would be
~80x slower. Flags alone do not say how fast the kernels are, so `auto` times one small matmul in each type on the
device and takes bf16 only when it is clearly faster. Where the CPU has native bf16 the probe only guards: amx_bf16
always computes in bf16, avx512_bf16 unless bf16 measures slower than fp32, so busy cores cannot flip the choice
between runs. In bf16 the frozen weights are stored in bf16 (no re-cast at every call, which is what made autocast
slow), routers, affinities, logits, softmaxes and least-squares problems stay fp32.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dotmoe.errors import DotMoeError

PRECISIONS = ("auto", "fp32", "bf16")
BF16_MIN_SPEEDUP = 1.5  # auto takes bf16 only when its probe matmul is at least this much faster than fp32
_PROBE_SHAPE = (256, 512, 1024)  # tokens x d -> N: an FFN-like shape, ~0.27 GFLOP per call
# one decision per device and process: the hardware does not change within it, and a second probe on cores busy with
# other work could decide otherwise (seen: two conversions in one test compared across bf16 and fp32)
_DECIDED: dict[str, tuple[bool, str]] = {}


@dataclass(frozen=True)
class PrecisionChoice:
    """The compute dtype of a conversion and the one-line reason it was chosen (printed at start)."""

    name: str
    dtype: torch.dtype
    reason: str


def cpu_bf16_flags() -> list[str]:
    """The CPU's native-bf16 feature flags found in /proc/cpuinfo (amx_bf16, avx512_bf16); [] elsewhere."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in ("amx_bf16", "avx512_bf16") if f in flags]


def matmul_gflops(dtype: torch.dtype, device: torch.device, shape: tuple[int, int, int] = _PROBE_SHAPE,
                  min_seconds: float = 0.05) -> float:
    """Measured GFLOPS of one [m, k] @ [k, n] matmul in `dtype` on `device`: the fastest of the calls made in
    `min_seconds` (at least 3). The fastest, not the mean: another process sharing the cores slows some calls by
    10x or more (seen on a 2-core AMX machine: bf16 41 vs fp32 33 GFLOPS on average, ~1000 vs ~170 alone), and a
    busy moment must not decide a whole conversion's float type."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up (kernel selection, first-touch allocation)
    sync()
    best, calls, start = float("inf"), 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        a @ b
        sync()
        best, calls = min(best, time.perf_counter() - t0), calls + 1
    return 2 * m * k * n / best / 1e9


def fast_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether `device` multiplies bf16 natively (CUDA with bf16; a CPU with amx_bf16; one with avx512_bf16 whose
    probe matmul is not slower in bf16; any other whose probe runs bf16 at least BF16_MIN_SPEEDUP x fp32), and the
    measured reason in a few words; probed once per process."""
    key = str(device)
    if key not in _DECIDED:
        _DECIDED[key] = _probe_fast_bf16(device)
    return _DECIDED[key]


def _probe_fast_bf16(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return True, f"{torch.cuda.get_device_name(device)} has bf16"
        return False, "this GPU has no bf16"
    if device.type != "cpu":
        return False, f"no bf16 probe for device {device.type}"
    fp32, bf16 = matmul_gflops(torch.float32, device), matmul_gflops(torch.bfloat16, device)
    flags = cpu_bf16_flags()
    measured = f"probe matmul bf16 {bf16:.1f} vs fp32 {fp32:.1f} GFLOPS; CPU: {', '.join(flags) or 'no amx_bf16 / avx512_bf16'}"
    if "amx_bf16" in flags:
        # the matrix unit is there (~6x fp32 on one free core here): a probe on busy cores must not decide, or
        # two conversions on one machine would compute in different types (seen: a test comparing two failed)
        return True, f"the CPU has amx_bf16; {measured}"
    if "avx512_bf16" in flags:
        # native bf16 dot products (~2x fp32 on an idle core here): bf16 unless it measures slower than fp32. At 1.5x
        # a probe on busy cores decided both ways (ratios 1.50-2.27 measured minutes apart on one AMD EPYC)
        return bf16 >= fp32, measured
    return bf16 >= BF16_MIN_SPEEDUP * fp32, measured


def choose_precision(requested: str, device: torch.device, trains_weights: bool,
                     recorded: str | None = None) -> PrecisionChoice:
    """Resolve `--precision` (auto | fp32 | bf16) for a conversion on `device`; `trains_weights`: FFN or all
    weights train (they need fp32 master copies, which the bf16 mode does not keep: such runs stay fp32).
    `recorded`: the type a resumed checkpoint computed in, which `auto` keeps instead of probing again."""
    if requested not in PRECISIONS:
        raise DotMoeError(f"precision must be one of {', '.join(PRECISIONS)}; got {requested!r}")
    if requested == "auto" and recorded in ("fp32", "bf16"):
        dtype = torch.float32 if recorded == "fp32" else torch.bfloat16
        return PrecisionChoice(recorded, dtype, f"{recorded}, as the checkpoint computed (auto, --resume)")
    if requested == "fp32":
        return PrecisionChoice("fp32", torch.float32, "fp32 as asked (--precision fp32)")
    if trains_weights:
        if requested == "bf16":
            raise DotMoeError("--precision bf16 keeps the model's weights in bf16, so it trains only the router and "
                              "assignment (trainable router+assignment); use --precision fp32 to train weights")
        return PrecisionChoice("fp32", torch.float32, "fp32: the model's weights train (bf16 mode keeps no fp32 "
                                                      "master weights)")
    if requested == "bf16":
        return PrecisionChoice("bf16", torch.bfloat16, "bf16 as asked (--precision bf16)")
    fast, why = fast_bf16(device)
    if fast:
        return PrecisionChoice("bf16", torch.bfloat16, f"bf16 ({why})")
    return PrecisionChoice("fp32", torch.float32, f"fp32 ({why}; --precision bf16 forces it)")


MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")


def resolve_mixed_precision(requested: str, device: torch.device, trains_weights: bool) -> tuple[str, str]:
    """`--mixed-precision` (auto | no | bf16 | fp16) as accelerate takes it (no | bf16 | fp16), and why. auto: bf16
    autocast when the model's weights train (fp32 master weights and optimizer) on a device with fast bf16, else
    no. Measured on SmolLM2-135M at 25% active, 32,768 training tokens on a 2-core AMX CPU: test PPL ratio 3.22 in
    bf16 against 3.21 in fp32, in 568 s against 1,180 s (benchmarks/results/train_recipes_*_c65536_xeon.md)."""
    if requested not in MIXED_PRECISIONS:
        raise DotMoeError(f"mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}; got {requested!r}")
    if requested != "auto":
        return requested, f"mixed precision {requested} as asked"
    if not trains_weights:
        return "no", "no autocast: no weights train (the frozen weights follow --precision)"
    fast, why = fast_bf16(device)
    if fast:
        return "bf16", f"bf16 autocast for training ({why}; --mixed-precision no trains in fp32)"
    return "no", f"fp32 training ({why})"


def autocast(mixed_precision: str, device: torch.device):
    """The autocast context of `--mixed-precision` (no | bf16 | fp16) on `device`, for the loops that accelerate does
    not wrap (the pruned model's distillation): the same computation as accelerate's autocast of the joint run."""
    dtype = autocast_dtype(mixed_precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """The float type autocast computes in under `--mixed-precision` (None for no)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
