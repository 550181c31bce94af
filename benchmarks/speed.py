"""Inference speed of dense vs exported MoE on real exports, the reference model and synthetic FFN-dominant shapes.

    python benchmarks/speed.py [--real smollm2-k2=DIR ...] [--sizes ref 100m 0.5b 1.5b] [--batches 1 8] [--prompt 128] [--new-tokens 32]
                               [--runs 5] [--dtype bfloat16] [--device cpu] [--onednn on|off]
                               [--out benchmarks/results/speed.md]

Synthetic shapes are random-weight Llama models (Llama-2-like MHA, intermediate = 4 x hidden, so the FFN is
~2/3 of the weights, as in real LLMs) converted with a random balanced partition and random router: speed does
not depend on what the experts learned. `ref` is the bundled reference model with its DOT-MoE export (out/demo).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
from pathlib import Path

import torch

from dotmoe.speed import EXPERT_IMPLEMENTATIONS, bench_pair, format_rows
from dotmoe_dev.bench import synthetic_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="*", default=["ref", "100m", "0.5b", "1.5b"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ref-moe", default="out/demo/dotmoe/model", help="exported MoE of the reference model")
    parser.add_argument("--impls", nargs="+", default=list(EXPERT_IMPLEMENTATIONS),
                        help="transformers experts implementations to try for the MoE")
    parser.add_argument("--real", nargs="+", default=[], metavar="LABEL=MOE_DIR",
                        help="real exports to time against the dense model each was converted from (its record's "
                        "base_model), e.g. smollm2-k2=out/smollm2/model; rows are labelled LABEL")
    parser.add_argument("--onednn", default="on", choices=["on", "off"], help="PyTorch's oneDNN matmuls for both "
                        "models (off: PyTorch's native CPU kernels)")
    parser.add_argument("--keep", help="keep the synthetic dense/MoE checkpoints in this directory (for llama.cpp)")
    parser.add_argument("--out", default="benchmarks/results/speed.md")
    args = parser.parse_args()
    import transformers

    from dotmoe.paths import reference_model_dir

    dtype = getattr(torch, args.dtype)
    sections, all_rows = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        reals = dict(item.split("=", 1) for item in args.real)
        for size in [*reals, *args.sizes]:
            if size in reals:
                moe_dir = Path(reals[size])
                dense_dir = Path(json.loads((moe_dir / "config.json").read_text())["dotmoe"]["base_model"])
            elif size == "ref":
                if not Path(args.ref_moe, "config.json").is_file():
                    print(f"skipping ref: no export at {args.ref_moe} (run `dotmoe demo` first)")
                    continue
                dense_dir, moe_dir = reference_model_dir(), Path(args.ref_moe)
            else:
                dense_dir, moe_dir = Path(root, f"dense-{size}"), Path(root, f"moe-{size}")
                if not (moe_dir / "config.json").is_file():
                    shutil.rmtree(dense_dir, ignore_errors=True)
                    shutil.rmtree(Path(root, f"conv-{size}"), ignore_errors=True)
                    dense_dir, moe_dir = synthetic_pair(size, root, 8, 2)
            rows = bench_pair(str(dense_dir), str(moe_dir), args.batches, args.prompt, args.new_tokens, args.runs,
                              dtype, args.device, tuple(args.impls), onednn=args.onednn == "on")
            all_rows[size] = rows
            sections.append(format_rows(rows, size))
            print(sections[-1], flush=True)
            if size not in reals and size != "ref" and not args.keep:
                shutil.rmtree(dense_dir)
                shutil.rmtree(moe_dir)
    impls = "\n".join(
        f"- {size} batch {r['batch']}: " + ", ".join(f"{i} {v['decode']:.1f} decode / {v['prefill']:.0f} prefill tok/s"
                                                  for i, v in r["all_impls"].items())
        for size, rows in all_rows.items() for r in rows)
    real = f" --real {' '.join(args.real)}" if args.real else ""
    header = [f"`python benchmarks/speed.py{real} --sizes {' '.join(args.sizes)} --batches "
              f"{' '.join(map(str, args.batches))} --prompt {args.prompt} --new-tokens {args.new_tokens} --runs "
              f"{args.runs} --dtype {args.dtype} --device {args.device} --impls {' '.join(args.impls)} --onednn "
              f"{args.onednn}`",
              f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
              f"{torch.__version__}, transformers {transformers.__version__}. Synthetic and ref rows: E=8, k=2 (25% of FFN "
              "neurons active); real rows: as their label says. "
              "Dense and MoE stay loaded and are timed alternately (one warm-up round, then the median of the timed rounds); "
              "MoE = the fastest transformers experts implementation.", ""]
    text = "\n".join(header + ["\n\n".join(sections), "", "All MoE experts implementations:", impls])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    Path(args.out).with_suffix(".json").write_text(json.dumps(all_rows, indent=2))
    print(text)


if __name__ == "__main__":
    main()
