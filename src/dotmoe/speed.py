"""`dotmoe bench speed`: prefill and decode throughput of a dense model vs its exported MoE.

Protocol: same dtype and threads for both; one warm-up run, then the median of `runs` timed runs. Prefill =
one forward over [batch, prompt] tokens. Decode = `new_tokens` single-token forwards with the KV cache after
that prefill (greedy, no early stop), i.e. what `generate` does without its sampling overhead. The bytes-read
bound is dense weight bytes / weights a batch-1 decode step must read (non-expert weights + k of E experts):
the speedup a memory-bound decoder could reach.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

EXPERT_IMPLEMENTATIONS = ("grouped_mm", "dotmoe_gather", "eager", "batched_mm")


@dataclass
class Throughput:
    """Median tokens/s of one model at one batch size."""

    prefill_tok_s: float
    decode_tok_s: float


@torch.no_grad()
def measure(model, vocab: int, batch: int, prompt: int, new_tokens: int, runs: int = 5) -> Throughput:
    """Median prefill and decode tokens/s (see module doc)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, prompt), generator=gen).to(device)
    step_ids = torch.randint(0, vocab, (batch, new_tokens), generator=gen).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    prefill, decode = [], []
    for run in range(runs + 1):  # run 0 is the warm-up
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        sync()
        t1 = time.perf_counter()
        past = out.past_key_values
        for i in range(new_tokens):
            past = model(input_ids=step_ids[:, i : i + 1], past_key_values=past, use_cache=True).past_key_values
        sync()
        t2 = time.perf_counter()
        if run:
            prefill.append(batch * prompt / (t1 - t0))
            decode.append(batch * new_tokens / (t2 - t1))
    return Throughput(statistics.median(prefill), statistics.median(decode))


def weight_bytes(model_dir: str | Path) -> tuple[int, int]:
    """(bytes of all weights, bytes a batch-1 decode step reads) from config.json's dotmoe counts, or dense."""
    from safetensors import safe_open

    total = 0
    expert = 0
    for f in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                n = 1
                for s in sl.get_shape():
                    n *= s
                size = n * _dtype_size(sl.get_dtype())
                total += size
                if ".experts." in k:
                    expert += size
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    k = cfg.get("num_experts_per_tok")
    active = total if not experts else total - expert + expert * k // experts
    return total, active


def _dtype_size(name: str) -> int:
    return {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4}.get(name, 4)


def load(model_dir: str | Path, dtype: torch.dtype, device: str, experts_implementation: str | None = None,
         trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    import dotmoe.fast_experts  # noqa: F401  registers "dotmoe_gather"

    kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 **kwargs)
    return model.to(device).eval()


def bench_pair(dense_dir: str, moe_dir: str, batches: list[int], prompt: int, new_tokens: int, runs: int,
               dtype: torch.dtype, device: str, implementations: tuple[str, ...] = EXPERT_IMPLEMENTATIONS,
               trust_remote_code: bool = False, log=print) -> list[dict]:
    """Rows (one per batch size): dense and per-implementation MoE throughput, ratios and the bytes bound."""
    dense_bytes, _ = weight_bytes(dense_dir)
    moe_total, moe_active = weight_bytes(moe_dir)
    vocab = json.loads((Path(dense_dir) / "config.json").read_text())["vocab_size"]
    dense = load(dense_dir, dtype, device)
    dense_tp = {b: measure(dense, vocab, b, prompt, new_tokens, runs) for b in batches}
    del dense
    moe_tp: dict[str, dict[int, Throughput]] = {}
    for impl in implementations:
        try:
            moe = load(moe_dir, dtype, device, impl, trust_remote_code)
            moe_tp[impl] = {b: measure(moe, vocab, b, prompt, new_tokens, runs) for b in batches}
            del moe
        except Exception as exc:  # an implementation the installed torch/transformers lacks
            log(f"experts implementation {impl}: unavailable ({str(exc).splitlines()[0][:120]})")
    rows = []
    for b in batches:
        best = max(moe_tp, key=lambda i: moe_tp[i][b].decode_tok_s)
        d, m = dense_tp[b], moe_tp[best][b]
        rows.append({"batch": b, "dense_prefill": d.prefill_tok_s, "dense_decode": d.decode_tok_s,
                     "moe_impl": best, "moe_prefill": m.prefill_tok_s, "moe_decode": m.decode_tok_s,
                     "prefill_ratio": m.prefill_tok_s / d.prefill_tok_s, "decode_ratio": m.decode_tok_s / d.decode_tok_s,
                     "bytes_bound": dense_bytes / moe_active,
                     "all_impls": {i: {"prefill": t[b].prefill_tok_s, "decode": t[b].decode_tok_s}
                                   for i, t in moe_tp.items()}})
    return rows


def format_rows(rows: list[dict], label: str = "") -> str:
    lines = [f"| {'model | ' if label else ''}batch | dense prefill tok/s | MoE prefill tok/s | prefill x | dense decode "
             "tok/s | MoE decode tok/s | decode x | bytes bound x | decode / bound | MoE experts impl |",
             f"|{'---|' if label else ''}---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {label + ' | ' if label else ''}{r['batch']} | {r['dense_prefill']:.0f} | {r['moe_prefill']:.0f} | "
                     f"{r['prefill_ratio']:.2f} | {r['dense_decode']:.1f} | {r['moe_decode']:.1f} | "
                     f"{r['decode_ratio']:.2f} | {r['bytes_bound']:.2f} | {r['decode_ratio'] / r['bytes_bound']:.2f} | "
                     f"{r['moe_impl']} |")
    return "\n".join(lines)
