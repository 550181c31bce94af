"""Ablation of DOT-MoE initialisation on the bundled reference model (E=8, k=2, same tokens each).

    python benchmarks/ablate_init.py [--tokens 200000] [--seeds 0 1 2] [--runs all|affinity]
                                     [--out benchmarks/results/ablate_init.md]

Rows (`--runs all`): affinity init (weight-kmeans | random) x router init (lstsq | random), plus the
random-split baseline with the same router recipe; `--runs affinity` compares only the two affinity inits
with the lstsq router. Each row is repeated per seed (seed changes initial partition, router init and
data order); prints a markdown table of validation PPL (mean ± std over seeds) and final KL.
"""

import argparse
import platform
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from dotmoe.config import ConvertConfig
from dotmoe.convert import convert


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--runs", choices=("all", "affinity"), default="all")
    parser.add_argument("--out", default="benchmarks/results/ablate_init.md")
    args = parser.parse_args()
    base = ConvertConfig(tokens=args.tokens)
    if args.runs == "affinity":
        runs = [("dotmoe", a, "lstsq") for a in ("weight-kmeans", "random")]
    else:
        runs = [("dotmoe", a, r) for a in ("weight-kmeans", "random") for r in ("lstsq", "random")]
        runs += [("random", "weight-kmeans", "lstsq"), ("random", "weight-kmeans", "random")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (method, aff, router) in enumerate(runs):
            results = []
            for seed in args.seeds:
                cfg = replace(base, method=method, init_affinity=aff, init_router=router, seed=seed,
                              out=str(Path(tmp) / f"{i}-{seed}"))
                results.append(convert(cfg).summary)
                print(f"{method} {aff} {router} seed {seed}: val PPL {results[-1]['val_ppl']:.3f}", flush=True)
            s = results[-1]
            ppl = torch.tensor([r["val_ppl"] for r in results], dtype=torch.float64)
            spread = f" ± {ppl.std().item():.3f}" if len(results) > 1 else ""
            rows.append(f"| {method} | {aff if method == 'dotmoe' else '-'} | {router} | {s['train_tokens']} | "
                        f"{' / '.join(f'{p:.3f}' for p in ppl.tolist())} | {ppl.mean().item():.3f}{spread} | "
                        f"{ppl.mean().item() / s['dense_val_ppl']:.3f} | "
                        f"{sum(r['final_terms']['kl'] for r in results) / len(results):.4f} | "
                        f"{sum(r['wall_seconds'] for r in results) / len(results):.1f} |")
    seeds = " ".join(map(str, args.seeds))
    table = "\n".join([
        f"Reference model, E=8, k=2, softmax gating; `python benchmarks/ablate_init.py --tokens {args.tokens} "
        f"--seeds {seeds} --runs {args.runs}`",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}. "
        f"Dense val PPL {s['dense_val_ppl']:.3f} (first {base.eval_tokens} validation tokens).", "",
        "| method | affinity init | router init | tokens | val PPL per seed | mean ± std | PPL ratio | final KL "
        "(mean) | wall s (mean) |",
        "|---|---|---|---|---|---|---|---|---|", *rows])
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
