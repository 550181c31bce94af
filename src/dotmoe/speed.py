"""`dotmoe bench speed`: prefill and decode throughput of a dense model vs its exported MoE.

Protocol: same dtype and threads for both; both models loaded, one warm-up round, then `runs` rounds in which
the dense model and the MoE (once per experts implementation) are timed alternately; medians are reported. Prefill =
one forward over [batch, prompt] tokens. Decode = `new_tokens` single-token forwards with the KV cache after
that prefill (greedy, no early stop), i.e. what `generate` does without its sampling overhead. The bytes-read
bound of batch B is dense weight bytes / the weights one decode step of B tokens must read: the non-expert
weights plus the experts those B tokens touch per layer, measured from the MoE's own routing of the bundled
validation text (`dotmoe.expert_coverage`; k of E at batch 1, nearly all E at B >= E / k). It is the speedup a
memory-bound decoder could reach; a measured ratio above it is flagged (the timing or the bound is wrong). The
timed prompts and decode tokens are windows of the same text, so the timed steps route as the bound assumes.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dotmoe.expert_coverage import bytes_bound

EXPERT_IMPLEMENTATIONS = ("grouped_mm", "dotmoe_auto", "dotmoe_gather", "dotmoe_all", "eager", "batched_mm")


@dataclass
class Throughput:
    """Median tokens/s of one model at one batch size."""

    prefill_tok_s: float
    decode_tok_s: float


class Workload:
    """The fixed random prompt and decode tokens every model is timed on."""

    def __init__(self, vocab: int, batch: int, prompt: int, new_tokens: int, device: str | torch.device,
                 text_ids: torch.Tensor | None = None):
        """Prompts and decode tokens from `text_ids` (1-D: consecutive windows of real text, teacher-forced, so
        the MoE routes as on text; repeated when too short), else random ids below `vocab`."""
        span = prompt + new_tokens
        if text_ids is not None and len(text_ids) >= span:
            reps = -(-batch * span // len(text_ids))
            rows = text_ids.repeat(reps)[: batch * span].view(batch, span)
        else:
            rows = torch.randint(0, vocab, (batch, span), generator=torch.Generator().manual_seed(0))
        self.ids, self.step_ids = rows[:, :prompt].to(device), rows[:, prompt:].to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def time_once(self, model) -> tuple[float, float]:
        """(prefill tokens/s, decode tokens/s) of one prefill + `new_tokens` cached decode steps."""
        batch, prompt = self.ids.shape
        new_tokens = self.step_ids.shape[1]
        self._sync()
        t0 = time.perf_counter()
        past = model(input_ids=self.ids, use_cache=True).past_key_values
        self._sync()
        t1 = time.perf_counter()
        for i in range(new_tokens):
            past = model(input_ids=self.step_ids[:, i : i + 1], past_key_values=past, use_cache=True).past_key_values
        self._sync()
        t2 = time.perf_counter()
        return batch * prompt / (t1 - t0), batch * new_tokens / (t2 - t1)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _median(times: list[tuple[float, float]]) -> Throughput:
    return Throughput(statistics.median(t[0] for t in times), statistics.median(t[1] for t in times))


def weight_bytes(model_dir: str | Path, element_bytes: int | None = None) -> tuple[int, int]:
    """(bytes of all weights, bytes a batch-1 decode step reads) from config.json's dotmoe counts, or dense;
    `element_bytes`: as loaded in a dtype of that size (else as stored)."""
    total, expert = byte_counts(model_dir, element_bytes)
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    k = cfg.get("num_experts_per_tok")
    active = total if not experts else total - expert + expert * k // experts
    return total, active


def byte_counts(model_dir: str | Path, element_bytes: int | None = None) -> tuple[int, int]:
    """(bytes of the weights a decode step reads, bytes of the routed experts' weights: tensors named `.experts.`),
    as stored, or with `element_bytes` per element (the dtype the model is loaded in: a float32 dense checkpoint
    timed in bf16 reads 2 bytes per weight, not 4). Every weight counts but the token-embedding table when the LM
    head is a tensor of its own (`lm_head.*`): a lookup reads one row of the table; tied, the table is the head and
    is read whole (a Qwen2-MoE export writes a tied head out, `ExportTarget.unties_lm_head`)."""
    from safetensors import safe_open

    from dotmoe.guards import model_weight_files

    sizes: dict[str, int] = {}
    for f in model_weight_files(model_dir):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                n = 1
                for s in sl.get_shape():
                    n *= s
                sizes[k] = n * (element_bytes or _dtype_size(sl.get_dtype()))
    separate_head = any(k.startswith("lm_head.") for k in sizes)
    lookup = sum(v for k, v in sizes.items() if k.endswith("embed_tokens.weight")) if separate_head else 0
    return sum(sizes.values()) - lookup, sum(v for k, v in sizes.items() if ".experts." in k)


def _dtype_size(name: str) -> int:
    return {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4}.get(name, 4)


def _experts(config: dict) -> int | None:
    """The expert count a model's config.json declares (stock MoE keys, or the dotmoe custom class's), else None."""
    own = config.get("dotmoe")
    return config.get("num_local_experts") or config.get("num_experts") or \
        (own.get("experts") if isinstance(own, dict) else None)


def check_pair(dense_dir: str | Path, moe_dir: str | Path, prompt: int, new_tokens: int,
               trust_remote_code: bool = False) -> None:
    """Both are model directories, --moe is an MoE (and its custom class is allowed to run when it has one) and
    --dense is not, the MoE has the dense model's layer count, hidden size and vocabulary (it was converted from
    it), and prompt + new tokens fit both models' context."""
    from dotmoe.architecture import check_model_dir
    from dotmoe.errors import DotMoeError
    from dotmoe.guards import check_seq_len

    configs = {}
    for flag, d in (("--dense", dense_dir), ("--moe", moe_dir)):
        check_model_dir(d)
        configs[flag] = json.loads((Path(d) / "config.json").read_text())
        check_seq_len(prompt + new_tokens, configs[flag], f"{flag} {d}: --prompt + --new-tokens")
    if not _experts(configs["--moe"]):
        raise DotMoeError(f"--moe {moe_dir} has no experts in its config.json (a dense or pruned model): bench speed "
                          "times an MoE export (dotmoe convert / export) against the dense model it came from")
    if _experts(configs["--dense"]):
        raise DotMoeError(f"--dense {dense_dir} is an MoE ({_experts(configs['--dense'])} experts): pass the dense "
                          "model the MoE was converted from")
    if "auto_map" in configs["--moe"] and not trust_remote_code:
        raise DotMoeError(f"--moe {moe_dir} is a custom-class export (its own modeling code, auto_map in "
                          "config.json); pass --trust-remote-code to run that code")
    keys = ("num_hidden_layers", "hidden_size", "vocab_size")
    diff = [f"{k} {configs['--dense'].get(k)} vs {configs['--moe'].get(k)}" for k in keys
            if configs["--dense"].get(k) != configs["--moe"].get(k)]
    if diff:
        raise DotMoeError(f"--moe {moe_dir} was not converted from --dense {dense_dir}: {', '.join(diff)} "
                          "(dense vs MoE)")


