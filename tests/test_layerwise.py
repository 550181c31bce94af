"""Layer-wise low-memory mode: one layer at a time from safetensors, output-aware objective, a normal export."""

import torch

from dotmoe.config import ConvertConfig
from dotmoe.sparse_model import load_sparse_model
from dotmoe.convert import convert


def _cfg(model, data, out, **kw):
    base = dict(shared_fraction=0.0,  # these tests exercise the plain MoE
                model=str(model), data=[str(data)], out=str(out), experts=4, top_k=2, mode="layerwise",
                layer_steps=40, seq_len=32, batch_size=4, calib_tokens=1024, seed=0, init_affinity="random")
    base.update(kw)
    return ConvertConfig(**base)


def test_layerwise_lowers_each_layers_error_and_exports_exactly(tiny_llama_dir, tiny_text, tmp_path):
    from transformers import AutoModelForCausalLM

    free = convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "free", tokens=0), progress=False).summary
    trained = convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "lw"), progress=False)
    before = [s["final_error"] for s in free["layer_errors"]]
    after = [s["final_error"] for s in trained.summary["layer_errors"]]
    assert all(a < b for a, b in zip(after, before)), (before, after)
    for part in trained.partition:
        assert torch.bincount(part, minlength=4).tolist() == [16] * 4
    reference, _, _ = load_sparse_model(tmp_path / "lw")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "lw" / "model", dtype=torch.float32).eval()
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        assert (reference(input_ids=ids).logits - exported(input_ids=ids).logits).abs().max() < 1e-4


def test_layerwise_per_layer_inputs_are_the_dense_models(tiny_llama_dir, tiny_text, tmp_path, layer_inputs_seen):
    """The streamed layer-by-layer forward sees exactly the FFN inputs of the full dense model."""
    from transformers import AutoModelForCausalLM

    from dotmoe.architecture import find_gated_mlps

    seen = layer_inputs_seen
    convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "lw", tokens=0, calib_tokens=64, export_format="none"),
            progress=False)
    from dotmoe.data import load_texts, pack_sequences, tokenize_stream
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    seqs = pack_sequences(tokenize_stream(tok, load_texts([str(tiny_text)])), 32)
    calib = seqs[torch.randperm(len(seqs), generator=torch.Generator().manual_seed(1))][:2]
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    store = []
    hooks = [m.register_forward_hook(lambda mod, a, o: store.append((a[0].reshape(-1, a[0].shape[-1]),
                                                                     o.reshape(-1, o.shape[-1]))))
             for _, m in find_gated_mlps(dense)]
    with torch.no_grad():
        dense(input_ids=calib)
    for h in hooks:
        h.remove()
    assert len(seen) == len(store) == 2
    for (x, y), (x_ref, y_ref) in zip(seen, store):
        assert torch.allclose(x, x_ref, atol=1e-5) and torch.allclose(y, y_ref, atol=1e-5)


def test_global_kl_phase_starts_from_the_layerwise_result_and_improves_it(tiny_llama_dir, tiny_text, tmp_path):
    import pytest

    from dotmoe.artifacts import load_conversion
    from dotmoe.errors import DotMoeError

    common = dict(layer_steps=10, eval_tokens=512, export_format="none", eval_data=[str(tiny_text)])
    glob = convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "g", global_tokens=2560, **common), progress=False)
    layerwise = load_conversion(tmp_path / "g" / "layerwise")
    assert layerwise.meta["mode"] == "layerwise" and glob.summary["steps"] == 20
    assert glob.summary["config"]["init_from"] == str(tmp_path / "g" / "layerwise")
    # the same start, not trained (tokens=0): exactly the layer-wise partition and routers, and its perplexity
    start = convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "s", mode="joint", tokens=0,
                         init_from=str(tmp_path / "g" / "layerwise"), **common), progress=False)
    started = load_conversion(tmp_path / "s")
    assert torch.equal(started.partition, layerwise.partition)
    assert all(torch.equal(a, b) for a, b in zip(started.routers, layerwise.routers))
    # the tiny random model's FFNs barely move its output (KL ~1e-5 at the start), so the phase is checked on what
    # it optimizes: its training loss falls, and held-out perplexity does not get worse
    import json

    losses = [json.loads(line)["loss"] for line in (tmp_path / "g" / "train_log.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    assert glob.summary["val_ppl"] < start.summary["val_ppl"] * 1.001, (glob.summary["val_ppl"], start.summary["val_ppl"])
    with pytest.raises(DotMoeError, match="does not match this conversion: experts 4 vs 8"):
        convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "bad", mode="joint", experts=8, tokens=0,
                     init_from=str(tmp_path / "g" / "layerwise"), **common), progress=False)


