"""The dense model's perplexity, computed once per (model weights, evaluation tokens, protocol) and remembered.

Every conversion reports its perplexity against the dense model's on the same tokens. That number depends only on
the dense checkpoint, the evaluation ids, the window protocol and the compute dtype, yet each run recomputed it:
at the default 32,768 evaluation tokens it is a full forward over 65,536 window tokens, LM head included (on
SmolLM2, 2 CPU cores: about 3 minutes, a sixth of a training-free conversion). The cache is a JSON file,
`$DOTMOE_PPL_CACHE`, else `<dotmoe cache>/dense_ppl.json`; its key holds the weight files' paths, sizes and
modification times, the config and the ids' sha256 (and dtype, versions and thread count), so a changed
checkpoint or text misses it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from dotmoe.perplexity import perplexity
from dotmoe.run_dir import read_json_cache, write_json_cache


def cache_file() -> Path:
    """`$DOTMOE_PPL_CACHE`, else `dense_ppl.json` in the dotmoe cache directory."""
    from dotmoe.gguf_input import cache_root

    return Path(os.environ.get("DOTMOE_PPL_CACHE") or cache_root() / "dense_ppl.json")


def _key(model_dir: Path, ids: torch.Tensor, max_len: int, stride: int, dtype: torch.dtype) -> str:
    import transformers

    from dotmoe.guards import model_weight_files

    files = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in model_weight_files(model_dir)]
    config = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()
    tokens = hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()
    # the thread count too: it changes the kernels' summation order, and a cached value must be the one a fresh
    # computation here would give, bit for bit
    record = [files, config, tokens, max_len, stride, str(dtype), torch.__version__, transformers.__version__,
              torch.get_num_threads()]
    return hashlib.sha256(json.dumps(record).encode()).hexdigest()


def _read() -> dict:
    return read_json_cache(cache_file())


def dense_perplexity(model, model_dir: str | Path, ids: torch.Tensor, max_len: int, stride: int,
                     use_cache: bool = True, progress: bool = False) -> float:
    """`perplexity(model, ids, max_len, stride)` of the dense model loaded from `model_dir` (the caller runs it in
    dense mode), from the cache when this checkpoint, these ids and this protocol were scored before. `use_cache`
    False: always computed (e.g. several processes, which must all run the forward together)."""
    if not use_cache:
        return perplexity(model, ids, max_len, stride, progress=progress)
    key = _key(Path(model_dir), ids, max_len, stride, next(model.parameters()).dtype)
    hit = _read().get(key)
    if isinstance(hit, float):
        return hit
    ppl = perplexity(model, ids, max_len, stride, progress=progress)
    write_json_cache(cache_file(), {**_read(), key: ppl})
    return ppl