def load(model_dir: str | Path, dtype: torch.dtype, device: str, experts_implementation: str | None = None,
         trust_remote_code: bool = False):
    import dotmoe.fast_experts  # noqa: F401  registers "dotmoe_gather"
    from dotmoe.architecture import from_pretrained_checked

    kwargs = {"experts_implementation": experts_implementation} if experts_implementation else {}
    return from_pretrained_checked(Path(model_dir), dtype, trust_remote_code, **kwargs).to(device).eval()


def _time_alternately(work: "Workload", dense, moe, impls: list[str], runs: int):
    """`runs` timed runs of `work` (after one warm-up), dense and the MoE with each experts implementation in turn;
    the medians: (dense, {implementation: MoE})."""
    dense_t: list[tuple[float, float]] = []
    moe_t: dict[str, list[tuple[float, float]]] = {i: [] for i in impls}
    for run in range(runs + 1):  # run 0 is the warm-up
        t = work.time_once(dense)
        if run:
            dense_t.append(t)
        for impl in impls:
            moe.set_experts_implementation(impl)
            t = work.time_once(moe)
            if run:
                moe_t[impl].append(t)
    return _median(dense_t), {i: _median(t) for i, t in moe_t.items()}


def bench_pair(dense_dir: str, moe_dir: str, batches: list[int], prompt: int, new_tokens: int, runs: int,
               dtype: torch.dtype, device: str, implementations: tuple[str, ...] = EXPERT_IMPLEMENTATIONS,
               trust_remote_code: bool = False, log=print, onednn: bool = True) -> list[dict]:
    """Rows (one per batch size): dense and per-implementation MoE throughput, ratios and the bytes bound.
    `onednn=False` times both models with PyTorch's oneDNN (mkldnn) matmuls off: on CPU, bf16 matrix-vector
    products then use PyTorch's native kernel, whose fixed cost per call is far lower (batch-1 decoding).

    Both models stay loaded and their timed runs alternate (dense, MoE with each experts implementation, dense,
    ...), so a slow spell of the machine (another process, frequency changes) hits every variant alike instead of
    biasing whichever model happened to run during it.
    """
    from dotmoe.gguf_input import resolve_model

    dense_dir, moe_dir = resolve_model(dense_dir), resolve_model(moe_dir)  # a .gguf: its dequantized HF directory
    size = torch.empty(0, dtype=dtype).element_size()  # both models are timed in `dtype`, whatever they store
    dense_bytes, _ = weight_bytes(dense_dir, size)
    moe_bytes, expert_bytes = byte_counts(moe_dir, size)
    moe_config = json.loads((Path(moe_dir) / "config.json").read_text())
    num_experts = _experts(moe_config)
    batch1_bound = bytes_bound(dense_bytes, moe_bytes, expert_bytes, num_experts, moe_config["num_experts_per_tok"])
    vocab = json.loads((Path(dense_dir) / "config.json").read_text())["vocab_size"]
    dense = load(dense_dir, dtype, device)
    moe = load(moe_dir, dtype, device, implementations[0], trust_remote_code)
    text = validation_ids(dense_dir)
    covered = {c.batch: c for c in measure_coverage(moe, text, batches)}
    impls = []
    for impl in implementations:
        try:
            moe.set_experts_implementation(impl)
            impls.append(impl)
        except Exception as exc:  # an implementation the installed torch/transformers lacks
            log(f"experts implementation {impl}: unavailable ({str(exc).splitlines()[0][:120]})")
    rows = []
    for b in batches:
        with torch.backends.mkldnn.flags(enabled=onednn):
            d, moe_tp = _time_alternately(Workload(vocab, b, prompt, new_tokens, device, text), dense, moe, impls,
                                          runs)
        best = max(moe_tp, key=lambda i: moe_tp[i].decode_tok_s)
        m = moe_tp[best]
        c = covered.get(b)
        bound = batch1_bound if c is None else bytes_bound(dense_bytes, moe_bytes, expert_bytes, num_experts, c.measured)
        rows.append({"batch": b, "dense_prefill": d.prefill_tok_s, "dense_decode": d.decode_tok_s,
                     "moe_impl": best, "moe_prefill": m.prefill_tok_s, "moe_decode": m.decode_tok_s,
                     "prefill_ratio": m.prefill_tok_s / d.prefill_tok_s, "decode_ratio": m.decode_tok_s / d.decode_tok_s,
                     "bytes_bound": bound, "batch1_bytes_bound": batch1_bound,
                     "experts_touched": None if c is None else c.measured,
                     "experts_touched_expected": None if c is None else c.expected,
                     "bytes_bound_expected": None if c is None else
                     bytes_bound(dense_bytes, moe_bytes, expert_bytes, num_experts, c.expected),
                     "above_bound": m.decode_tok_s / d.decode_tok_s > bound,
                     "all_impls": {i: {"prefill": t.prefill_tok_s, "decode": t.decode_tok_s}
                                   for i, t in moe_tp.items()}})
    return rows


