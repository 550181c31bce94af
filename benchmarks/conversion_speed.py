"""Where a conversion's time goes, old code vs new, side by side: stage seconds, training tokens/s, peak RSS, and the
compute bound of each run from the matmul rates measured on this machine in the same run.

    python benchmarks/conversion_speed.py --model DIR [--old REF] [--threads 1] [--runs tf train full]
        [--out benchmarks/results/conversion_speed.md]

`--old REF` (default HEAD): that commit of this repository, checked out into a temporary git worktree, runs the same
commands as the working tree, at the same time (both processes start together with `--threads` threads each), so
the speed-up is a ratio of two runs that shared the machine equally, not two absolute numbers from different moments.
Runs (`dotmoe convert --model DIR --experts 8 --top-k 2` plus):
- tf: nothing else: the training-free default (65,536 calibration tokens, 32,768 evaluation tokens, export).
- train: `--tokens 8192 --calib-tokens 2048 --eval-tokens 4096 --export-format none` (4 steps of 8 x 256 tokens,
  trainable router+assignment); tokens/s from the last step of train_log.jsonl (training only).
- full: the same with `--trainable full`.
Per stage (`stage_seconds` in each run's dotmoe_meta.json, new code only where the old code did not record it),
peak RSS per process (wait4), and tokens/s. The bound column: the run's matmul FLOPs (from the model's shapes) over
the fp32 rate measured here at `--threads`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dotmoe.artifacts import read_record

REPO = Path(__file__).resolve().parents[1]
RUNS = {
    "tf": ["--tokens", "0"],
    "train": ["--tokens", "8192", "--calib-tokens", "2048", "--eval-tokens", "4096", "--export-format", "none"],
    "full": ["--tokens", "8192", "--calib-tokens", "2048", "--eval-tokens", "4096", "--export-format", "none",
             "--trainable", "full"],
}


def matmul_rates(threads: int) -> list[tuple[str, float, float]]:
    """(shape, fp32 GFLOPS, bf16 GFLOPS) at the FFN, down-projection and LM-head shapes of SmolLM2."""
    from dotmoe.precision import matmul_gflops

    torch.set_num_threads(threads)
    rows = []
    for shape in ((2048, 576, 1536), (2048, 1536, 576), (1024, 576, 49152)):
        rows.append((" x ".join(map(str, shape)), matmul_gflops(torch.float32, torch.device("cpu"), shape, 0.5),
                     matmul_gflops(torch.bfloat16, torch.device("cpu"), (256, shape[1], 512), 0.5)))
    return rows


def model_flops(model_dir: str) -> dict[str, float]:
    """Forward matmul FLOPs per token of the decoder layers and of the LM head (2 x weights; attention scores over a
    256-token window added)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    d, n, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    hd = cfg.get("head_dim") or d // heads
    attn = d * heads * hd * 2 + d * kv * hd * 2
    per_layer = 2 * (attn + 3 * d * n) + 2 * 2 * heads * hd * 128  # mean causal context of a 256-token window
    return {"layers": layers * per_layer, "ffn_h": layers * 2 * 2 * d * n, "head": 2 * d * cfg["vocab_size"],
            "gram": layers * 2 * (n * n + n * d)}


def bound_seconds(run: str, flops: dict[str, float], meta: dict, rate: float) -> float | None:
    """Matmul FLOPs of the training-free conversion's passes over the fp32 rate (GFLOPS): calibration (one dense
    pass + the router's activations), refit (a pass to the FFN input + activations + Gram matrices, then a full pass),
    the two evaluations (windows overlap by half: 2 x eval tokens, LM head included)."""
    if run != "tf":
        return None
    cfg = meta["config"]
    calib, evals = cfg.get("calib_tokens") or 65536, 2 * cfg["eval_tokens"]
    total = calib * (flops["layers"] + flops["ffn_h"]) + calib * (2 * flops["layers"] + flops["gram"]) + \
        2 * evals * (flops["layers"] + flops["head"])
    return total / (rate * 1e9)


def train_bound(flops: dict[str, float], rate: float, full: bool) -> float:
    """Tokens/s bound of a training step: teacher forward, student forward + recomputation (activation
    checkpointing), backward (input gradients; weight gradients too when weights train), LM head 3x (teacher,
    student, gradient)."""
    backward = 2 if full else 1
    per_token = flops["layers"] * (3 + backward) + flops["head"] * (3 + (1 if full else 0))
    return rate * 1e9 / per_token


def launch(src: Path, model: str, run: str, out: Path, threads: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-c", "import sys; from dotmoe.cli import main; sys.exit(main())", "convert",
           "--model", model, "--experts", "8", "--top-k", "2", "--out", str(out), "--overwrite", *RUNS[run]]
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(out.parent))


