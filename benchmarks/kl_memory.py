"""Peak memory of the chunked KL + CE loss (forward and backward) for a large vocabulary, per chunk size.

    PYTHONPATH=src python benchmarks/kl_memory.py [--vocab 262144] [--hidden 640] [--tokens 2048]

Each setting runs in a fresh process; reported: peak RSS above the process's RSS before the loss (the LM head,
hidden states and their gradients are allocated before that baseline), and the analytic size of one chunk's
fp32 logits (chunk x vocab x 4 bytes). Gemma-3 has a 262,144-token vocabulary; the default chunk is 1024 tokens.
"""

import argparse
import json
import subprocess
import sys


def child(vocab: int, hidden: int, tokens: int, chunk: int) -> None:
    import resource

    import torch

    from dotmoe.losses import distill_and_lm_loss

    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    h_s = torch.randn(1, tokens + 1, hidden, requires_grad=True)
    h_t = torch.randn(1, tokens + 1, hidden)
    labels = torch.randint(0, vocab, (1, tokens + 1))
    head.weight.requires_grad_(False)  # frozen, as in router+assignment training
    h_s.grad = torch.zeros_like(h_s)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kl, ce = distill_and_lm_loss(h_s, h_t, labels, head, chunk_tokens=chunk)
    (kl + ce).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"chunk": chunk, "peak_above_base_gb": (peak - base) / 1024**2,
                      "chunk_logits_gb": chunk * vocab * 4 / 1024**3, "kl": float(kl)}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=262_144)
    p.add_argument("--hidden", type=int, default=640)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--child", type=int)
    a = p.parse_args()
    if a.child:
        return child(a.vocab, a.hidden, a.tokens, a.child)
    print(f"vocab {a.vocab}, hidden {a.hidden}, {a.tokens} tokens (batch 8 x 256), KL + CE forward + backward")
    print("| chunk tokens | one chunk's fp32 logits | peak RSS above baseline |\n|---|---|---|")
    for c in a.chunks:
        out = subprocess.run([sys.executable, __file__, "--vocab", str(a.vocab), "--hidden", str(a.hidden),
                              "--tokens", str(a.tokens), "--child", str(c)], capture_output=True, text=True,
                             check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {c} | {r['chunk_logits_gb']:.2f} GB | {r['peak_above_base_gb']:.2f} GB |")


if __name__ == "__main__":
    main()
