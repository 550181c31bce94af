#!/usr/bin/env python3
"""llama.cpp (llama-cpp-python, CPU) inference speed: dense HF checkpoint vs its Mixtral-format MoE export.

  python benchmarks/gguf/speed_llamacpp.py --dense DENSE_HF_DIR --moe MOE_HF_DIR
         [--outtype f16|f32|bf16|q8_0] [--batch 1] [--prompt 128] [--new-tokens 32] [--runs 5]
         [--threads 2] [--workdir DIR] [--converter PATH] [--json PATH] [--seed 0] [--sequential]

Run it with the GGUF venv's python (benchmarks/gguf/setup.sh), e.g. `.gguf/venv/bin/python ...`.

1. Both HF dirs are converted to GGUF with the same --outtype through the exact code path of
   gguf_roundtrip.py (llama.cpp's convert_hf_to_gguf.py, unmodified, via convert_pretok.py).
   GGUFs are cached in --workdir; a cached file is reused when it is newer than the HF dir's
   config.json and weight files (*.safetensors / *.bin).
2. Each GGUF is loaded with llama_cpp.Llama(n_ctx=prompt+new_tokens+16, n_batch=prompt,
   n_threads=n_threads_batch=--threads, logits_all=False). One measurement =
     llm.reset(); llm.eval(prompt_ids)                       -> prefill tok/s = prompt / time
     new_tokens x llm.eval([token])   (continuing that KV)   -> decode  tok/s = new_tokens / time
   with fixed token ids (a seeded random sequence shared by both models, no sampling, no logits
   read back). One warm-up measurement per model, then the median of --runs measurements.
   By default both models stay loaded and the measurements alternate dense/MoE, so slow drifts
   in machine load hit both alike; --sequential loads and measures one model at a time.
3. Prints a markdown table | model | GGUF size MB | prefill tok/s | decode tok/s |, the MoE/dense
   ratios and the versions; --json PATH writes the same data as JSON.

Batch 1 only: llama-cpp-python's high-level Llama API is single-sequence (--batch > 1 is
reported as unsupported and 1 is used).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from dotmoe_dev.llamacpp import DEFAULT_CONVERTER, converter_info, run_conversion

HERE = Path(__file__).resolve().parent

WEIGHT_GLOBS = ("config.json", "*.safetensors", "*.bin")


def default_converter() -> Path:
    """gguf_roundtrip's default ($GGUF_WORK or ./.gguf); a relative one is also tried from the repo root."""
    if DEFAULT_CONVERTER.is_file() or DEFAULT_CONVERTER.is_absolute():
        return DEFAULT_CONVERTER
    return HERE.parents[1] / DEFAULT_CONVERTER


def hf_mtime(model_dir: Path) -> float:
    ts = [p.stat().st_mtime for g in WEIGHT_GLOBS for p in model_dir.glob(g)]
    if not (model_dir / "config.json").is_file():
        sys.exit(f"{model_dir}: no config.json")
    return max(ts)


def gguf_for(label: str, model_dir: Path, args) -> tuple[Path, bool]:
    """Convert (or reuse the cached) GGUF of model_dir. Returns (path, converted_now)."""
    tag = hashlib.sha256(str(model_dir).encode()).hexdigest()[:8]
    out = args.workdir / f"{label}-{model_dir.name}-{tag}-{args.outtype}.gguf"
    if out.is_file() and out.stat().st_mtime > hf_mtime(model_dir):
        print(f"[convert] {label}: cached {out} ({out.stat().st_size / 1e6:.2f} MB)")
        return out, False
    tmp = out.with_name(out.name + ".part")
    tmp.unlink(missing_ok=True)
    ns = SimpleNamespace(converter=args.converter, tokenizer_pre=args.tokenizer_pre,
                         model=model_dir, outtype=args.outtype)
    run_conversion(ns, tmp)  # exits 2 on failure
    os.replace(tmp, out)
    return out, True


