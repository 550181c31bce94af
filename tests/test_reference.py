"""The bundled reference model loads offline with stock transformers and is far better than a unigram model."""

import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from dotmoe.data import tokenize_stream
from dotmoe.paths import reference_data_file, reference_model_dir
from dotmoe.perplexity import perplexity


def test_reference_model_loads_and_beats_unigram(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(reference_model_dir(), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(reference_model_dir())
    assert isinstance(model, LlamaForCausalLM)
    assert 9e6 < sum(p.numel() for p in model.parameters()) < 2e7
    ids = tokenize_stream(tok, [reference_data_file("test").read_text()])[:4096]
    ppl = perplexity(model, ids, max_len=256, stride=128)
    counts = torch.ones(len(tok), dtype=torch.float64)
    counts += torch.bincount(tokenize_stream(tok, [reference_data_file("train_sample").read_text()]),
                             minlength=len(tok)).double()
    unigram = math.exp(-(counts / counts.sum()).log()[ids].mean().item())
    assert ppl < 0.2 * unigram, (ppl, unigram)


def test_data_splits_do_not_overlap():
    val = set(reference_data_file("validation").read_text().split("\n\n"))
    test = set(reference_data_file("test").read_text().split("\n\n"))
    train = set(reference_data_file("train_sample").read_text().split("\n\n"))
    long_paragraphs = lambda s: {p for p in s if len(p) > 200}  # noqa: E731 (short lines repeat across docs)
    assert not long_paragraphs(val) & long_paragraphs(test)
    assert not long_paragraphs(train) & (long_paragraphs(val) | long_paragraphs(test))
