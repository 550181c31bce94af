"""Where a training step's time goes on a real model: operators by self time (shapes, dtypes), page faults, RSS.

    python benchmarks/train_step_profile.py --init-from RUN [--model DIR] [--top-k 2] [--steps 2] [--threads 2] [--data FILE ...]
        [--mixed-precision bf16] [--env NAME=VALUE ...]

RUN is a finished training-free conversion of DIR (e.g. `out/train_recipes/<model>/start` of
benchmarks/train_recipes.py), so no calibration runs first. `dotmoe convert --init-from RUN --tokens
(steps + 1) x 2048` runs in a subprocess with DOTMOE_PROFILE set (dotmoe.step_profile: the first step is a warm-up,
the next `--steps` are profiled) and `--env` added to its environment (e.g. to compare allocator settings: run once
per setting, with the cores otherwise idle). Prints the subprocess's wall, user and system seconds, minor page
faults and peak RSS, then the operator table.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path.home() / ".cache/dotmoe/smollm2-135m-instruct"))
    parser.add_argument("--init-from", required=True, help="a training-free conversion of --model")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=2, help="the top-k RUN was converted with (E is 8)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mixed-precision", default="bf16", choices=("no", "bf16"))
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="torch.compile the training step (ConvertConfig.compile)")
    parser.add_argument("--data", nargs="*", default=[],
                        help="training text files (default: the bundled train split); a text of 8 sequences of 256 "
                             "tokens makes every step after the first take the teacher's outputs from its cache")
    parser.add_argument("--teacher-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the teacher's outputs for revisited sequences (ConvertConfig.teacher_cache_mb)")
    parser.add_argument("--env", nargs="*", default=[], help="NAME=VALUE added to the run's environment")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg, table = Path(tmp, "cfg.yaml"), Path(tmp, "profile.md")
        cfg.write_text(f"mixed_precision: {args.mixed_precision}\ngradient_checkpointing: false\n"
                       f"compile: {str(args.compile).lower()}\n" + ("" if args.teacher_cache else "teacher_cache_mb: 0\n"))
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "DOTMOE_PROFILE": str(table),
               "DOTMOE_PROFILE_STEPS": str(args.steps), **dict(kv.split("=", 1) for kv in args.env)}
        cmd = [sys.executable, "-m", "dotmoe.cli", "convert", "--model", args.model, "--experts", "8", "--top-k", str(args.top_k),
               "--init-from", args.init_from, "--tokens", str((args.steps + 1) * 2048), "--eval-tokens", "2048",
               "--eval-every", "0", "--export-format", "none", "--config", str(cfg), "--out", str(Path(tmp, "run"))]
        cmd += ["--data", *args.data] if args.data else []
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.time() - t0
        if proc.returncode:
            sys.exit(f"{' '.join(cmd)} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
        use = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(f"run: wall {wall:.1f} s, user {use.ru_utime:.1f} s, system {use.ru_stime:.1f} s, minor page faults "
              f"{use.ru_minflt:,}, peak RSS {use.ru_maxrss / 1024:,.0f} MB; {args.threads} threads, "
              f"{' '.join(args.env) or 'no extra environment'}\n")
        print(table.read_text())


if __name__ == "__main__":
    main()