class Bench:
    def __init__(self, label: str, path: Path, args, llama_cpp):
        self.label, self.path, self.args = label, path, args
        self.llama_cpp = llama_cpp
        self.n_ctx = args.prompt + args.new_tokens + 16
        self.llm = None
        self.prefill: list[float] = []  # seconds per run
        self.decode: list[float] = []
        self.meta: dict = {}

    def load(self) -> None:
        t0 = time.perf_counter()
        self.llm = self.llama_cpp.Llama(
            model_path=str(self.path), n_ctx=self.n_ctx, n_threads=self.args.threads,
            n_threads_batch=self.args.threads, n_batch=self.args.prompt, verbose=False, logits_all=False)
        md = self.llm.metadata
        arch = md.get("general.architecture", "?")
        self.meta = {
            "arch": arch, "n_vocab": self.llm.n_vocab(),
            "expert_count": md.get(f"{arch}.expert_count"),
            "expert_used_count": md.get(f"{arch}.expert_used_count"),
            "feed_forward_length": md.get(f"{arch}.feed_forward_length"),
            "expert_feed_forward_length": md.get(f"{arch}.expert_feed_forward_length"),
            "block_count": md.get(f"{arch}.block_count"),
            "embedding_length": md.get(f"{arch}.embedding_length"),
            "file_type": md.get("general.file_type"),
            "load_s": round(time.perf_counter() - t0, 3),
        }
        print(f"[load] {self.label}: {self.path.name} arch={arch} n_vocab={self.meta['n_vocab']} "
              f"layers={self.meta['block_count']} d={self.meta['embedding_length']} "
              f"ffn={self.meta['feed_forward_length']} experts={self.meta['expert_count']}/"
              f"{self.meta['expert_used_count']} ({self.meta['load_s']:.2f}s)", flush=True)

    def unload(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    def measure(self, prompt_ids: list[int], gen_ids: list[int]) -> tuple[float, float]:
        llm, sync = self.llm, self.llama_cpp.llama_synchronize
        ctx = llm._ctx.ctx
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        sync(ctx)
        t1 = time.perf_counter()
        for t in gen_ids:
            llm.eval([t])
        sync(ctx)
        t2 = time.perf_counter()
        assert llm.n_tokens == len(prompt_ids) + len(gen_ids), llm.n_tokens
        return t1 - t0, t2 - t1

    def summary(self, args) -> dict:
        pf = [args.prompt / s for s in self.prefill]
        dc = [args.new_tokens / s for s in self.decode]
        return {
            "model": self.label, "gguf": str(self.path),
            "gguf_size_mb": round(self.path.stat().st_size / 1e6, 3),
            "prefill_tok_s": statistics.median(pf), "decode_tok_s": statistics.median(dc),
            "prefill_tok_s_runs": [round(x, 2) for x in pf], "decode_tok_s_runs": [round(x, 2) for x in dc],
            **self.meta,
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", required=True, type=Path, help="dense HF model dir")
    ap.add_argument("--moe", required=True, type=Path, help="MoE (Mixtral-format) HF model dir")
    ap.add_argument("--outtype", choices=["f16", "f32", "bf16", "q8_0"], default="f16")
    ap.add_argument("--batch", type=int, default=1, help="only 1 is supported")
    ap.add_argument("--prompt", type=int, default=128, help="prompt length in tokens")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path,
                    default=Path(os.environ["GGUF_WORK"]) / "speed" if os.environ.get("GGUF_WORK")
                    else HERE.parents[1] / ".gguf" / "speed",
                    help="GGUF cache dir (default: $GGUF_WORK/speed, else <repo>/.gguf/speed)")
    ap.add_argument("--converter", type=Path, default=None)
    ap.add_argument("--tokenizer-pre", default=None, help="force tokenizer.ggml.pre (default: auto)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the fixed prompt/decode token ids")
    ap.add_argument("--sequential", action="store_true",
                    help="load and measure one model at a time (default: both loaded, runs alternate)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = ap.parse_args()

    if args.batch != 1:
        print(f"[note] --batch {args.batch} is not supported (llama-cpp-python's Llama API is "
              f"single-sequence); using batch 1")
        args.batch = 1
    if args.prompt < 1 or args.new_tokens < 1 or args.runs < 1 or args.threads < 1:
        sys.exit("--prompt, --new-tokens, --runs and --threads must be >= 1")
    args.dense, args.moe = args.dense.resolve(), args.moe.resolve()
    args.converter = (args.converter or default_converter()).resolve()
    if not args.converter.is_file():
        sys.exit(f"converter not found: {args.converter} (pass --converter or set GGUF_WORK)")
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)

    import llama_cpp
    import numpy as np

    conv = converter_info(args.converter)
    sysinfo = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    print(f"llama_cpp (python pkg) {llama_cpp.__version__}; llama.cpp commit "
          f"{conv.get('llama_cpp_commit_git') or conv.get('llama_cpp_commit_changelog', '?')}; {sysinfo}")

    load_before = os.getloadavg()
    busy = load_before[0] + args.threads > (os.cpu_count() or 1) + 0.5
    if busy and args.threads > 1:
        print(f"[warn] load average {load_before[0]:.2f} on {os.cpu_count()} CPUs: with --threads {args.threads} the "
              f"llama.cpp threads will be oversubscribed; multi-thread timings then suffer from barrier stalls "
              f"(a preempted thread stalls every op) and are not meaningful -- consider --threads 1", flush=True)
    elif busy:
        print(f"[warn] load average {load_before[0]:.2f} on {os.cpu_count()} CPUs: the machine is busy, timings "
              f"include CPU contention", flush=True)

    # 1. convert
    paths = {}
    for label, d in (("dense", args.dense), ("moe", args.moe)):
        paths[label], _ = gguf_for(label, d, args)

    # 2. measure
    benches = [Bench(label, paths[label], args, llama_cpp) for label in ("dense", "moe")]
    rng = np.random.default_rng(args.seed)

    def ids_for(n_vocab: int) -> tuple[list[int], list[int]]:
        # ids >= 1 (0 is BOS/EOS/PAD in our tokenizer); the same ids for both models
        return (rng.integers(1, n_vocab, args.prompt).tolist(), rng.integers(1, n_vocab, args.new_tokens).tolist())

    def run_all(group: list[Bench], prompt_ids, gen_ids) -> None:
        for b in group:
            b.measure(prompt_ids, gen_ids)  # warm-up
        for r in range(args.runs):
            for b in group:
                p, d = b.measure(prompt_ids, gen_ids)
                b.prefill.append(p)
                b.decode.append(d)
                print(f"[run {r + 1}/{args.runs}] {b.label}: prefill {args.prompt / p:9.1f} tok/s   "
                      f"decode {args.new_tokens / d:8.1f} tok/s", flush=True)

    if args.sequential:
        prompt_ids = gen_ids = None
        for b in benches:
            b.load()
            if prompt_ids is None:
                prompt_ids, gen_ids = ids_for(b.meta["n_vocab"])
            run_all([b], prompt_ids, gen_ids)
            b.unload()
    else:
        for b in benches:
            b.load()
        prompt_ids, gen_ids = ids_for(min(b.meta["n_vocab"] for b in benches))
        run_all(benches, prompt_ids, gen_ids)
        for b in benches:
            b.unload()
    if benches[0].meta["n_vocab"] != benches[1].meta["n_vocab"]:
        print(f"[warn] n_vocab differs: dense {benches[0].meta['n_vocab']} vs moe {benches[1].meta['n_vocab']}")

    # 3. report
    rows = [b.summary(args) for b in benches]
    dense, moe = rows
    ratios = {"prefill": moe["prefill_tok_s"] / dense["prefill_tok_s"],
              "decode": moe["decode_tok_s"] / dense["decode_tok_s"]}
    versions = {
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_commit": conv.get("llama_cpp_commit_git") or conv.get("llama_cpp_commit_changelog"),
        "converter_sha256": conv.get("converter_sha256"),
        "system_info": sysinfo, "python": sys.version.split()[0], "numpy": np.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpu_count": os.cpu_count(),
        "loadavg_1m_before": round(load_before[0], 2), "loadavg_1m_after": round(os.getloadavg()[0], 2),
    }
    settings = {"outtype": args.outtype, "threads": args.threads, "threads_batch": args.threads,
                "batch": 1, "prompt": args.prompt, "new_tokens": args.new_tokens, "runs": args.runs,
                "warmup": 1, "n_ctx": args.prompt + args.new_tokens + 16, "n_batch": args.prompt,
                "kv_cache": "f16 (llama.cpp default)", "interleaved": not args.sequential, "seed": args.seed}

    print()
    print(f"llama.cpp CPU speed, batch 1, prompt {args.prompt}, {args.new_tokens} new tokens, "
          f"median of {args.runs} runs (+1 warm-up)")
    print()
    print("| model | GGUF size MB | prefill tok/s | decode tok/s |")
    print("|---|---:|---:|---:|")
    for r in rows:
        if r["expert_count"]:
            ffn = r["expert_feed_forward_length"] or r["feed_forward_length"]  # llama arch: per-expert size
            name = f"{r['model']} ({r['arch']}, {r['expert_count']} experts x ffn {ffn}, top-{r['expert_used_count']})"
        else:
            name = f"{r['model']} ({r['arch']}, ffn {r['feed_forward_length']})"
        print(f"| {name} | {r['gguf_size_mb']:.2f} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} |")
    print()
    print(f"MoE/dense: prefill {ratios['prefill']:.3f}x, decode {ratios['decode']:.3f}x")
    print(f"llama_cpp {llama_cpp.__version__} (llama.cpp {versions['llama_cpp_commit']}), "
          f"threads {args.threads} (batch threads {args.threads}), outtype {args.outtype}, "
          f"kv cache f16, n_batch {args.prompt}, {versions['machine']} x{os.cpu_count()}, "
          f"load avg (1 min) before/after {versions['loadavg_1m_before']}/{versions['loadavg_1m_after']}")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "moe_over_dense": ratios, "settings": settings,
                                         "versions": versions,
                                         "hf_dirs": {"dense": str(args.dense), "moe": str(args.moe)}},
                                        indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
