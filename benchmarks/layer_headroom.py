"""Where a training-free MoE loses, one FFN at a time: how much better a router, a partition or trained expert
weights could make a layer, against pruning and the per-token neuron oracle.

For each `--layers` FFN of a real model, on its dense inputs (`--calib-tokens` calibration tokens, the last
`--holdout` held out), the relative error ||y - y_hat|| / ||y|| of the FFN output on the held-out tokens after the
least-squares refit of W_down (`dotmoe.refit.fit_layer`, fitted on the other tokens), for:

- `prune`: the active-width static subset by output-aware importance (what `--method prune` keeps);
- `moe`: the default partition (co-activation + shared + dropped) and least-squares router (`dotmoe convert`);
- `moe, oracle router`: the same partition, each token's top-k experts by their true output contribution;
- `moe, classifier router`: the same partition, a softmax classifier (LBFGS) fitted to the oracle's top-k;
- `moe, refined partition`: `--refine` rounds of: routed neurons reassigned (balanced OT) to the experts whose
  routed tokens they contribute most output energy to, then the router refitted;
- `moe, trained experts` (`--train-steps` > 0): gate/up/down of the experts trained by Adam on the layer's own
  reconstruction error under the fixed routing, from the refitted start;
- `neuron oracle`: each token keeps its own top active x N neurons (no experts, no shared/dropped columns).

    python benchmarks/layer_headroom.py --model smollm2-135m-instruct --layers 2 11 20 28 --experts 8 --topk 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

from dotmoe_dev.bench import OracleMLP, OracleRouter, model_dir

ROOT = Path(__file__).resolve().parents[1]


def relative_error(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    return float((y - y_hat).norm() / y.norm())


class Layer:
    """One FFN's held-out refit error for any per-neuron gate pattern."""

    def __init__(self, mlp: nn.Module, x: torch.Tensor, holdout: int):
        self.mlp, self.x, self.cut = mlp, x, len(x) - holdout
        self.h = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).float()
        self.y = mlp.down_proj(self.h).float()
        self.contrib = self.h.abs() * mlp.down_proj.weight.float().norm(dim=0)  # for prune's importance

    def refit_error(self, z: torch.Tensor) -> float:
        """Held-out error of features z [T, n] after the least-squares refit of W_down on the fitting tokens."""
        from dotmoe.refit import fit_layer

        weight, _ = fit_layer(z[: self.cut], self.y[: self.cut])
        return relative_error(self.y[self.cut:], z[self.cut:] @ weight.float().t())


