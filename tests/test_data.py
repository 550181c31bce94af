"""Local data loading through `datasets` (text, JSONL, parquet) and packing."""

import json

import pytest
import torch

from dotmoe.data import load_texts, pack_sequences
from dotmoe.errors import DotMoeError


def test_text_jsonl_parquet_give_same_documents(tmp_path):
    docs = ["first document about lists", "second one, about dicts"]
    (tmp_path / "a.txt").write_text(docs[0])
    (tmp_path / "b.txt").write_text(docs[1])
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    import datasets

    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "d.parquet"))
    assert sorted(load_texts([tmp_path / "a.txt", tmp_path / "b.txt"])) == sorted(docs)
    assert load_texts([tmp_path / "d.jsonl"]) == docs
    assert load_texts([tmp_path / "d.parquet"]) == docs


def test_bad_data_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "x.csv").write_text("a,b")
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DotMoeError, match="contain no text"):
        load_texts([tmp_path / "empty.txt"])
    with pytest.raises(DotMoeError, match="unsupported data file"):
        load_texts([tmp_path / "x.csv"])
    with pytest.raises(DotMoeError, match="no 'text' column"):
        load_texts([tmp_path / "d.jsonl"])
    with pytest.raises(DotMoeError, match="data too short"):
        pack_sequences(torch.arange(10), 32)
    assert pack_sequences(torch.arange(70), 32).shape == (2, 32)
