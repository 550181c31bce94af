"""What limits a training-free MoE on a real LLM: router softness, an oracle router, and the down-projection refit.

    python benchmarks/refit_ablation.py --model smollm2-135m-instruct --topk 2 [--calib-tokens 16384]

One partition (the default co-activation experts + shared + dropped columns) and its lstsq routers, then, on the
first `--eval-tokens` of the Wikipedia test split (perplexity ratio to the dense model):
- no refit, the router logits scaled by 1/0.3 (the unscaled least-squares fit), 1 (default), 1/3, 1/30;
- no refit, an oracle router (each token's top-k experts by their true output contribution, gates exactly 1);
- refit of every layer on the dense model's inputs (not sequential), ridge 1e-4 and 1e-2;
- sequential refit (the default, `dotmoe.refit`), ridges 1e-4, 1e-2, 1e-1 and chosen per layer.
Prints a table and writes it to benchmarks/results/refit_ablation_<model>_k<K>_c<calib>.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dotmoe.config import ConvertConfig
from dotmoe.data import load_texts, tokenize_stream
from dotmoe.layer_runner import map_layer_inputs
from dotmoe.layer_setup import LSTSQ_ROUTER_SCALE, initial_partitions
from dotmoe.moe_mlp import install_moe
from dotmoe.paths import default_data_file
from dotmoe.perplexity import perplexity
from dotmoe.prepare import calibration_sequences, prepare
from dotmoe.refit import fit_layer, moe_problem, refit_sequentially
from dotmoe.rounding import one_hot_assignment
from dotmoe_dev.bench import OracleRouter
from dotmoe_dev.real_models import real_model_dir

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    args = parser.parse_args()
    cfg = ConvertConfig(model=str(real_model_dir(args.model)), experts=args.experts, top_k=args.topk, tokens=0,
                        calib_tokens=args.calib_tokens, out="unused")
    prep = prepare(cfg)
    model, mlps = prep.model, prep.mlps
    test = tokenize_stream(prep.tokenizer, load_texts([str(default_data_file("test", cfg.model))]))
    test = test[: args.eval_tokens]
    dense = perplexity(model, test)
    caps = torch.tensor(cfg.column_capacities(prep.num_neurons))
    calib = calibration_sequences(prep.seqs, cfg)
    parts, routers = initial_partitions(cfg, model, mlps, caps, calib)
    dense_inputs = map_layer_inputs(model, mlps, calib, lambda i, x: x)
    original = [m.down_proj.weight.detach().clone() for m in mlps]
    moes = install_moe(model, args.experts, args.topk, cfg.gating, shared=cfg.shared > 0, dropped=cfg.drop > 0)
    for layer, moe in enumerate(moes):
        moe.assignment = one_hot_assignment(parts[layer], len(caps))
    rows = []

    def record(name: str) -> None:
        ppl = perplexity(model, test)
        rows.append((name, ppl, ppl / dense))
        print(f"| {name} | {ppl:.2f} | {ppl / dense:.2f} |", flush=True)

    def reset(router_scale: float = 1.0) -> None:
        for layer, moe in enumerate(moes):
            moe.dense.down_proj.weight.data.copy_(original[layer])
            moe.router.weight.data.copy_(routers[layer] * router_scale)

    for scale in (1 / LSTSQ_ROUTER_SCALE, 1.0, 1 / 3, 1 / 30):
        reset(scale)
        record(f"no refit, router logits x{scale * LSTSQ_ROUTER_SCALE:g} of the least-squares fit")
    reset()
    saved = [m.router for m in moes]
    for layer, moe in enumerate(moes):
        moe.router = OracleRouter(moe.dense, parts[layer], args.topk, args.experts)
    record("no refit, oracle router")
    for layer, moe in enumerate(moes):
        moe.router = saved[layer]
    for ridge in (1e-4, 1e-2):
        reset()
        with torch.no_grad():
            for layer, moe in enumerate(moes):
                problem = moe_problem(moe)
                problem.apply(fit_layer(*problem.build(dense_inputs[layer]), ridge)[0])
        record(f"refit on dense inputs, ridge {ridge:g}")
    for ridge in (1e-4, 1e-2, 1e-1, None):
        reset()
        refit_sequentially(model.get_decoder(), moes, [moe_problem(m) for m in moes], calib, ridge=ridge)
        record(f"sequential refit, ridge {'chosen per layer' if ridge is None else f'{ridge:g}'}")
    out = RESULTS / f"refit_ablation_{args.model}_k{args.topk}_c{args.calib_tokens}.md"
    out.write_text(
        f"`python benchmarks/refit_ablation.py --model {args.model} --topk {args.topk} --experts {args.experts} "
        f"--calib-tokens {args.calib_tokens} --eval-tokens {args.eval_tokens}`; shared {cfg.shared}, dropped "
        f"{cfg.drop}; dense PPL {dense:.3f} on the first {len(test)} Wikipedia test tokens. 2 CPU cores.\n\n"
        "| variant | PPL | ratio |\n|---|---|---|\n" + "".join(f"| {n} | {p:.2f} | {r:.2f} |\n" for n, p, r in rows))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