class Moe:
    """The converted layer's structure: partition [N] over E routed columns (+ shared, + dropped) and gating."""

    def __init__(self, layer: Layer, caps: torch.Tensor, experts: int, top_k: int, gating: str, shared: bool,
                 dropped: bool):
        self.layer, self.caps, self.experts, self.top_k, self.gating = layer, caps, experts, top_k, gating
        self.fixed = [1.0] * shared + [0.0] * dropped

    def oracle(self, part: torch.Tensor, tokens: slice = slice(None)):
        """`dotmoe_dev.bench.OracleRouter`'s output on the layer's tokens: logits = each expert's contribution norm,
        gates = the top-k of them."""
        return OracleRouter(self.layer.mlp, part, self.top_k, self.experts)(self.layer.x[tokens])

    def router_gates(self, weight: torch.Tensor) -> torch.Tensor:
        from dotmoe.router import TopKRouter

        router = TopKRouter(weight.shape[1], self.experts, self.top_k, self.gating)
        router.weight.data.copy_(weight)
        return router(self.layer.x).gates.detach()

    def neuron_gates(self, part: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        columns = torch.cat([gates, gates.new_tensor(self.fixed).expand(len(gates), len(self.fixed))], -1)
        return columns @ nn.functional.one_hot(part, len(self.caps)).float().t()

    def error(self, part: torch.Tensor, gates: torch.Tensor) -> float:
        return self.layer.refit_error(self.layer.h * self.neuron_gates(part, gates))


def classifier_router(moe: Moe, part: torch.Tensor, init: torch.Tensor, steps: int = 60) -> torch.Tensor:
    """A softmax classifier d -> E fitted (LBFGS, from `init`) to each fitting token's oracle top-k experts (target
    1/k each), rescaled so its logits have the least-squares router's spread."""
    fit = slice(0, moe.layer.cut)
    target = moe.oracle(part, fit).gates / moe.top_k
    x = moe.layer.x[fit].float()
    weight = init.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([weight], max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -(target * torch.log_softmax(x @ weight.t(), -1)).sum(-1).mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    weight = weight.detach()
    return weight * ((x @ init.t()).std(-1).mean() / (x @ weight.t()).std(-1).mean())


def refined_partition(moe: Moe, part: torch.Tensor, router: torch.Tensor, rounds: int):
    """`rounds` of: reassign the routed neurons to the experts whose routed tokens they add the most output energy
    to (balanced OT + greedy rounding, the partition's own machinery), then refit the least-squares router."""
    from dotmoe.layer_setup import lstsq_router
    from dotmoe.rounding import greedy_round
    from dotmoe.sinkhorn import sinkhorn_log

    fit = slice(0, moe.layer.cut)
    energy = moe.layer.contrib[fit].pow(2)
    routed = (part < moe.experts).nonzero().squeeze(1)
    for _ in range(rounds):
        mask = (moe.router_gates(router)[fit] > 0).float()
        captured = (mask.t() @ energy[:, routed]).t()  # [routed neurons, E]
        share = captured / captured.sum(1, keepdim=True).clamp_min(1e-30)
        plan = sinkhorn_log(share, moe.caps[: moe.experts].float(), tau=0.02, iters=200).plan
        part = part.clone()
        part[routed] = greedy_round(plan, moe.caps[: moe.experts])
        router = lstsq_router(moe.layer.mlp, moe.layer.x[fit], part, moe.experts)
    return part, router


def trained_experts_error(moe: Moe, part: torch.Tensor, gates: torch.Tensor, steps: int, lr: float,
                          batch: int = 1024) -> float:
    """Held-out error after Adam on the experts' gate/up/down (fixed routing) from the refitted start."""
    from dotmoe.refit import fit_layer

    layer, g = moe.layer, moe.neuron_gates(part, gates)
    mlp, x, y, cut = layer.mlp, layer.x, layer.y, layer.cut
    down, _ = fit_layer((layer.h * g)[:cut], y[:cut])
    params = [mlp.gate_proj.weight.detach().float().clone(), mlp.up_proj.weight.detach().float().clone(),
              down.float().clone()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(0)

    def output(idx):
        z = mlp.act_fn(x[idx] @ params[0].t()) * (x[idx] @ params[1].t()) * g[idx]
        return z @ params[2].t()

    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, cut, (batch,), generator=gen)
            loss = (y[idx] - output(idx)).pow(2).sum() / y[idx].pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return relative_error(y[cut:], output(slice(cut, None)).detach())


@torch.no_grad()
def main() -> None:
    from dotmoe.config import ConvertConfig
    from dotmoe.layer_setup import calibrate_layer
    from dotmoe.prepare import prepare

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 11, 20, 28])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--calib-tokens", type=int, default=16384)
    parser.add_argument("--holdout", type=int, default=2048)
    parser.add_argument("--refine", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=0)
    parser.add_argument("--train-lr", type=float, default=3e-4)
    parser.add_argument("--out", default=None, help="markdown file (default: results/layer_headroom_<model>_e<E>k<K>.md)")
    args = parser.parse_args()

    cfg = ConvertConfig(model=str(model_dir(args.model)), experts=args.experts, top_k=args.topk, tokens=0,
                        export_format="none", calib_tokens=args.calib_tokens)
    prep = prepare(cfg)
    caps = torch.tensor(cfg.column_capacities(prep.num_neurons))
    budget = cfg.shared + args.topk * int(caps[0])
    columns = ["prune", "moe", "moe, oracle router", "moe, classifier router", f"moe, refined partition x{args.refine}"]
    columns += [f"moe, trained experts ({args.train_steps} steps)"] if args.train_steps else []
    columns += ["neuron oracle"]
    rows = []

    def measure(i: int, x: torch.Tensor):
        if i not in args.layers:
            return None
        t0 = time.time()
        layer = Layer(prep.mlps[i], x, args.holdout)
        moe = Moe(layer, caps, args.experts, args.topk, cfg.gating, cfg.shared > 0, cfg.drop > 0)
        fit = x[: layer.cut]
        part, router = calibrate_layer(cfg, layer.mlp, fit, caps, torch.Generator().manual_seed(cfg.seed))
        keep = layer.contrib[: layer.cut].mean(0).topk(budget).indices
        errors = [layer.refit_error(layer.h[:, keep]), moe.error(part, moe.router_gates(router)),
                  moe.error(part, moe.oracle(part).gates),
                  moe.error(part, moe.router_gates(classifier_router(moe, part, router)))]
        refined, refined_router = refined_partition(moe, part, router, args.refine)
        errors.append(moe.error(refined, moe.router_gates(refined_router)))
        if args.train_steps:
            errors.append(trained_experts_error(moe, part, moe.router_gates(router), args.train_steps, args.train_lr))
        errors.append(layer.refit_error(OracleMLP(layer.mlp, budget).features(x)[0].float()))
        rows.append((i, errors))
        print(i, [round(e, 4) for e in errors], f"{time.time() - t0:.0f}s", flush=True)

    prep.map_calibration_inputs(cfg, measure)
    command = " ".join(["python benchmarks/layer_headroom.py", *sys.argv[1:]])
    lines = [f"# Layer headroom: {args.model}, E={args.experts}/k={args.topk} (shared {cfg.shared}, dropped "
             f"{cfg.drop}; {budget} of {prep.num_neurons} neurons active)", "",
             f"`{command}` (2 CPU cores, torch 2.13.0+cpu). Held-out relative error of the FFN output after the "
             f"least-squares refit of W_down, on the layer's dense inputs ({args.calib_tokens} calibration tokens, the "
             f"last {args.holdout} held out). Lower is better; see the script's docstring for each column.", "",
             "| layer | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {i} | " + " | ".join(f"{e:.4f}" for e in errors) + " |" for i, errors in rows]
    out = Path(args.out or ROOT / "benchmarks" / "results" /
               f"layer_headroom_{args.model}_e{args.experts}k{args.topk}.md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