def test_return_freed_memory_gives_heap_pages_back_to_the_os():
    """The fix for layer-wise RSS growing per layer: freed tensors stay resident under glibc until malloc_trim.
    Run in a fresh interpreter: the heap state earlier tests leave behind would decide the numbers otherwise."""
    import subprocess
    import sys

    import pytest

    from dotmoe.layerwise import _libc

    if not sys.platform.startswith("linux") or not hasattr(_libc(), "malloc_trim"):
        pytest.skip("glibc only")
    script = """
import os, torch
from dotmoe.layerwise import return_freed_memory
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
before = rss()
chunks = [torch.ones(16 * 1024) for _ in range(4000)]  # 64 KB each (heap, under the mmap threshold): 250 MB
pin = torch.ones(16)  # allocated after them, so the heap top cannot shrink by itself on free
del chunks
freed = rss()
return_freed_memory()
print(before, freed, rss())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    before, freed, trimmed = map(float, out.split())
    assert freed - before > 200, (before, freed, trimmed)  # glibc kept the freed pages resident
    assert freed - trimmed > 200, (before, freed, trimmed)  # and malloc_trim gave them back


def test_layerwise_crash_then_resume_redoes_only_the_unfinished_layer(tiny_llama_dir, tiny_text, tmp_path,
                                                                      monkeypatch):
    import pytest

    import dotmoe.layerwise as layerwise
    from dotmoe.artifacts import load_conversion
    from dotmoe.errors import DotMoeError

    common = dict(layer_steps=10, export_format="none")
    convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "full", **common), progress=False)
    full = load_conversion(tmp_path / "full")

    train_layer, calls = layerwise.train_layer, []

    def crash_on_second_layer(*a, **k):
        calls.append(a[-1])  # the layer's seed
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies while layer 1 trains
        return train_layer(*a, **k)

    out = tmp_path / "crashed"
    monkeypatch.setattr(layerwise, "train_layer", crash_on_second_layer)
    with pytest.raises(KeyboardInterrupt):
        convert(_cfg(tiny_llama_dir, tiny_text, out, **common), progress=False)
    assert (out / layerwise.LAYERWISE_CHECKPOINT).is_file() and not (out / "dotmoe_meta.json").exists()

    with pytest.raises(DotMoeError, match=r"written with other settings \(layer_steps 10 -> 11\)"):
        convert(_cfg(tiny_llama_dir, tiny_text, out, resume=True, layer_steps=11, export_format="none"),
                progress=False)
    calls.clear()
    monkeypatch.setattr(layerwise, "train_layer", lambda *a, **k: calls.append(a[-1]) or train_layer(*a, **k))
    convert(_cfg(tiny_llama_dir, tiny_text, out, resume=True, **common), progress=False)
    assert calls == [1]  # layer 0 came from the checkpoint; only layer 1 was trained again
    resumed = load_conversion(out)
    assert torch.equal(resumed.partition, full.partition)
    assert all(torch.equal(a, b) for a, b in zip(resumed.routers, full.routers))
    assert resumed.meta["layer_errors"] == full.meta["layer_errors"]
    assert not (out / layerwise.LAYERWISE_CHECKPOINT).exists()


def test_default_trains_in_both_modes_and_tokens_0_is_training_free():
    """No --tokens: the joint mode trains DEFAULT_TRAIN_TOKENS (262,144 = 128 steps of 8 x 256), the layer-wise
    mode trains --layer-steps per layer; --tokens 0 makes both training-free."""
    assert ConvertConfig().steps == 128
    assert ConvertConfig(tokens=0).steps == 0
    assert ConvertConfig(tokens=4096, batch_size=4, seq_len=256).steps == 4
    assert ConvertConfig(mode="layerwise").trains_layers
    assert not ConvertConfig(mode="layerwise", tokens=0).trains_layers
