"""Layer-wise conversion with and without the global KL phase, against the joint conversion, over seeds.

    python benchmarks/layerwise_global.py [--tokens 200000] [--seeds 0 1 2] [--out benchmarks/results]

On the bundled reference model at E=8, k=2, per seed: the joint conversion from scratch on --tokens tokens; the
layer-wise pass alone (30 steps per layer, 4,096 calibration tokens); and the layer-wise pass followed by the
global KL phase on the same --tokens tokens (`--global-tokens`). Each result is exported and evaluated with
`dotmoe eval` on the held-out test split (32,768 tokens). Writes layerwise_global.md and .json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dotmoe.config import ConvertConfig
from dotmoe.evaluate import EvalConfig, evaluate
from dotmoe.paths import reference_model_dir
from dotmoe.convert import convert

EVAL_TOKENS = 32_768


def settings(tokens: int) -> dict[str, dict]:
    layerwise = dict(mode="layerwise", layer_steps=30, calib_tokens=4096)
    return {"joint": dict(tokens=tokens), "layer-wise only": layerwise,
            "layer-wise + global KL": dict(layerwise, global_tokens=tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    dense = str(reference_model_dir())
    dense_ppl = evaluate(EvalConfig(model=dense, tokens=EVAL_TOKENS), progress=False)["ppl"]
    rows, t0 = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for name, kw in settings(args.tokens).items():
                out = Path(tmp) / f"{name.replace(' ', '_')}-{seed}"
                start = time.time()
                summary = convert(ConvertConfig(out=str(out), seed=seed, eval_tokens=8192, **kw), progress=False).summary
                wall = time.time() - start
                report = evaluate(EvalConfig(model=str(out / "model"), dense=dense, tokens=EVAL_TOKENS,
                                             recon_tokens=4096, dense_ppl=dense_ppl), progress=False)
                rows.append({"setting": name, "seed": seed, "ppl": report["ppl"], "ppl_ratio": report["ppl_ratio"],
                             "mean_recon_error": report["mean_recon_error"], "convert_wall_s": round(wall, 1),
                             "train_tokens": summary["train_tokens"]})
                print(f"{name:24s} seed {seed}: test PPL {report['ppl']:.3f}, recon {report['mean_recon_error']:.3f}, "
                      f"{wall:.0f}s", flush=True)
    lines = [f"`python benchmarks/layerwise_global.py --tokens {args.tokens} --seeds {' '.join(map(str, args.seeds))}` "
             f"on {platform.machine()}, torch {torch.__version__}, {(time.time() - t0) / 60:.0f} min. Reference model, "
             f"E=8, k=2; test-split PPL on {EVAL_TOKENS:,} tokens (dense {dense_ppl:.2f}); mean ± sample std over "
             "seeds.", "", "| setting | test PPL | per seed | FFN recon error | convert s |", "|---|---|---|---|---|"]
    for name in settings(args.tokens):
        group = [r for r in rows if r["setting"] == name]
        ppl = [r["ppl"] for r in group]
        spread = f" ± {statistics.stdev(ppl):.2f}" if len(ppl) > 1 else ""
        lines.append(f"| {name} | {statistics.mean(ppl):.2f}{spread} | {', '.join(f'{p:.2f}' for p in ppl)} | "
                     f"{statistics.mean(r['mean_recon_error'] for r in group):.3f} | "
                     f"{statistics.mean(r['convert_wall_s'] for r in group):.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "layerwise_global.md").write_text(text)
    (Path(args.out) / "layerwise_global.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