COVERAGE_TOKENS = 4096  # tokens of the bundled validation text routed to measure which experts a batch touches


def validation_ids(dense_dir: str | Path) -> torch.Tensor:
    """COVERAGE_TOKENS ids of the bundled validation text (the general-English split for a real model)."""
    from transformers import AutoTokenizer

    from dotmoe.data import TextFiles, tokenize_stream
    from dotmoe.paths import default_data_file

    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    return tokenize_stream(tokenizer, TextFiles([str(default_data_file("validation", dense_dir))]), COVERAGE_TOKENS)


def measure_coverage(moe, ids: torch.Tensor, batches: list[int]) -> list:
    """Experts touched per layer at each batch size, from the MoE's routing of `ids`, or [] when the MoE's
    experts are not stock modules."""
    from dotmoe.errors import DotMoeError
    from dotmoe.expert_coverage import coverage, experts_modules, routing_choices

    try:
        modules = experts_modules(moe)
    except DotMoeError:
        return []
    return coverage(routing_choices(moe, ids, min(256, len(ids))), modules[0].num_experts, batches)


def format_rows(rows: list[dict], label: str = "") -> str:
    lines = [f"| {'model | ' if label else ''}batch | dense prefill tok/s | MoE prefill tok/s | prefill x | dense decode "
             "tok/s | MoE decode tok/s | decode x | experts touched per layer (expected) | bytes bound x | "
             "decode / bound | MoE experts impl |",
             f"|{'---|' if label else ''}---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        touched = "-" if r.get("experts_touched") is None else \
            f"{r['experts_touched']:.2f} ({r['experts_touched_expected']:.2f})"
        ratio = r["decode_ratio"] / r["bytes_bound"]
        flag = " ABOVE BOUND" if r.get("above_bound") else ""
        lines.append(f"| {label + ' | ' if label else ''}{r['batch']} | {r['dense_prefill']:.0f} | {r['moe_prefill']:.0f} | "
                     f"{r['prefill_ratio']:.2f} | {r['dense_decode']:.1f} | {r['moe_decode']:.1f} | "
                     f"{r['decode_ratio']:.2f}x | {touched} | {r['bytes_bound']:.2f} | {ratio:.2f}{flag} | "
                     f"{r['moe_impl']} |")
    return "\n".join(lines)
