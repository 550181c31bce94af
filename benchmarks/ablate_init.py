"""Ablation of DOT-MoE initialisation on the bundled reference model (E=8, k=2, same tokens each).

    python benchmarks/ablate_init.py [--tokens 200000] [--out benchmarks/results/ablate_init.md]

Rows: affinity init (weight-kmeans | random) x router init (lstsq | random), plus the random-split
baseline with the same router recipe. Prints a markdown table of validation PPL and final KL.
"""

import argparse
import platform
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from dotmoe.config import ConvertConfig
from dotmoe.train import convert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--out", default="benchmarks/results/ablate_init.md")
    args = parser.parse_args()
    base = ConvertConfig(tokens=args.tokens)
    runs = [("dotmoe", a, r) for a in ("weight-kmeans", "random") for r in ("lstsq", "random")]
    runs += [("random", "weight-kmeans", "lstsq"), ("random", "weight-kmeans", "random")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (method, aff, router) in enumerate(runs):
            cfg = replace(base, method=method, init_affinity=aff, init_router=router, out=str(Path(tmp) / str(i)))
            s = convert(cfg).summary
            rows.append(f"| {method} | {aff if method == 'dotmoe' else '-'} | {router} | {s['train_tokens']} | "
                        f"{s['val_ppl']:.3f} | {s['ppl_ratio']:.3f} | {s['final_terms']['kl']:.4f} | "
                        f"{s['wall_seconds']} |")
    table = "\n".join([
        f"Reference model, E=8, k=2, softmax gating; `python benchmarks/ablate_init.py --tokens {args.tokens}`",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"Dense val PPL {s['dense_val_ppl']:.3f} (first {base.eval_tokens} validation tokens).", "",
        "| method | affinity init | router init | tokens | val PPL | PPL ratio | final KL | wall s |",
        "|---|---|---|---|---|---|---|---|", *rows])
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
