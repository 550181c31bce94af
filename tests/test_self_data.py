"""Data-free text: samples from the dense model, written as a .txt file that convert reads."""

from __future__ import annotations

import pytest

from dotmoe.architecture import load_causal_lm
from dotmoe.data import load_texts, tokenize_stream
from dotmoe.errors import DotMoeError
from dotmoe.self_data import sample_texts, write_texts


def test_samples_are_seeded_sized_and_readable(tiny_llama_dir, tmp_path):
    model, tok = load_causal_lm(tiny_llama_dir)
    a = sample_texts(model.eval(), tok, tokens=96, length=32, batch=2, seed=3, progress=False)
    b = sample_texts(model.eval(), tok, tokens=96, length=32, batch=2, seed=3, progress=False)
    c = sample_texts(model.eval(), tok, tokens=96, length=32, batch=2, seed=4, progress=False)
    assert a == b and a != c
    assert len(a) == 3  # 96 tokens in samples of 32 (batches of 2, then 1)
    path = write_texts(a, tmp_path / "self.txt")
    texts = load_texts([path])
    assert len(tokenize_stream(tok, texts)) >= 48  # re-tokenized decoded text: roughly the sampled amount


def test_bad_sampling_arguments_are_refused(tiny_llama_dir):
    model, tok = load_causal_lm(tiny_llama_dir)
    with pytest.raises(DotMoeError, match="top_p"):
        sample_texts(model, tok, tokens=10, top_p=0.0, progress=False)


def test_cli_refuses_to_overwrite(tiny_llama_dir, tmp_path, capsys):
    from conftest import cli_error

    out = tmp_path / "x.txt"
    out.write_text("keep me")
    assert "--overwrite" in cli_error(["sample-data", "--model", str(tiny_llama_dir), "--out", str(out)], capsys)
    assert out.read_text() == "keep me"
