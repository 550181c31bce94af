"""Faults of long jobs: kill -9 and resume, non-finite steps, unwritable/full disks, and bad input writing nothing."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dotmoe.artifacts import load_conversion
from dotmoe.cli import main
from dotmoe.config import ConvertConfig
from dotmoe.errors import DotMoeError
from dotmoe.train import MoeTrainingModule, convert


def _cfg(model, data, out, **kw):
    base = dict(shared_fraction=0.0,  # these tests exercise the plain MoE
                model=str(model), data=[str(data)], eval_data=[str(data)], out=str(out), experts=4, top_k=2,
                tokens=12 * 4 * 32, seq_len=32, batch_size=4, eval_tokens=256, calib_tokens=256, checkpoint_every=2,
                seed=5, export_format="none")
    base.update(kw)
    return ConvertConfig(**base)


def _records(out):
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def test_kill_9_mid_training_then_resume_equals_uninterrupted(tiny_llama_dir, tiny_text, tmp_path):
    steps = 300
    config = tmp_path / "c.yaml"
    config.write_text(f"experts: 4\ntop_k: 2\ntokens: {steps * 4 * 32}\nseq_len: 32\nbatch_size: 4\nseed: 7\n"
                      "checkpoint_every: 5\neval_tokens: 256\ncalib_tokens: 256\nexport_format: none\n")
    argv = ["convert", "--config", str(config), "--model", str(tiny_llama_dir), "--data", str(tiny_text),
            "--eval-data", str(tiny_text)]
    assert main(argv + ["--out", str(tmp_path / "full")]) == 0
    full = load_conversion(tmp_path / "full")

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "dotmoe.cli", *argv, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        log = out / "train_log.jsonl"
        if (out / "checkpoint.pt").exists() and log.exists() and len(log.read_text().splitlines()) >= 12:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "dotmoe_meta.json").exists()
    assert main(argv + ["--out", str(out), "--resume"]) == 0
    resumed = load_conversion(out)
    assert torch.equal(resumed.partition, full.partition)
    final = [r for r in _records(out) if "loss" in r]
    assert [r["step"] for r in final] == list(range(1, steps + 1))
    assert final[-1]["loss"] == pytest.approx(full.meta["final_terms"]["loss"], rel=1e-6)


def test_non_finite_step_is_reverted_logged_and_skipped(tiny_llama_dir, tiny_text, tmp_path, monkeypatch):
    original = MoeTrainingModule.forward
    calls = {"n": 0}

    def poisoned(self, input_ids):
        calls["n"] += 1
        if calls["n"] == 4:  # a router blows up mid-run
            self.moes[1].router.weight.data.fill_(float("nan"))
        return original(self, input_ids)

    monkeypatch.setattr(MoeTrainingModule, "forward", poisoned)
    res = convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "o"), progress=False)
    records = _records(tmp_path / "o")
    events = [r for r in records if r.get("event") == "non_finite_loss"]
    assert len(events) == 1 and events[0]["step"] == 4 and events[0]["router_layers"] == [1]
    assert "kl" in events[0]["terms"]
    assert [r["step"] for r in records if "loss" in r] == [s for s in range(1, 13) if s != 4]
    assert all(torch.isfinite(w).all() for w in load_conversion(tmp_path / "o").routers)
    assert res.summary["val_ppl"] < 1e6


def test_repeated_non_finite_steps_stop_with_a_clear_error(tiny_llama_dir, tiny_text, tmp_path, monkeypatch):
    original = MoeTrainingModule.forward

    def always_nan(self, input_ids):
        terms = original(self, input_ids)
        terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(MoeTrainingModule, "forward", always_nan)
    with pytest.raises(DotMoeError, match="3 consecutive non-finite steps"):
        convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "o"), progress=False)
    assert len([r for r in _records(tmp_path / "o") if r.get("event")]) == 3


def test_unwritable_or_full_output_fails_before_training_and_leaves_nothing(tiny_llama_dir, tiny_text, tmp_path,
                                                                          monkeypatch):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DotMoeError, match="not writable"):
        convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "a_file" / "out"), progress=False)

    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(DotMoeError, match="not enough disk space"):
        convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "full_disk"), progress=False)
    assert not (tmp_path / "full_disk").exists()


def _cli_error(argv, capsys):
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dotmoe:")]
    assert code == 2 and len(err) == 1
    return err[0]


def test_bad_models_are_one_clear_line_and_write_nothing(tiny_llama_dir, tiny_text, tmp_path, capsys):
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    base = ["convert", "--data", str(tiny_text), "--experts", "4", "--top-k", "2", "--tokens", "256",
            "--seq-len", "32"]
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_llama_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage")
    assert "cannot read model weights" in _cli_error(base + ["--model", str(corrupt), "--out", str(tmp_path / "o1")],
                                                      capsys)

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({}, pickled / "pytorch_model.bin")
    assert "pickled .bin weights are refused" in _cli_error(
        base + ["--model", str(pickled), "--out", str(tmp_path / "o2")], capsys)

    small_vocab = tmp_path / "small_vocab"
    cfg = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(small_vocab)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(small_vocab)
    assert "vocab_size is 1000" in _cli_error(base + ["--model", str(small_vocab), "--out", str(tmp_path / "o3")],
                                              capsys)

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "contain no text" in _cli_error(
        ["convert", "--model", str(tiny_llama_dir), "--data", str(empty), "--out", str(tmp_path / "o4")], capsys)
    assert "--experts must be >= 2" in _cli_error(base + ["--experts", "1", "--out", str(tmp_path / "o5")], capsys)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))
