"""GGUF files as `--model`: dequantized once into a cached HF directory that every command then uses."""

import json
import os

import pytest
import torch
from gguf_writer import write_llama_gguf

from dotmoe.cli import main
from dotmoe.errors import DotMoeError
from dotmoe.gguf_input import SOURCE_FILE, resolve_model, sha256_file
from dotmoe.paths import reference_data_file


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DOTMOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from conftest import save_tiny_llama

    root = tmp_path_factory.mktemp("gguf")
    dense = save_tiny_llama(root / "dense", seed=3)
    return dense, write_llama_gguf(dense, root / "tiny-llama.gguf")


def test_gguf_dequantizes_to_the_same_model_and_tokenizer_once(tiny_gguf, cache, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dense, gguf = tiny_gguf
    out = resolve_model(gguf)
    assert out.parent == cache / "gguf" and (out / "model.safetensors").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((out / SOURCE_FILE).read_text())["sha256"] == sha256_file(gguf)

    text = reference_data_file("validation").read_text()[:5000]
    ref_tok, got_tok = AutoTokenizer.from_pretrained(dense), AutoTokenizer.from_pretrained(out)
    assert len(got_tok) == len(ref_tok)  # no phantom <|endoftext|> past the vocabulary
    assert got_tok(text).input_ids == ref_tok(text).input_ids
    ids = torch.tensor([ref_tok(text).input_ids[:100]])
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(dense).eval()(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
    assert torch.equal(expected, got)  # F32 GGUF: bit-exact, q/k permutation undone

    import dotmoe.gguf_input as gi

    monkeypatch.setattr(gi, "_write_dequantized", lambda *a: pytest.fail("dequantized twice"))
    assert resolve_model(gguf) == out
    os.utime(gguf, ns=(1, 1))  # a changed file (mtime) is a new cache entry
    with pytest.raises(BaseException, match="dequantized twice"):
        resolve_model(gguf)


def test_convert_eval_and_layerwise_accept_a_gguf(tiny_gguf, tiny_text, cache, tmp_path, capsys):
    _, gguf = tiny_gguf
    common = ["--data", str(tiny_text), "--eval-data", str(tiny_text), "--experts", "4", "--top-k", "2",
              "--seq-len", "32", "--batch-size", "4"]
    assert main(["convert", "--model", str(gguf), "--out", str(tmp_path / "conv"), "--tokens", "256",
                 *common]) == 0
    meta = json.loads((tmp_path / "conv" / "dotmoe_meta.json").read_text())
    assert meta["base_model"] == str(resolve_model(gguf).resolve())  # the export streams from the cached dir
    assert meta["export"]["parity"]["max_abs_logit_diff"] < 1e-4
    assert main(["convert", "--model", str(gguf), "--out", str(tmp_path / "lw"), "--mode", "layerwise",
                 "--layer-steps", "2", *common]) == 0
    assert (tmp_path / "lw" / "model" / "config.json").is_file()
    capsys.readouterr()
    dense, _ = tiny_gguf
    reports = []
    for parent in (gguf, dense):  # the GGUF as the dense reference scores as its source checkpoint does
        assert main(["eval", "--model", str(tmp_path / "conv" / "model"), "--dense", str(parent), "--data",
                     str(tiny_text), "--tokens", "512", "--recon-tokens", "256"]) == 0
        reports.append(json.loads((tmp_path / "conv" / "model" / "eval.json").read_text()))
    assert reports[0]["dense_ppl"] == pytest.approx(reports[1]["dense_ppl"], rel=1e-4)
    assert reports[0]["recon_error"] == pytest.approx(reports[1]["recon_error"], rel=1e-3, abs=1e-6)
    assert len(reports[0]["recon_error"]) == 2
    assert main(["bench", "speed", "--dense", str(gguf), "--moe", str(tmp_path / "conv" / "model"), "--batch",
                 "1", "--prompt", "8", "--new-tokens", "2", "--runs", "1", "--dtype", "float32"]) == 0
    assert "decode x" in capsys.readouterr().out


def _without_package(monkeypatch, name):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, **k: None if n == name else real(n, *a, **k))


def test_optional_packages_missing_are_one_line_or_skipped(tiny_gguf, tiny_text, cache, tmp_path, capsys,
                                                           monkeypatch):
    """gguf and matplotlib are extras: a .gguf model without gguf is one line naming the extra (nothing written);
    eval without matplotlib writes its report and says the plots need it."""
    from conftest import cli_error

    dense, gguf = tiny_gguf
    _without_package(monkeypatch, "gguf")
    line = cli_error(["sample-data", "--model", str(gguf), "--out", str(tmp_path / "s.txt"), "--tokens", "8"], capsys)
    assert "needs the optional package 'gguf'" in line and "dotmoe[gguf]" in line
    assert not (tmp_path / "s.txt").exists() and not (cache / "gguf").exists()
    monkeypatch.undo()
    _without_package(monkeypatch, "matplotlib")
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(dense), "--data", str(tiny_text), "--tokens", "256", "--out", str(out)]) == 0
    assert "dotmoe[plots]" in capsys.readouterr().out and json.loads(out.read_text())["ppl"] > 1
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("content, message", [
    (None, "GGUF file not found"),
    (b"not a gguf file at all", "is not a GGUF file"),
    (b"GGUF\x03\x00\x00\x00" + b"\xff" * 64, "cannot load"),  # right magic, corrupt header
])
def test_bad_gguf_is_one_line_and_writes_nothing(content, message, cache, tmp_path, capsys):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DotMoeError, match=message):
        resolve_model(path)
    code = main(["convert", "--model", str(path), "--out", str(tmp_path / "o"), "--tokens", "0"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert not [p for p in cache.glob("gguf/*") if p.is_dir()]  # no (partial) dequantized directory
