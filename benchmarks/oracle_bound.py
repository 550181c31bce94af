"""How much quality an active FFN budget can keep at all: per-token oracles on a real model.

Neurons: each token keeps its own top-n FFN neurons by contribution |h_i| * ||W_down[:, i]|| (n = active fraction
x N). This is finer than any MoE (neurons, not experts of a fixed partition, and no shared expert) and its "router"
sees h itself, so no router of a converted MoE can choose better by this criterion. Measured without and with the
same sequential least-squares refit of W_down that `dotmoe convert` uses (`dotmoe.refit`).

Experts (`--experts E ...`): the partition `dotmoe convert` chooses (its defaults at E experts, k = active x E,
shared + dropped columns), routed by an oracle (each token's top-k experts by the norm of their true contribution,
gates 1) and by the converter's own least-squares router, each followed by the sequential refit. The oracle row
bounds what any router can reach with that partition; the other row is what `dotmoe convert` gives.

Scored like `benchmarks/real_models.py` (first `--eval-tokens` of the bundled Wikipedia test split).

    python benchmarks/oracle_bound.py --model smollm2-135m-instruct --active 0.25 0.5
    python benchmarks/oracle_bound.py --model smollm2-135m-instruct --active 0.25 --experts 8 32 \
        --calib-tokens 16384 --no-neurons --out benchmarks/results/oracle_bound_experts_smollm2-135m-instruct.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from dotmoe_dev.bench import OracleMLP, OracleRouter, model_dir, test_scores

ROOT = Path(__file__).resolve().parents[1]


def oracle_problem(oracle: OracleMLP):
    from dotmoe.refit import LayerProblem

    def build(x):
        z, h = oracle.features(x)
        return z, nn.functional.linear(h, oracle.dense_down)
    return LayerProblem(build, lambda weight: oracle.mlp.down_proj.weight.copy_(weight.float()))


@torch.no_grad()
def expert_rows(args, active: float, experts: int) -> list[tuple[str, str, dict]]:
    """(router, scores) of the default partition at `experts` experts, k = active x experts: oracle and lstsq
    routers, each with the sequential refit."""
    from dotmoe.config import ConvertConfig
    from dotmoe.layer_setup import initial_partitions
    from dotmoe.moe_mlp import install_moe
    from dotmoe.prepare import calibration_sequences, prepare
    from dotmoe.refit import moe_problem, refit_sequentially
    from dotmoe.rounding import one_hot_assignment

    top_k = round(active * experts)
    cfg = ConvertConfig(model=str(model_dir(args.model)), experts=experts, top_k=top_k, tokens=0,
                        export_format="none", calib_tokens=args.calib_tokens)
    prep = prepare(cfg)
    model = prep.model.eval()
    caps = torch.tensor(cfg.column_capacities(prep.num_neurons))
    calib = calibration_sequences(prep.seqs, cfg)
    parts, routers = initial_partitions(cfg, model, prep.mlps, caps, calib)
    moes = install_moe(model, experts, top_k, cfg.gating, shared=cfg.shared > 0, dropped=cfg.drop > 0)
    oracles = [OracleRouter(m.dense, parts[i], top_k, experts) for i, m in enumerate(moes)]
    structure = f"E={experts}/k={top_k}, shared {cfg.shared}, dropped {cfg.drop}"
    rows = []
    lstsq = [m.router for m in moes]
    for i, moe in enumerate(moes):
        moe.router.weight.copy_(routers[i])
        moe.keep_teacher_down()  # the refit's target stays the dense FFN, whatever the previous pass refitted
    for name, chosen in (("oracle", oracles), ("lstsq (dotmoe convert)", lstsq)):
        for i, moe in enumerate(moes):
            moe.assignment = one_hot_assignment(parts[i], len(caps))
            moe.router = chosen[i]
        refit_sequentially(model.get_decoder(), moes, [moe_problem(m) for m in moes], calib, progress=True)
        scores = test_scores(model, prep.tokenizer, args.eval_tokens, cloze=False)
        print(structure, name, scores, flush=True)
        rows.append((structure, name, scores))
    return rows


@torch.no_grad()
def main() -> None:
    from dotmoe.architecture import find_gated_mlps
    from dotmoe.config import ConvertConfig
    from dotmoe.prepare import calibration_sequences, prepare
    from dotmoe.refit import refit_sequentially

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--active", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--experts", type=int, nargs="*", default=[], help="expert-level oracle at these E")
    parser.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens (default: convert's)")
    parser.add_argument("--no-neurons", action="store_true", help="skip the neuron-level oracle rows")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "oracle_bound.md"))
    args = parser.parse_args()

    rows = []  # (active, structure, router, refit, scores)
    for active in args.active:
        for experts in args.experts:
            rows += [(active, structure, router, True, scores) for structure, router, scores in
                     expert_rows(args, active, experts)]
        for refit in () if args.no_neurons else (False, True):
            cfg = ConvertConfig(model=str(model_dir(args.model)), tokens=0, export_format="none",
                                calib_tokens=args.calib_tokens)
            prep = prepare(cfg)
            model = prep.model.eval()
            oracles = []
            for name, mlp in find_gated_mlps(model):
                parent, _, child = name.rpartition(".")
                oracle = OracleMLP(mlp, round(active * mlp.gate_proj.out_features))
                setattr(model.get_submodule(parent), child, oracle)
                oracles.append(oracle)
            if refit:
                refit_sequentially(model.get_decoder(), oracles, [oracle_problem(o) for o in oracles],
                                   calibration_sequences(prep.seqs, cfg), progress=True)
            scores = test_scores(model, prep.tokenizer, args.eval_tokens, cloze=False)
            rows.append((active, "neurons (no experts, no shared)", "oracle", refit, scores))
            print(active, refit, scores, flush=True)

    dense_prep = prepare(ConvertConfig(model=str(model_dir(args.model)), tokens=0))
    dense = test_scores(dense_prep.model.eval(), dense_prep.tokenizer, args.eval_tokens, cloze=False)
    command = " ".join(["python benchmarks/oracle_bound.py", *sys.argv[1:]])
    lines = [f"# Per-token oracle bounds: {args.model}", "",
             f"`{command}` (2 CPU cores, torch 2.13.0+cpu; calibration tokens: "
             f"{args.calib_tokens or 'the convert default'}). Neurons: each token keeps its own top active x N FFN "
             f"neurons by |h_i| * ||W_down[:, i]||. Experts: the default partition, routed by an oracle (top-k experts "
             f"by true contribution) or by the converter's least-squares router. wiki = first {args.eval_tokens} tokens "
             f"of the bundled Wikipedia test split (dense {dense['wiki_test_ppl']}), pydocs dense "
             f"{dense['pydocs_test_ppl']}.", "",
             "| active FFN | structure | router | refit | wiki PPL | ratio | pydocs PPL |", "|---|---|---|---|---|---|---|"]
    for active, structure, router, refit, s in rows:
        lines.append(f"| {active:.0%} | {structure} | {router} | {'yes' if refit else 'no'} | {s['wiki_test_ppl']:.2f} "
                     f"| {s['wiki_test_ppl'] / dense['wiki_test_ppl']:.2f} | {s['pydocs_test_ppl']:.2f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
