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


def test_a_text_file_streams_as_the_pieces_of_its_whole_text(tmp_path):
    """A .txt file is read from disk a piece at a time, yet gives exactly the document datasets' text builder reads
    (universal newlines, a BOM kept) and the pieces `_pieces` cuts from it, at every piece size."""
    import datasets

    from dotmoe.data import TextFiles, _file_pieces, _pieces

    text = "\ufeffone two\r\nthree\rfour  five\n\n" * 50 + "x" * 40
    (tmp_path / "a.txt").write_bytes(text.encode())
    whole = datasets.load_dataset("text", data_files=[str(tmp_path / "a.txt")], split="train", sample_by="document",
                                  cache_dir=str(tmp_path / "cache"))["text"][0]
    assert list(TextFiles([tmp_path / "a.txt"]).documents()) == [whole]
    for size in (1, 3, 7, 40, 1000):
        pieces = list(_file_pieces(tmp_path / "a.txt", size))
        assert [p for p, _ in pieces] == list(_pieces(whole, size))
        assert [e for _, e in pieces] == [False] * (len(pieces) - 1) + [True]


def test_jsonl_rows_stream_and_bad_rows_are_named(tmp_path):
    from dotmoe.data import TextFiles

    rows = ["a row", "", "another row", 7]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    with pytest.raises(DotMoeError, match=r"d.jsonl: the 'text' column must hold strings, row 3 holds int"):
        TextFiles([tmp_path / "d.jsonl"])
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows[:3]) + "{not json\n")
    with pytest.raises(DotMoeError, match="could not read data file .*d.jsonl"):
        TextFiles([tmp_path / "d.jsonl"])


def test_a_run_reads_at_most_four_times_its_tokens(tmp_path, monkeypatch, capsys):
    """Memory and start-up time follow the run, not the corpus: a run reads the first `data_token_cap` tokens of
    its data (4x its training + calibration tokens, at least MIN_DATA_TOKENS) and says so in one line; a corpus
    within the cap is read whole, as before."""
    from transformers import AutoTokenizer

    import dotmoe.data as data
    from dotmoe.config import ConvertConfig
    from dotmoe.paths import reference_data_file, reference_model_dir

    tok = AutoTokenizer.from_pretrained(reference_model_dir())
    texts = data.TextFiles([reference_data_file("validation")])
    every = data.tokenize_stream(tok, texts)
    cfg = ConvertConfig(tokens=2 * 8 * 32, seq_len=32, calib_tokens=64)
    assert data.data_token_cap(cfg) == data.MIN_DATA_TOKENS
    whole = data.training_sequences(tok, texts, cfg)
    assert torch.equal(whole.flatten(), every[: len(whole) * 32]) and len(every) - whole.numel() < 32
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(data, "MIN_DATA_TOKENS", 0)
    assert data.data_token_cap(cfg) == 4 * (2 * 8 * 32 + 64)
    capped = data.training_sequences(tok, texts, cfg)
    assert torch.equal(capped.flatten(), every[: 4 * (2 * 8 * 32 + 64)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reading the first 2,304 tokens" in err[0] and "validation.txt" in err[0]


def test_reading_a_large_text_file_holds_a_piece_not_the_file(tmp_path):
    """Peak memory of streaming a 64 MB single-line text file (in a subprocess: VmHWM, its own peak RSS) is within
    a few pieces of streaming a 1 MB one."""
    import subprocess
    import sys

    code = ("import re, sys\nfrom dotmoe.data import TextFiles\nn = sum(len(p) for p, _ in TextFiles([sys.argv[1]])"
            ".units())\nprint(n, re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    peaks = []
    for mb in (1, 64):
        f = tmp_path / f"{mb}.txt"
        with f.open("w") as fh:
            for _ in range(mb):
                fh.write("word " * (1 << 18))  # 1.25 MB a write: one line, no newline
        out = subprocess.run([sys.executable, "-c", code, str(f)], capture_output=True, text=True, check=True)
        chars, peak_kb = map(int, out.stdout.split())
        assert chars == 5 * (mb << 18)
        peaks.append(peak_kb)
    assert peaks[1] - peaks[0] < 24 * 1024, peaks  # KiB: 80 MB of text held at once would be > 80 MB
