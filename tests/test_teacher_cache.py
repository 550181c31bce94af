"""The teacher cache: a run that reuses the frozen teacher's outputs trains bit for bit as one that recomputes them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from dotmoe.teacher_cache import TeacherCache, make_teacher_cache


def test_cache_keeps_rows_within_its_budget_and_hits_only_whole_batches():
    cache = TeacherCache(budget_bytes=3 * 4 * 2 * 2, dtype=torch.bfloat16)  # three [4, 2] bf16 rows
    hidden = torch.randn(4, 4, 2)
    cache.insert(torch.tensor([7, 3, 9, 5]), hidden)
    assert len(cache) == 3 and cache.used_bytes == 48  # the fourth row is over the budget
    got = cache.lookup(torch.tensor([9, 7]))
    assert got is not None and torch.equal(got.last_hidden_state, torch.stack([hidden[2], hidden[0]]).bfloat16())
    assert cache.lookup(torch.tensor([7, 5])) is None  # 5 was not kept: the batch is recomputed
    calls = []

    def forward(ids):
        calls.append(ids)
        return type(got)(last_hidden_state=torch.zeros(len(ids), 4, 2))

    cache.teacher_output(forward, torch.zeros(2, 4), torch.tensor([3, 9]))
    cache.teacher_output(forward, torch.zeros(2, 4), torch.tensor([3, 5]))
    assert len(calls) == 1 and (cache.hits, cache.misses) == (2, 2)


def test_cache_is_made_only_where_a_run_revisits_sequences(monkeypatch):
    import dotmoe.training_memory
    from dotmoe.config import ConvertConfig

    base = dict(model="m", experts=4, top_k=2, seq_len=32, batch_size=4, tokens=10 * 4 * 32)
    cache = make_teacher_cache(ConvertConfig(**base), 30, None)  # 40 sequences seen, 30 distinct
    assert cache is not None and cache.budget_bytes <= 2048 << 20
    monkeypatch.setattr(dotmoe.training_memory, "available_memory", lambda device: 50 << 20)
    assert make_teacher_cache(ConvertConfig(**base), 30, None).budget_bytes == 5 << 20  # a tenth of what is free
    assert make_teacher_cache(ConvertConfig(**base), 40, None) is None  # every sequence once
    assert make_teacher_cache(ConvertConfig(**base, teacher_cache_mb=0), 30, None) is None
    assert make_teacher_cache(ConvertConfig(**base, hidden_weight=1.0), 30, None) is None  # needs every layer


@pytest.mark.parametrize("compiled", [False, True])
def test_a_sequences_teacher_output_does_not_depend_on_its_batch(tiny_llama_dir, compiled):
    """What makes a hit equal a recomputation: the same rows in another batch, at another position, come out bit
    for bit the same (bf16 autocast, as training runs; checked on SmolLM2-135M too, eager and compiled)."""
    from transformers import AutoModelForCausalLM

    from dotmoe.compiled import compile_decoder_layers
    from dotmoe.distill_dense import teacher_copy

    teacher = teacher_copy(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), torch.bfloat16)
    if compiled:
        compile_decoder_layers(teacher)
    ids = torch.randint(0, teacher.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        first = teacher.get_decoder()(input_ids=ids[:4]).last_hidden_state
        moved = teacher.get_decoder()(input_ids=torch.cat([ids[4:6], ids[2:4], ids[6:8]])).last_hidden_state
    assert torch.equal(first[2:4], moved[2:4])


def _run(model: Path, text: Path, out: Path, **settings) -> dict:
    from dotmoe.config import ConvertConfig
    from dotmoe.convert import convert

    cfg = ConvertConfig(model=str(model), data=[str(text)], eval_data=[str(text)], out=str(out), experts=4, top_k=2,
                        tokens=12 * 4 * 32, seq_len=32, batch_size=4, eval_tokens=256, calib_tokens=256, seed=3,
                        export_format="none", **settings)
    convert(cfg, progress=False)
    hashes = {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted(out.rglob("*.safetensors"))}
    log = [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
           for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {"tensors": hashes, "log": log}


@pytest.mark.parametrize("method", ["dotmoe", "prune"])
@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_training_with_the_cache_is_bit_identical_to_training_without(method, mixed_precision, tiny_llama_dir,
                                                                      tmp_path, monkeypatch):
    """12 steps of 4 sequences over a corpus of about 20: the later passes hit the cache, and the trained tensors
    and every logged loss equal those of a run with `teacher_cache_mb: 0`."""
    words = "the tutorial explains lists tuples classes modules functions and small examples of code".split()
    g = torch.Generator().manual_seed(0)
    text = tmp_path / "small.txt"
    text.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (700,), generator=g).tolist()))
    hits = []
    lookup = TeacherCache.lookup

    def spy(self, seq_ids):
        found = lookup(self, seq_ids)
        hits.append(found is not None)
        return found

    monkeypatch.setattr(TeacherCache, "lookup", spy)
    settings = dict(method=method, mixed_precision=mixed_precision, compile=False)
    cached = _run(tiny_llama_dir, text, tmp_path / "cached", **settings)
    assert sum(hits) >= 4, hits  # the later passes came from the cache
    hits.clear()
    recomputed = _run(tiny_llama_dir, text, tmp_path / "recomputed", teacher_cache_mb=0, **settings)
    assert not hits
    assert cached["tensors"] and cached == recomputed
