"""The bundled reference model loads offline with stock transformers and is far better than a unigram model."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from dotmoe.data import tokenize_stream
from dotmoe.paths import reference_data_file, reference_model_dir
from dotmoe.perplexity import perplexity
from dotmoe_dev.reference import unigram_perplexity


def test_reference_model_loads_and_beats_unigram(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(reference_model_dir(), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(reference_model_dir())
    assert isinstance(model, LlamaForCausalLM)
    assert 9e6 < sum(p.numel() for p in model.parameters()) < 2e7
    ids = tokenize_stream(tok, [reference_data_file("test").read_text()])[:4096]
    ppl = perplexity(model, ids, max_len=256, stride=128)
    unigram = unigram_perplexity(tok, [reference_data_file("train_sample").read_text()], ids)
    assert ppl < 0.2 * unigram, (ppl, unigram)


def test_corpus_split_puts_each_node_in_exactly_one_split(tmp_path):
    """The protocol: nodes of the info file are split whole, deterministically, index nodes dropped."""
    from dotmoe_dev.corpus import read_info_nodes, split_corpus, split_of

    names = [f"Section {i}" for i in range(400)]
    body = "".join(f"\x1f\nFile: x.info,  Node: {n},  Next: y\n\ntext of {n}\n" for n in names)
    (tmp_path / "x.info").write_text("preamble\n" + body + "\x1f\nFile: x.info,  Node: Index\n\nindex\n")
    nodes = read_info_nodes(tmp_path / "x.info")
    assert [n for n, _ in nodes] == names
    splits = split_corpus(nodes)
    assert sorted(sum(splits.values(), [])) == sorted(f"text of {n}" for n in names)
    assert 0 < len(splits["validation"]) < 20 and 0 < len(splits["test"]) < 20
    assert [split_of(n) for n in names] == [split_of(n) for n in names]


def test_bundled_splits_are_distinct_text():
    val, test = reference_data_file("validation").read_text(), reference_data_file("test").read_text()
    train = reference_data_file("train_sample").read_text()
    assert val[:2000] not in test and val[:2000] not in train and test[:2000] not in train
