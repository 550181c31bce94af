"""How much quality an active FFN budget can keep at all: a per-token oracle on a real model.

Each token keeps its own top-n FFN neurons by contribution |h_i| * ||W_down[:, i]|| (n = active fraction x N). This
is finer than any MoE (neurons, not experts of a fixed partition, and no shared expert) and its "router" sees h
itself, so no router of a converted MoE can choose better by this criterion. Measured without and with the same
sequential least-squares refit of W_down that `dotmoe convert` uses (`dotmoe.refit`), on the same calibration
tokens, and scored like `benchmarks/real_models.py` (first `--eval-tokens` of the bundled Wikipedia test split).

    python benchmarks/oracle_bound.py --model smollm2-135m-instruct --active 0.25 0.5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


class OracleMLP(nn.Module):
    """A gated MLP that keeps, per token, only its `keep` neurons of largest contribution."""

    def __init__(self, mlp: nn.Module, keep: int):
        super().__init__()
        self.mlp, self.keep = mlp, keep
        self.register_buffer("dense_down", mlp.down_proj.weight.detach().clone(), persistent=False)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h * mask, h): the kept activations and all of them."""
        h = self.mlp.act_fn(self.mlp.gate_proj(x)) * self.mlp.up_proj(x)
        score = h.abs() * self.dense_down.norm(dim=0)
        mask = torch.zeros_like(h).scatter_(-1, score.topk(self.keep, dim=-1).indices, 1.0)
        return h * mask, h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.down_proj(self.features(x)[0])


def oracle_problem(oracle: OracleMLP):
    from dotmoe.refit import LayerProblem

    def build(x):
        z, h = oracle.features(x)
        return z, nn.functional.linear(h, oracle.dense_down)
    return LayerProblem(build, lambda weight: oracle.mlp.down_proj.weight.copy_(weight.float()))


@torch.no_grad()
def main() -> None:
    from real_models import _scores, model_dir

    from dotmoe.architecture import find_gated_mlps
    from dotmoe.config import ConvertConfig
    from dotmoe.refit import refit_sequentially
    from dotmoe.train import calibration_sequences, prepare

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--active", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "oracle_bound.md"))
    args = parser.parse_args()

    rows = []
    for active in args.active:
        for refit in (False, True):
            cfg = ConvertConfig(model=str(model_dir(args.model)), tokens=0, export_format="none")
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
            scores = _scores(model, prep.tokenizer, args.eval_tokens, cloze=False)
            rows.append((active, refit, scores))
            print(active, refit, scores, flush=True)

    dense = _scores(prepare(ConvertConfig(model=str(model_dir(args.model)), tokens=0)).model.eval(),
                    prep.tokenizer, args.eval_tokens, cloze=False)
    lines = [f"# Per-token oracle bound: {args.model}", "",
             f"`python benchmarks/oracle_bound.py --model {args.model} --active {' '.join(map(str, args.active))}` "
             f"(2 CPU cores, torch 2.13.0+cpu). Each token keeps its own top active x N FFN neurons by "
             f"|h_i| * ||W_down[:, i]||; wiki = first {args.eval_tokens} tokens of the bundled Wikipedia test split "
             f"(dense {dense['wiki_test_ppl']}), pydocs dense {dense['pydocs_test_ppl']}.", "",
             "| active FFN | refit | wiki PPL | ratio | pydocs PPL |", "|---|---|---|---|---|"]
    for active, refit, s in rows:
        lines.append(f"| {active:.0%} | {'yes' if refit else 'no'} | {s['wiki_test_ppl']:.2f} "
                     f"| {s['wiki_test_ppl'] / dense['wiki_test_ppl']:.2f} | {s['pydocs_test_ppl']:.2f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
