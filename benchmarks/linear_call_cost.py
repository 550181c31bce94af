"""Time one `F.linear` call per (tokens, out, in) shape in bf16 and fp32: the fixed cost of a call vs its bytes.

    python benchmarks/linear_call_cost.py [--threads 2] [--reps 300] [--out FILE]

The shapes are those of one SmolLM2-135M decoder layer at decode time, dense and as our E=8/k=2 Qwen2-MoE export
(router [8, 576], shared-expert gate [1, 576], shared expert 96 neurons, dense FFN 1536 neurons, attention
576x576 and 576x192), at 1 and 8 tokens. A call's time that does not fall with its weight bytes is a fixed cost
per call: every small linear a MoE block adds (router, shared gate, small shared expert) pays it, the dense FFN
does not. The last two columns time bf16 with PyTorch's oneDNN matmuls off (its native kernels). Prints a
markdown table (median of --reps calls after 20 warm-up calls, the weight cache-resident); not a timed test.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch.nn import functional as F

SHAPES = [  # (what, out, in)
    ("shared-expert gate", 1, 576), ("router", 8, 576), ("shared expert gate/up", 96, 576),
    ("shared expert down", 576, 96), ("attention k/v", 192, 576), ("attention q/o", 576, 576),
    ("dense FFN gate/up", 1536, 576), ("dense FFN down", 576, 1536),
]


def call_us(tokens: int, out: int, inp: int, dtype: torch.dtype, reps: int, onednn: bool = True) -> float:
    """Median microseconds of one F.linear([tokens, inp] x [out, inp]^T) call (`onednn=False`: PyTorch's oneDNN
    matmuls off, so bf16 takes PyTorch's native kernels)."""
    x, w = torch.randn(tokens, inp, dtype=dtype), torch.randn(out, inp, dtype=dtype)
    times = []
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=onednn):
        for _ in range(20):
            F.linear(x, w)
        for _ in range(reps):
            t = time.perf_counter()
            F.linear(x, w)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [f"`python benchmarks/linear_call_cost.py --threads {args.threads} --reps {args.reps}`  ",
             f"Machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}. Median us per call.",
             "", "| layer linear | out x in | weight KB (bf16) | 1 token bf16 | 1 token fp32 | 8 tokens bf16 | "
             "8 tokens fp32 | 1 token bf16, oneDNN off | 8 tokens bf16, oneDNN off |", "|---|---|---|---|---|---|---|---|---|"]
    for what, out, inp in SHAPES:
        cells = [f"{call_us(t, out, inp, d, args.reps):.1f}" for t in (1, 8) for d in (torch.bfloat16, torch.float32)]
        cells += [f"{call_us(t, out, inp, torch.bfloat16, args.reps, onednn=False):.1f}" for t in (1, 8)]
        lines.append(f"| {what} | {out} x {inp} | {out * inp * 2 / 1024:.1f} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
