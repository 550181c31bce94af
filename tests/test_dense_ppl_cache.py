"""The dense perplexity is computed once per checkpoint, text and protocol; a changed checkpoint misses the cache."""

from __future__ import annotations

import os

import torch

import dotmoe.dense_ppl_cache as cache
from dotmoe.architecture import load_causal_lm
from dotmoe.perplexity import perplexity


def test_second_call_reads_the_cache_and_a_changed_checkpoint_misses_it(tiny_llama_dir, monkeypatch):
    model, _ = load_causal_lm(tiny_llama_dir)
    ids = torch.randint(0, 300, (300,), generator=torch.Generator().manual_seed(0))
    calls = []
    monkeypatch.setattr(cache, "perplexity", lambda *a, **k: calls.append(1) or perplexity(*a, **k))
    first = cache.dense_perplexity(model, tiny_llama_dir, ids, 64, 32)
    assert first == perplexity(model, ids, 64, 32) and len(calls) == 1
    assert cache.dense_perplexity(model, tiny_llama_dir, ids, 64, 32) == first and len(calls) == 1
    cache.dense_perplexity(model, tiny_llama_dir, ids[:-1], 64, 32)  # other tokens
    cache.dense_perplexity(model, tiny_llama_dir, ids, 64, 16)  # another stride
    assert len(calls) == 3
    weights = tiny_llama_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the checkpoint was rewritten
    try:
        cache.dense_perplexity(model, tiny_llama_dir, ids, 64, 32)
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert len(calls) == 4
    cache.cache_file().write_text("{not json")  # a damaged cache is recomputed, not an error
    assert cache.dense_perplexity(model, tiny_llama_dir, ids, 64, 32) == first and len(calls) == 5
    assert cache.dense_perplexity(model, tiny_llama_dir, ids, 64, 32, use_cache=False) == first and len(calls) == 6
