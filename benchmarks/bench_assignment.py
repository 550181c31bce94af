"""Benchmark the neuron -> expert assignment: log-domain Sinkhorn vs POT, greedy rounding, greedy-vs-exact gap.

    python benchmarks/bench_assignment.py [--threads 1] [--iters 30] [--repeats 3] [--tau 0.1] [--out FILE]

For each N in {1024, 11008, 14336, 28672} and E in {8, 64}: A = randn(N, E) (seeded), uniform capacities.
- ours: dotmoe.sinkhorn.sinkhorn_log on one problem (float32 torch), median of --repeats runs.
- POT: ot.bregman.sinkhorn_log(a=ones(N), b=caps, M=-A, reg=tau, numItermax=iters, stopThr=0) on numpy
  float64 and float32 inputs; the faster of the two is reported (both are printed). POT also computes its
  marginal error every 10 iterations (an extra exp over the matrix), as it does in normal use.
- greedy: dotmoe.rounding.greedy_round on our plan, median of --repeats runs.
- gap: (exact - greedy) / exact for the plan objective, with exact = scipy LAP over N x N expert slots;
  only for N <= --exact-max-n (default 1024), "n/a" otherwise (N x N matrix and O(N^3) time).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings


def _pin_threads_from_argv() -> None:
    """Numpy/BLAS read their thread counts at import time, so apply --threads before importing them."""
    threads = "1"
    for i, arg in enumerate(sys.argv):
        if arg == "--threads" and i + 1 < len(sys.argv):
            threads = sys.argv[i + 1]
        elif arg.startswith("--threads="):
            threads = arg.split("=", 1)[1]
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, threads)


if __name__ == "__main__":
    _pin_threads_from_argv()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dotmoe.rounding import assignment_objective, exact_round, greedy_round  # noqa: E402
from dotmoe.sinkhorn import capacities, sinkhorn_log  # noqa: E402

NS = (1024, 11008, 14336, 28672)
ES = (8, 64)


def median_time(fn, repeats: int) -> tuple[float, object]:
    """Median wall time in seconds over `repeats` runs after one warm-up run; also returns the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def fmt_ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exact-max-n", type=int, default=1024)
    ap.add_argument("--no-pot", action="store_true", help="skip POT timings")
    ap.add_argument("--out", type=str, default=None, help="also write the markdown table to this file")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    try:
        import ot  # noqa: F401
        pot_version = ot.__version__
    except ImportError:
        ot = None
        pot_version = "not installed"
    use_pot = ot is not None and not args.no_pot

    lines = [
        f"Machine: {platform.processor() or platform.machine()} ({platform.platform()}), os.cpu_count={os.cpu_count()}; "
        f"torch {torch.__version__}, POT {pot_version}, numpy {np.__version__}; threads={args.threads} "
        f"(torch.set_num_threads; OMP/OPENBLAS/MKL_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} for numpy/POT), iters={args.iters}, tau={args.tau}, "
        f"repeats={args.repeats} (median, after 1 warm-up)",
        "",
        "| N | E | ours sinkhorn (ms) | POT f64 (ms) | POT f32 (ms) | POT best / ours | marginal err (ours) "
        "| greedy (ms) | exact (ms) | gap (exact-greedy)/exact |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)

    for n in NS:
        for e in ES:
            gen = torch.Generator().manual_seed(args.seed + 1000 * e + n)
            A = torch.randn(n, e, generator=gen)
            caps_list = capacities(n, e)
            caps = torch.tensor(caps_list, dtype=torch.float32)
            caps_long = torch.tensor(caps_list)

            with torch.no_grad():  # forward only; training also records the autograd graph
                t_ours, res = median_time(lambda: sinkhorn_log(A, caps, tau=args.tau, iters=args.iters), args.repeats)
            plan = res.plan

            t_pot64 = t_pot32 = None
            if use_pot:
                M64 = -A.double().numpy()
                a64, b64 = np.ones(n), caps.double().numpy()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t_pot64, pot_plan = median_time(
                        lambda: ot.bregman.sinkhorn_log(a64, b64, M64, args.tau, numItermax=args.iters, stopThr=0,
                                                        warn=False), args.repeats)
                    try:
                        M32, a32, b32 = M64.astype(np.float32), a64.astype(np.float32), b64.astype(np.float32)
                        t_pot32, pot_plan32 = median_time(
                            lambda: ot.bregman.sinkhorn_log(a32, b32, M32, args.tau, numItermax=args.iters,
                                                            stopThr=0, warn=False), args.repeats)
                        if not np.isfinite(pot_plan32).all():
                            t_pot32 = None
                    except Exception as exc:  # POT rejected float32 inputs
                        print(f"POT float32 failed for N={n}, E={e}: {exc!r}", file=sys.stderr)
                        t_pot32 = None
                del pot_plan
            pot_best = min(t for t in (t_pot64, t_pot32) if t is not None) if use_pot else None
            ratio = f"{pot_best / t_ours:.2f}x" if pot_best is not None else "n/a"

            t_greedy, hard = median_time(lambda: greedy_round(plan, caps_long), args.repeats)
            assert torch.equal(torch.bincount(hard, minlength=e), caps_long), "greedy produced an unbalanced split"

            t_exact = None
            gap = "n/a"
            if n <= args.exact_max_n:
                t0 = time.perf_counter()
                exact = exact_round(plan, caps_long)
                t_exact = time.perf_counter() - t0
                obj_exact = assignment_objective(plan, exact)
                obj_greedy = assignment_objective(plan, hard)
                gap = f"{(obj_exact - obj_greedy) / obj_exact:.2e}"

            row = (f"| {n} | {e} | {fmt_ms(t_ours)} | {fmt_ms(t_pot64)} | {fmt_ms(t_pot32)} | {ratio} "
                   f"| {res.marginal_error.item():.1e} | {fmt_ms(t_greedy)} | {fmt_ms(t_exact)} | {gap} |")
            lines.append(row)
            print(row, flush=True)

    footer = [
        "",
        "Targets: ours faster than POT on CPU (POT best / ours > 1); greedy rounding < 50 ms for N=28672, E=8 "
        "on one core (--threads 1).",
        "POT best = faster of POT float64 and float32 numpy inputs. Exact = scipy linear_sum_assignment over "
        f"N x N expert slots, run once (not median), only for N <= {args.exact_max_n}.",
    ]
    print("\n".join(footer))
    lines.extend(footer)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
