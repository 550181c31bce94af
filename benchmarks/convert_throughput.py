"""Conversion cost: a DOT-MoE training step vs a plain KD fine-tuning step of the dense model, same tokens.

    python benchmarks/convert_throughput.py [--steps 12] [--batch 8] [--seq-len 256] [--out benchmarks/results/convert_throughput.md]

Both steps run the same teacher forward (no grad), student forward, KL (the same chunked loss code), backward
and AdamW. KD = the dense student with all weights trainable; DOT-MoE = the MoE-ified model with the default
trainable set (router + assignment) and, for reference, with `full`. Also times the assignment alone (Sinkhorn
over all layers + greedy rounding), the part that plain KD does not have. Median step time after 2 warm-ups.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from pathlib import Path

import torch

from dotmoe.architecture import find_gated_mlps, load_causal_lm
from dotmoe.assignment import NeuronAssigner
from dotmoe.config import ConvertConfig
from dotmoe.losses import distill_and_lm_loss
from dotmoe.moe_mlp import install_moe
from dotmoe.paths import reference_model_dir
from dotmoe.partitions import random_partition
from dotmoe.sinkhorn import capacities
from dotmoe.train import MoeTrainingModule


def timed(step, steps: int) -> float:
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/convert_throughput.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(0, 8192, (args.batch, args.seq_len))

    # plain KD fine-tuning: frozen teacher copy, fully trainable dense student
    student, _ = load_causal_lm(reference_model_dir())
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)

    def kd_step():
        with torch.no_grad():
            t_hidden = teacher.get_decoder()(input_ids=ids).last_hidden_state
        hidden = student.get_decoder()(input_ids=ids).last_hidden_state
        kl, _ = distill_and_lm_loss(hidden, t_hidden, ids, student.get_output_embeddings(), 1.0, 1024)
        kl.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    kd = timed(kd_step, args.steps)
    del student, teacher, opt

    rows = [("plain KD fine-tuning (dense, all weights)", kd)]
    for trainable in ("router+assignment", "full"):
        cfg = ConvertConfig(batch_size=args.batch, seq_len=args.seq_len, trainable=trainable)
        model, _ = load_causal_lm(reference_model_dir())
        model.requires_grad_(trainable == "full")
        n = find_gated_mlps(model)[0][1].gate_proj.out_features
        layers = len(find_gated_mlps(model))
        teacher = copy.deepcopy(model).eval().requires_grad_(False) if trainable == "full" else None
        moes = install_moe(model, cfg.experts, cfg.top_k, cfg.gating, shared=False)
        caps = torch.tensor(capacities(n, cfg.experts))
        gen = torch.Generator().manual_seed(0)
        parts = torch.stack([random_partition(caps, gen) for _ in range(layers)])
        assigner = NeuronAssigner(torch.nn.functional.one_hot(parts, cfg.experts).float(), caps, learn=True)
        module = MoeTrainingModule(model, assigner, moes, cfg, teacher)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)

        def moe_step():
            terms = module(ids, cfg.tau_start)
            terms["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        rows.append((f"DOT-MoE step, trainable={trainable}", timed(moe_step, args.steps)))
        if trainable == "router+assignment":
            rows.append(("  of which: assignment (Sinkhorn 100 it. + greedy rounding, all layers, fwd only)",
                         timed(lambda: assigner.refresh(cfg.tau_start), args.steps)))
        del model, module, opt

    lines = [f"`python benchmarks/convert_throughput.py --steps {args.steps} --batch {args.batch} --seq-len "
             f"{args.seq_len}` on the reference model (E=8, k=2), {platform.machine()}, {torch.get_num_threads()} "
             f"threads, torch {torch.__version__}; median step time.", "",
             "| step | seconds | / plain KD |", "|---|---|---|"]
    lines += [f"| {name} | {t:.3f} | {t / kd:.2f} |" for name, t in rows]
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
