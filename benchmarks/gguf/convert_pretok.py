#!/usr/bin/env python3
"""Run llama.cpp's convert_hf_to_gguf.py UNMODIFIED, with one narrow fallback for BPE
pre-tokenizer detection.

llama.cpp identifies a BPE pre-tokenizer by sha256 of the token ids that the HF tokenizer
produces for a fixed probe string (TextModel.get_vocab_base_pre). The hash depends on the
vocabulary/merges, so any freshly trained tokenizer is "not recognized" even if its
pre-tokenizer is exactly GPT-2's. Upstream's fix is to add the model to
convert_hf_to_gguf_update.py (which downloads it from the HF hub) -- not possible here.

This wrapper only acts when the original function raises NotImplementedError. It then reads
tokenizer.json and maps the pre-tokenizer to a llama.cpp pre-type ONLY when it is
structurally identical to one llama.cpp implements:

  * normalizer null, pre_tokenizer ByteLevel(use_regex=true, add_prefix_space=false)
    (alone or as the only element of a Sequence)  ->  "gpt-2"
    (llama.cpp LLAMA_VOCAB_PRE_TYPE_GPT2 regex  's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+|
     ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)  == HF ByteLevel's GPT-2 regex)

Anything else re-raises. `--tokenizer-pre NAME` forces a name explicitly (use with care).
The result should still be validated by comparing llama.cpp and HF tokenization
(gguf_roundtrip.py does this).

Usage: convert_pretok.py --converter PATH/convert_hf_to_gguf.py [--tokenizer-pre NAME] -- <converter args>
"""
from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path


def infer_pre_from_tokenizer_json(model_dir: Path) -> str | None:
    p = model_dir / "tokenizer.json"
    if not p.is_file():
        return None
    tj = json.loads(p.read_text(encoding="utf-8"))
    if tj.get("normalizer") is not None:
        return None
    pre = tj.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    if (pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False)
            and (tj.get("model") or {}).get("type") == "BPE"):
        return "gpt-2"
    return None


def main() -> None:
    argv = sys.argv[1:]
    converter = None
    forced = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--converter":
            converter = argv[i + 1]; i += 2; continue
        if a == "--tokenizer-pre":
            forced = argv[i + 1]; i += 2; continue
        if a == "--":
            rest.extend(argv[i + 1:]); break
        rest.append(a); i += 1
    if converter is None:
        sys.exit("convert_pretok.py: --converter PATH is required")
    converter_path = Path(converter).resolve()
    conv_dir = converter_path.parent

    # same import setup the converter itself does (vendored gguf-py first)
    sys.path.insert(0, str(conv_dir))
    if "NO_LOCAL_GGUF" not in os.environ:
        sys.path.insert(1, str(conv_dir / "gguf-py"))

    from conversion import base  # the vendored converter package

    orig = base.TextModel.get_vocab_base_pre

    def patched(self, tokenizer):  # type: ignore[no-untyped-def]
        if forced:
            base.logger.warning(f"convert_pretok: forcing tokenizer.ggml.pre = {forced!r}")
            return forced
        try:
            return orig(self, tokenizer)
        except NotImplementedError:
            res = infer_pre_from_tokenizer_json(Path(self.dir_model))
            if res is None:
                raise
            base.logger.warning(
                f"convert_pretok: BPE pre-tokenizer hash unknown; tokenizer.json is "
                f"ByteLevel(use_regex=True) with no normalizer -> tokenizer.ggml.pre = {res!r}")
            return res

    base.TextModel.get_vocab_base_pre = patched

    sys.argv = [str(converter_path)] + rest
    runpy.run_path(str(converter_path), run_name="__main__")


if __name__ == "__main__":
    main()
