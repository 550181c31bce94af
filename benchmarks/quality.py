"""The quality benchmark: every method at the same active budget, same data, same router recipe.

    python benchmarks/quality.py [--tokens 200000] [--budgets 8:2 8:4] [--seeds 0] [--out benchmarks/results]

On the bundled reference model, for each budget E:k and each partition method, runs `convert` twice: trained
(router, and for dotmoe the assignment, on --tokens tokens) and training-free (--tokens 0, the method's own
router init), plus `prune` at the same active FFN width. Each result is exported and evaluated with `dotmoe eval`
on the held-out *test* split: perplexity, retention, per-layer FFN reconstruction error, expert-load CV.
Writes quality.md, quality.json and PNG plots to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from dotmoe.config import ConvertConfig
from dotmoe.evaluate import EvalConfig, evaluate
from dotmoe.paths import reference_model_dir
from dotmoe.plots import load_heatmap, ppl_vs_active, recon_per_layer
from dotmoe.convert import convert

METHODS = ["dotmoe", "random", "sequential", "weight-kmeans", "activation", "hidden-kmeans-router"]


def run_one(base: ConvertConfig, eval_tokens: int, tmp: Path, dense_ppl: float, **kw) -> dict:
    cfg = replace(base, out=str(tmp / f"{kw['method']}-{kw['experts']}-{kw['top_k']}-{kw['tokens']}-{kw['seed']}"), **kw)
    t0 = time.time()
    summary = convert(cfg, progress=False).summary
    wall = time.time() - t0
    report = evaluate(EvalConfig(model=summary["export"]["dir"], dense=str(reference_model_dir()),
                                 tokens=eval_tokens, recon_tokens=4096, dense_ppl=dense_ppl), progress=False)
    row = {"method": kw["method"], "trained": kw["tokens"] > 0, "experts": kw["experts"], "top_k": kw["top_k"],
           "seed": kw["seed"], "active_params": summary["export"]["active_params"],
           "total_params": summary["export"]["total_params"], "ppl": report["ppl"], "dense_ppl": report["dense_ppl"],
           "retention": report["retention"], "ppl_ratio": report["ppl_ratio"],
           "recon_error": report["recon_error"], "mean_recon_error": report["mean_recon_error"],
           "load_cv": report.get("router", {}).get("mean_load_cv"),
           "load": report.get("router", {}).get("load"), "val_ppl": summary["val_ppl"],
           "convert_wall_s": round(wall, 1)}
    print(f"{row['method']:22s} E{row['experts']} k{row['top_k']} {'trained' if row['trained'] else 'free':7s} "
          f"seed {row['seed']}: test PPL {row['ppl']:.3f} (ratio {row['ppl_ratio']:.3f}), recon "
          f"{row['mean_recon_error']:.4f}, {wall:.0f}s", flush=True)
    return row


def table(rows: list[dict]) -> list[str]:
    """Markdown rows, mean over seeds of each (method, budget, trained) group."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["experts"], r["top_k"], r["trained"], r["method"]), []).append(r)
    out = ["| E | k | mode | method | active params | test PPL | PPL ratio | retention | FFN recon error | load CV "
           "| convert s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (e, k, trained, method), rs in sorted(groups.items(), key=lambda g: (g[0][0], g[0][1], not g[0][2],
                                                                              sum(r["ppl"] for r in g[1]))):
        mean = lambda key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
        ppl = f"{mean('ppl'):.3f}" + (f" ± {torch.tensor([r['ppl'] for r in rs]).std().item():.3f}" if len(rs) > 1 else "")
        cv = "-" if rs[0]["load_cv"] is None else f"{mean('load_cv'):.3f}"
        out.append(f"| {e} | {k} | {'trained' if trained else 'training-free'} | {method} | {rs[0]['active_params']:,} | "
                   f"{ppl} | {mean('ppl_ratio'):.3f} | {mean('retention'):.3f} | {mean('mean_recon_error'):.4f} | "
                   f"{cv} | {mean('convert_wall_s'):.0f} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--budgets", nargs="+", default=["8:2", "8:4"])
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--eval-tokens", type=int, default=32_768)
    parser.add_argument("--no-free", action="store_true", help="skip the training-free variants")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    out = Path(args.out)
    base = ConvertConfig(eval_tokens=8192)  # conversion's own validation PPL is informational here
    dense_ppl = evaluate(EvalConfig(model=str(reference_model_dir()), tokens=args.eval_tokens), progress=False)["ppl"]
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for budget in args.budgets:
            e, k = map(int, budget.split(":"))
            for seed in args.seeds:
                for method in args.methods:
                    for tokens in ([args.tokens] if args.no_free else [args.tokens, 0]):
                        rows.append(run_one(base, args.eval_tokens, Path(tmp), dense_ppl, method=method, experts=e, top_k=k,
                                            tokens=tokens, seed=seed))
                rows.append(run_one(base, args.eval_tokens, Path(tmp), dense_ppl, method="prune", experts=e, top_k=k, tokens=0,
                                    seed=seed))
    (out / "quality.json").write_text(json.dumps(rows, indent=2))
    points: dict[str, list] = {}
    for r in rows:
        if r["trained"] or r["method"] == "prune":
            points.setdefault(r["method"], []).append((r["top_k"] / r["experts"], r["ppl"]))
    ppl_vs_active(points, dense_ppl, out / "quality_ppl_vs_active.png")
    first = args.budgets[0]
    e, k = map(int, first.split(":"))
    recon_per_layer({r["method"]: r["recon_error"] for r in rows
                     if (r["experts"], r["top_k"]) == (e, k) and (r["trained"] or r["method"] == "prune")
                     and r["seed"] == args.seeds[0]},
                    out / "quality_recon_per_layer.png", f"FFN reconstruction error, E={e} k={k} (trained)")
    dot = next(r for r in rows if r["method"] == "dotmoe" and r["trained"] and (r["experts"], r["top_k"]) == (e, k))
    load_heatmap(dot["load"], out / "quality_dotmoe_load.png", f"DOT-MoE expert load, E={e} k={k}")
    cmd = (f"python benchmarks/quality.py --tokens {args.tokens} --budgets {' '.join(args.budgets)} --seeds "
           f"{' '.join(map(str, args.seeds))} --eval-tokens {args.eval_tokens}" + (" --no-free" if args.no_free else ""))
    lines = [f"Reference model (dense test PPL {dense_ppl:.3f} on the first "
             f"{args.eval_tokens} test-split tokens). `{cmd}`",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; total "
             f"{(time.time() - t0) / 60:.0f} min. Trained = {args.tokens} tokens of router (+ assignment for dotmoe) "
             "training with the same recipe; training-free = the method's partition and its own/lstsq router init.",
             "Active params: HF convention (all non-expert params incl. embeddings + k/E of expert params).", "",
             *table(rows), "", "Plots: quality_ppl_vs_active.png, quality_recon_per_layer.png, quality_dotmoe_load.png"]
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
