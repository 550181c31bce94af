#!/usr/bin/env python3
"""HF checkpoint -> GGUF (llama.cpp convert_hf_to_gguf.py) -> llama.cpp vs transformers.

  python gguf_roundtrip.py --model HF_DIR [--outtype f32|f16] [--prompt TEXT]
                           [--new-tokens 32] [--converter PATH] [--outfile PATH]

Steps
  (a) convert HF_DIR with llama.cpp's convert_hf_to_gguf.py (subprocess, via convert_pretok.py,
      which runs the converter unmodified and only adds a GPT-2 pre-tokenizer fallback when
      the BPE pre-tokenizer hash is unknown -- see convert_pretok.py);
  (b) load the .gguf with llama_cpp.Llama(logits_all=True, n_threads=2, verbose=False);
  (c) greedy (temp=0, llama.cpp's own greedy sampler) generation of N tokens;
  (d) greedy generation of N tokens with transformers (pure argmax, no EOS stop);
  (e) print both sequences/texts, the matching-prefix length, tokenizer agreement, and the
      max |logit diff| (teacher-forced on the same token sequence) at the first position,
      at the first generated position, and over all positions.

Both models are fed the SAME prompt token ids (the HF tokenizer's), so the model comparison
is independent of tokenizer differences; the tokenizers are compared separately.

Exit codes: 0 ok, 2 conversion failed, 3 GGUF load / eval failed,
            4 (only with --strict) greedy tokens or tokenization differ.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from dotmoe_dev.llamacpp import DEFAULT_CONVERTER, converter_info, run_conversion  # noqa: F401

HERE = Path(__file__).resolve().parent
# llama.cpp's own pre-tokenizer probe string (from convert_hf_to_gguf.py) + a few extras
PROBE_TEXTS = [
    "Hello world",
    " Hello  world\n\n  tabs\tand   spaces ",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "3 33 333 3333 33333 3.3 3..3 3...3 ------======= ''''''```````\"\"\"\"......!!!!!!??????",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ ✅ 🦙🦙 ?我想在apple工作1314151天～ нещо на Български",
    "def f(x):\n    return x ** 2  # comment",
]


def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    import torch
    ids = torch.tensor([prompt_ids])
    out_ids: list[int] = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        past = out.past_key_values
        for _ in range(n):
            nxt = int(out.logits[0, -1].argmax())
            out_ids.append(nxt)
            out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
    return out_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="HF model dir")
    ap.add_argument("--outtype", choices=["f32", "f16"], default="f32")
    ap.add_argument("--prompt", default="The quick brown fox jumps over the lazy dog.")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--converter", type=Path, default=DEFAULT_CONVERTER)
    ap.add_argument("--outfile", type=Path, default=None, help="where to write the .gguf (default: temp dir)")
    ap.add_argument("--tokenizer-pre", default=None, help="force tokenizer.ggml.pre (default: auto)")
    ap.add_argument("--n-threads", type=int, default=2)
    ap.add_argument("--kv-type", choices=["f16", "f32"], default="f16",
                    help="llama.cpp KV-cache dtype (llama.cpp default f16; f32 gives a tighter logit match)")
    ap.add_argument("--strict", action="store_true", help="exit 4 if greedy tokens or tokenization differ")
    args = ap.parse_args()
    args.converter = args.converter.resolve()
    args.model = args.model.resolve()

    import llama_cpp
    import numpy as np
    import torch
    import transformers

    print("== versions ==")
    print(f"llama_cpp (python pkg) {llama_cpp.__version__} at {Path(llama_cpp.__file__).parent}")
    for k, v in converter_info(args.converter).items():
        print(f"{k}: {v}")
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
          f"python {sys.version.split()[0]}")

    tmp = None
    if args.outfile is None:
        tmp = tempfile.TemporaryDirectory(prefix="gguf_rt_")
        outfile = Path(tmp.name) / f"model-{args.outtype}.gguf"
    else:
        outfile = args.outfile.resolve()
        outfile.parent.mkdir(parents=True, exist_ok=True)

    # (a) convert
    print("== (a) convert ==")
    run_conversion(args, outfile)

    # HF side (tokenizer first: its ids are the shared prompt)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.model)
    prompt_ids = tok.encode(args.prompt)
    if not prompt_ids:
        sys.exit("empty prompt after tokenization")

    # (b) load GGUF
    print("== (b) load GGUF ==")
    kv_type = {"f16": llama_cpp.GGML_TYPE_F16, "f32": llama_cpp.GGML_TYPE_F32}[args.kv_type]
    n_ctx = max(256, len(prompt_ids) + args.new_tokens + 16)
    try:
        llm = llama_cpp.Llama(model_path=str(outfile), n_ctx=n_ctx, n_batch=n_ctx, verbose=False,
                              n_threads=args.n_threads, logits_all=True, seed=0,
                              type_k=kv_type, type_v=kv_type)
    except Exception as e:  # noqa: BLE001
        print(f"[load] FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(3)
    md = llm.metadata
    print(f"[load] ok: arch={md.get('general.architecture')} n_vocab={llm.n_vocab()} "
          f"experts={md.get('llama.expert_count')}/{md.get('llama.expert_used_count')} "
          f"tokenizer.ggml.pre={md.get('tokenizer.ggml.pre')!r} add_bos={md.get('tokenizer.ggml.add_bos_token')} "
          f"kv_cache={args.kv_type}")

    # tokenizer agreement (llama.cpp add_special follows the GGUF's add_bos flag)
    tok_mismatch = []
    for t in [args.prompt] + PROBE_TEXTS:
        a = tok.encode(t)
        b = llm.tokenize(t.encode("utf-8"), add_bos=True, special=False)
        if a != b:
            tok_mismatch.append((t, a, b))
    print(f"[tokenizer] HF vs llama.cpp tokenization: {1 + len(PROBE_TEXTS) - len(tok_mismatch)}/"
          f"{1 + len(PROBE_TEXTS)} texts identical")
    for t, a, b in tok_mismatch:
        print(f"  MISMATCH {t[:40]!r}: hf={a[:16]}... llama={b[:16]}...")

    # (c) llama.cpp greedy
    print("== (c) llama.cpp greedy ==")
    try:
        llm.reset()
        ll_ids: list[int] = []
        for t in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                              repeat_penalty=1.0, reset=True):
            ll_ids.append(int(t))
            if len(ll_ids) >= args.new_tokens:
                break
    except Exception as e:  # noqa: BLE001
        print(f"[llama.cpp] generation FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(3)

    # (d) transformers greedy
    print("== (d) transformers greedy ==")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    hf_ids = hf_greedy(model, prompt_ids, args.new_tokens)

    # (e) compare
    print("== (e) compare ==")
    match = 0
    for a, b in zip(hf_ids, ll_ids):
        if a != b:
            break
        match += 1
    print(f"prompt ids ({len(prompt_ids)}): {prompt_ids}")
    print(f"HF    ids: {hf_ids}")
    print(f"llama ids: {ll_ids}")
    print(f"HF    text: {tok.decode(hf_ids)!r}")
    print(f"llama text: {llm.detokenize(ll_ids).decode('utf-8', errors='replace')!r}")
    print(f"matching leading tokens: {match}/{args.new_tokens}")

    # teacher-forced logits on the same sequence (prompt + HF greedy continuation)
    seq = prompt_ids + hf_ids[:-1] if hf_ids else list(prompt_ids)
    llm.reset()
    llm.eval(seq)
    ll_logits = np.array(llm.scores[: len(seq)], dtype=np.float64)
    with torch.no_grad():
        hf_logits = model(input_ids=torch.tensor([seq])).logits[0].double().numpy()
    diff = np.abs(ll_logits - hf_logits)
    p0, pg = 0, len(prompt_ids) - 1
    scale = float(np.abs(hf_logits).max())
    argmax_agree = int((ll_logits.argmax(-1) == hf_logits.argmax(-1)).sum())
    print(f"max|dlogit| position 0: {diff[p0].max():.3e}   first generated position ({pg}): "
          f"{diff[pg].max():.3e}   all {len(seq)} positions: {diff.max():.3e}  "
          f"(max|logit| {scale:.2f}; teacher-forced argmax agree {argmax_agree}/{len(seq)})")

    ok = match == args.new_tokens and not tok_mismatch
    print(f"RESULT: {'MATCH' if ok else 'DIFFER'} (outtype={args.outtype}, gguf={outfile})")
    del llm
    if tmp is not None:
        tmp.cleanup()
    if args.strict and not ok:
        sys.exit(4)


if __name__ == "__main__":
    main()
