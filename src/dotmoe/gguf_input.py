"""GGUF files as model inputs: dequantized once through transformers into a cached HF model directory.

Every command that takes a dense model (`convert`, `eval`, `bench speed`, the layer-wise mode, and so `export`,
which reads the conversion's base model) accepts a `.gguf` file; `resolve_model` turns it into a plain HF
directory (config.json without `quantization_config`, safetensors, tokenizer), so the streamed safetensors
readers work unchanged. The cache lives under `cache_root()/gguf/`, keyed by the file's resolved path, size and
mtime; the directory is written to a temporary name and renamed, under a file lock, so concurrent processes
(e.g. `torchrun`) dequantize once and an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from dotmoe.atomic import staged_directory
from dotmoe.errors import DotMoeError, require_extra

SOURCE_FILE = "dotmoe_source.json"  # provenance of a dequantized directory
GGUF_MAGIC = b"GGUF"


def cache_root() -> Path:
    """`$DOTMOE_CACHE`, else `~/.cache/dotmoe`."""
    return Path(os.environ.get("DOTMOE_CACHE") or Path.home() / ".cache" / "dotmoe").expanduser()


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def check_gguf_file(path: Path) -> Path:
    """An existing file starting with the GGUF magic, or a one-line error."""
    if not path.is_file():
        raise DotMoeError(f"GGUF file not found: {path}")
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise DotMoeError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    return path


def gguf_cache_dir(path: Path, cache: Path | None = None) -> Path:
    """Where the dequantized copy of `path` lives: keyed by its resolved path, size and mtime."""
    path = path.resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return (cache or cache_root()) / "gguf" / f"{path.stem}-{key}"


def resolve_model(path: str | Path, cache: Path | None = None) -> Path:
    """A model path as an HF directory: a `.gguf` file is dequantized (once, cached); anything else is unchanged."""
    if not is_gguf(path):
        return Path(path)
    gguf = check_gguf_file(Path(path).expanduser())
    return dequantize_gguf(gguf, gguf_cache_dir(gguf, cache))


def dequantize_gguf(gguf: Path, out: Path, dtype: torch.dtype = torch.float32, sha256: str | None = None) -> Path:
    """Write `gguf` dequantized as an HF model directory `out` (nothing to do if it exists); return `out`.

    transformers dequantizes on load; the model is then rebuilt from its config without the GGUF
    `quantization_config` (which `save_pretrained` refuses) and given the loaded weights in `dtype`.
    `sha256`, if given, is checked first.
    """
    from filelock import FileLock

    if (out / "config.json").is_file():
        return out
    require_extra("gguf", f"reading {gguf.name}", "gguf")  # transformers' GGUF loader uses it
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").is_file():  # another process finished it while we waited
            return out
        digest = sha256_file(gguf)
        if sha256 is not None and digest != sha256:
            raise DotMoeError(f"{gguf} has sha256 {digest}, expected {sha256} (corrupt or different download)")
        with staged_directory(out) as tmp:
            _write_dequantized(gguf, tmp, dtype)
            (tmp / SOURCE_FILE).write_text(json.dumps(
                {"gguf": str(gguf.resolve()), "sha256": digest, "bytes": gguf.stat().st_size,
                 "dtype": str(dtype).removeprefix("torch.")}, indent=2))
    return out


def _write_dequantized(gguf: Path, tmp: Path, dtype: torch.dtype) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # gguf / transformers raise many types for unsupported or corrupt files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DotMoeError(f"cannot load {gguf} through transformers' GGUF reader (corrupt or unsupported): {first}") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in loaded.state_dict().items()}, assign=True)
    model.tie_weights()
    if loaded.generation_config is not None:
        model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _drop_tokens_past_vocab(tmp, config.vocab_size)


def _drop_tokens_past_vocab(model_dir: Path, vocab_size: int) -> None:
    """Remove added tokens whose id the model cannot embed.

    transformers builds a GGUF byte-level BPE vocabulary with GPT-2's tokenizer class, which adds its default
    `<|endoftext|>` when the file names no unknown token (Llama-3-style vocabularies): one id past the model's
    vocabulary, which `load_causal_lm` would rightly refuse. No text maps to it unless it is typed literally.
    """
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    kept = [t for t in data.get("added_tokens", []) if t["id"] < vocab_size]
    if len(kept) != len(data.get("added_tokens", [])):
        data["added_tokens"] = kept
        path.write_text(json.dumps(data, ensure_ascii=False, indent=2))