def wait_all(procs: dict[str, subprocess.Popen]) -> dict[str, dict]:
    """Per process: wall seconds and peak RSS (MiB) from wait4; failures raise with the log's tail."""
    start, done = time.perf_counter(), {}
    pending = {p.pid: name for name, p in procs.items()}
    while pending:
        pid, status, usage = os.wait4(-1, 0)
        if pid not in pending:
            continue
        name = pending.pop(pid)
        done[name] = {"wall": time.perf_counter() - start, "rss_mb": usage.ru_maxrss / 1024,
                      "rc": os.waitstatus_to_exitcode(status)}
    return done


def tokens_per_s(out: Path) -> float | None:
    log = out / "train_log.jsonl"
    if not log.is_file():
        return None
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "tokens_per_s" in r]
    return steps[-1]["tokens_per_s"] if steps else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--old", default="HEAD", help="git ref of the old code (default HEAD)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/conversion_speed.md"))
    parser.add_argument("--work", help="directory for the runs (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="dotmoe-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    old_tree = work / "old-tree"
    if not old_tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old_tree), args.old], check=True,
                       capture_output=True)
    old_commit = subprocess.run(["git", "-C", str(old_tree), "rev-parse", "--short", "HEAD"], check=True,
                                capture_output=True, text=True).stdout.strip()
    rates = matmul_rates(args.threads)
    fp32_ffn = rates[0][1]
    flops = model_flops(args.model)
    rows = []
    for run in args.runs:
        outs = {"old": work / f"{run}-old", "new": work / f"{run}-new"}
        procs = {"old": launch(old_tree / "src", args.model, run, outs["old"], args.threads),
                 "new": launch(REPO / "src", args.model, run, outs["new"], args.threads)}
        result = wait_all(procs)
        for version in ("old", "new"):
            if result[version]["rc"] != 0:
                tail = (outs[version].parent / f"{outs[version].name}.log").read_text()[-2000:]
                raise SystemExit(f"{run} {version} failed (rc {result[version]['rc']}):\n{tail}")
            meta = read_record(outs[version]).to_dict()  # older code's records load too
            rows.append({"run": run, "version": version, **result[version], "tok_s": tokens_per_s(outs[version]),
                         "stages": meta.get("stage_seconds"), "val_ppl": meta["val_ppl"],
                         "ratio": meta["ppl_ratio"], "bound": bound_seconds(run, flops, meta, fp32_ffn),
                         "train_bound": None if run == "tf" else train_bound(flops, fp32_ffn, run == "full")})
        print(json.dumps(rows[-2:], indent=1, default=str), flush=True)
        write_table(Path(args.out), rows, rates, args, old_commit)  # after every run: a long one may not finish
    return 0


def write_table(path: Path, rows: list[dict], rates, args, old_commit: str) -> None:
    new_commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    lines = [f"`python benchmarks/conversion_speed.py --model {Path(args.model).name} --old {args.old} --threads "
             f"{args.threads} --runs {' '.join(args.runs)}`: old = commit {old_commit}, new = the working tree on "
             f"commit {new_commit} (+ its uncommitted changes when run), each process {args.threads} thread(s), "
             f"both at once. {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"CPU capability {torch.backends.cpu.get_cpu_capability()}.", "",
             "Matmul rates measured in this run (GFLOPS):", "", "| shape (m x k x n) | fp32 | bf16 |", "|---|---|---|"]
    lines += [f"| {s} | {a:.1f} | {b:.1f} |" for s, a, b in rates]
    lines += ["", "| run | code | wall s | speed-up | train tokens/s | bound tokens/s (fp32) | compute bound s (fp32) "
              "| val PPL (ratio) | peak RSS MB | stages (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
    by_run: dict[str, dict] = {}
    for r in rows:
        by_run.setdefault(r["run"], {})[r["version"]] = r
    for run, pair in by_run.items():
        for version in ("old", "new"):
            r = pair[version]
            speed = f"{pair['old']['wall'] / r['wall']:.2f}x" if version == "new" else "1"
            if r["tok_s"] and version == "new" and pair["old"]["tok_s"]:
                speed += f" (tokens/s {r['tok_s'] / pair['old']['tok_s']:.2f}x)"
            stages = ", ".join(f"{k} {v:.0f}" for k, v in (r["stages"] or {}).items()) or "-"
            bound = f"{r['bound']:.0f}" if r["bound"] else "-"
            tbound = f"{r['train_bound']:.0f}" if r["train_bound"] else "-"
            lines.append(f"| {run} | {version} | {r['wall']:.0f} | {speed} | {r['tok_s'] or '-'} | {tbound} | {bound} "
                         f"| {r['val_ppl']:.3f} ({r['ratio']:.3f}) | {r['rss_mb']:.0f} | {stages} |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
