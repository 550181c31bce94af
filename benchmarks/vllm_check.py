"""Serve an exported MoE checkpoint with vLLM (offline `LLM.generate`) and compare greedy outputs with transformers.

    pip install vllm            # on a CUDA machine; not part of dotmoe's dependencies
    python benchmarks/vllm_check.py --model out/dotmoe/model [--new-tokens 32] [--dtype bfloat16]

Prints, per prompt, how many leading greedy tokens vLLM and transformers agree on, and exits 1 if vLLM cannot
load the model. Stock formats only (MixtralForCausalLM / Qwen3MoeForCausalLM / Qwen2MoeForCausalLM): vLLM does
not know the custom `DotMoeForCausalLM` class written for mask gating with k > 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROMPTS = ["The Python tutorial explains", "A list comprehension is", "def fibonacci(n):",
           "The standard library module os"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        print("vllm is not installed (pip install vllm on a CUDA machine)", file=sys.stderr)
        return 1
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = json.loads((Path(args.model) / "config.json").read_text())["architectures"][0]
    tok = AutoTokenizer.from_pretrained(args.model)
    llm = LLM(model=args.model, dtype=args.dtype, enforce_eager=True, max_model_len=512, seed=0)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=args.new_tokens))
    vllm_ids = [list(o.outputs[0].token_ids) for o in outs]
    del llm
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).cuda().eval()
    print(f"model {args.model} ({arch}), dtype {args.dtype}, {args.new_tokens} greedy tokens per prompt")
    print("| prompt | matching leading tokens | vLLM text |\n|---|---|---|")
    total = 0
    for prompt, v in zip(PROMPTS, vllm_ids):
        ids = tok(prompt, return_tensors="pt").input_ids.cuda()
        hf = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
        same = next((i for i, (a, b) in enumerate(zip(hf, v)) if a != b), min(len(hf), len(v)))
        total += same
        print(f"| {prompt!r} | {same}/{args.new_tokens} | {tok.decode(v)!r} |")
    print(f"total matching: {total}/{len(PROMPTS) * args.new_tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
