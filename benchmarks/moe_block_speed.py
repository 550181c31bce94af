"""Time the FFN blocks of one decode step: the dense model's MLPs vs the exported MoE's blocks, per experts kernel.

    python benchmarks/moe_block_speed.py --real smollm2-k2=DIR smollm2-k4=DIR [--batches 1 2 4 8 16] [--threads 2]
                                         [--impls grouped_mm dotmoe_auto ...] [--reps 40] [--out FILE]

Where a MoE's decode time goes, without attention, the LM head or generate's bookkeeping: each layer's FFN (dense)
or MoE block (shared expert, router, experts) runs once on B tokens, all layers in turn, so that every weight is
streamed from memory as in a real decode step (one layer's weights fit in cache; all of them do not). The inputs
are the MoE's own FFN inputs on the bundled validation text (B tokens 512 / B positions apart), so the routing is
that of real text. Median milliseconds per step (all layers) after 5 warm-up steps; bf16. A kernel whose output
differs from the first kernel's by more than 2% (relative norm) is flagged. The last column times the blocks'
work besides the routed experts (shared expert, its gate, the router: what no experts kernel can change). Prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dotmoe.speed import load, validation_ids


def ffn_inputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each decoder layer's FFN input [T, d] on one forward over `ids`."""
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0][0].detach()))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=ids[None])
    for h in hooks:
        h.remove()
    return [inputs[i] for i in range(len(hooks))]


def step_ms(blocks, xs: list[torch.Tensor], reps: int) -> float:
    """Median ms of running every block on its input once."""
    times = []
    with torch.no_grad():
        for rep in range(reps + 5):
            t0 = time.perf_counter()
            for block, x in zip(blocks, xs):
                block(x)
            if rep >= 5:
                times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


class BlockWithoutExperts(torch.nn.Module):
    """A Qwen2-MoE block's work besides its routed experts: the shared expert, its gate and the router."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        h = x.view(-1, x.shape[-1])
        self.block.gate(h)
        return torch.sigmoid(self.block.shared_expert_gate(h)) * self.block.shared_expert(h)


def time_pair(moe_dir: str, batches: list[int], impls: list[str], reps: int) -> list[dict]:
    dense_dir = json.loads((Path(moe_dir) / "config.json").read_text())["dotmoe"]["base_model"]
    dense = load(dense_dir, torch.bfloat16, "cpu")
    moe = load(moe_dir, torch.bfloat16, "cpu", impls[0])
    inputs = ffn_inputs(moe, validation_ids(dense_dir)[:512])
    dense_blocks, moe_blocks = [layer.mlp for layer in dense.model.layers], [layer.mlp for layer in moe.model.layers]
    rows = []
    for b in batches:
        xs = [x[:: 512 // b][:b].unsqueeze(1).contiguous() for x in inputs]  # [B, 1, d]: B sequences' next token
        row = {"batch": b, "dense": step_ms(dense_blocks, xs, reps), "moe": {}, "flagged": [],
               "without_experts": step_ms([BlockWithoutExperts(m) for m in moe_blocks], xs, reps)
               if hasattr(moe_blocks[0], "shared_expert") else None}
        reference = None
        for impl in impls:
            moe.set_experts_implementation(impl)
            with torch.no_grad():
                out = torch.cat([block(x).float() for block, x in zip(moe_blocks, xs)])
            reference = out if reference is None else reference
            if ((out - reference).norm() / reference.norm()).item() > 0.02:
                row["flagged"].append(impl)
            row["moe"][impl] = step_ms(moe_blocks, xs, reps)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", nargs="+", required=True, metavar="LABEL=MOE_DIR")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--impls", nargs="+", default=["grouped_mm", "dotmoe_auto", "dotmoe_gather", "dotmoe_all"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import dotmoe.fast_experts  # noqa: F401  registers the dotmoe kernels

    lines = [f"`python benchmarks/moe_block_speed.py --real {' '.join(args.real)} --batches "
             f"{' '.join(map(str, args.batches))} --impls {' '.join(args.impls)} --threads {args.threads} --reps "
             f"{args.reps}`  ", f"Machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
             "bf16. Median ms per decode step for all layers' FFN blocks (weights streamed).", "",
             "| model | batch | dense FFNs ms | " + " | ".join(f"MoE {i} ms" for i in args.impls)
             + " | FFN speedup x (dense / best MoE) | MoE blocks without routed experts ms |",
             "|---|---|---|" + "---|" * (len(args.impls) + 2)]
    for label, moe_dir in (item.split("=", 1) for item in args.real):
        for r in time_pair(moe_dir, args.batches, args.impls, args.reps):
            cells = [f"{r['moe'][i]:.2f}" + (" (differs)" if i in r["flagged"] else "") for i in args.impls]
            best = min(v for i, v in r["moe"].items() if i not in r["flagged"])
            rest = "-" if r["without_experts"] is None else f"{r['without_experts']:.2f}"
            lines.append(f"| {label} | {r['batch']} | {r['dense']:.2f} | " + " | ".join(cells)
                         + f" | {r['dense'] / best:.2f}x | {rest} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
