"""Damaged inputs are never reported as good (issue 28, class 2): a model whose weights and config.json disagree,
an MoE given as a dense model, a dense model changed after its conversion, a conversion missing its trained
weights, and an export whose reloaded logits do not match. Each: exit code 2, one stderr line, nothing written."""

import json
import shutil

import pytest
import torch
from conftest import cli_error, tiny_convert_argv, tree
from safetensors.torch import load_file, save_file

from dotmoe.cli import main
from dotmoe.errors import DotMoeError


def _copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _edit_weights(model_dir, edit):
    tensors = load_file(str(model_dir / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def _edit_config(model_dir, **changes):
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("mode", ["joint", "layerwise"])
@pytest.mark.parametrize("damage, shown", [
    (lambda d: _edit_weights(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
     "1 weight tensor(s) missing from {d}: model.layers.1.mlp.up_proj.weight"),
    (lambda d: _edit_weights(d, lambda t: t.pop("model.norm.weight")), "missing from {d}: model.norm.weight"),
    (lambda d: _edit_config(d, num_hidden_layers=3), "missing from {d}: model.layers.2."),
    (lambda d: _edit_config(d, num_hidden_layers=1), "in the checkpoint but not in the model of config.json"),
    (lambda d: _edit_weights(d, lambda t: t.update(extra=torch.zeros(2))), "not in the model of config.json, in {d}: extra"),
])
def test_weights_that_do_not_match_config_json_are_refused(damage, shown, mode, tiny_llama_dir, tiny_text, tmp_path,
                                                           capsys):
    model = _copy(tiny_llama_dir, tmp_path / "model")
    damage(model)
    before = tree(model)
    argv = tiny_convert_argv(tmp_path, model, tiny_text, tmp_path / "out", mode=mode, tokens=0)
    line = cli_error(argv, capsys)
    assert shown.format(d=model) in line and "do not describe the same model" in line, line
    assert tree(model) == before and not (tmp_path / "out").exists()


def _half_one_projection(tensors):
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"].half()


def test_a_weight_stored_in_another_precision_is_refused(tiny_llama_dir, tiny_text, tmp_path, capsys):
    model = _copy(tiny_llama_dir, tmp_path / "model")
    _edit_weights(model, _half_one_projection)
    line = cli_error(tiny_convert_argv(tmp_path, model, tiny_text, tmp_path / "out", tokens=0), capsys)
    assert "1 weight tensor(s) in" in line and "model.layers.0.self_attn.q_proj.weight (float16)" in line
    assert "(float32)" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, shown", [
    (lambda t: t.pop("model.norm.weight"), "missing from"),
    (_half_one_projection, "stored in another precision"),
])
def test_every_command_that_loads_a_model_refuses_damaged_weights(damage, shown, tiny_llama_dir, tiny_text,
                                                                   tmp_path, capsys):
    """eval (the model and --dense), sample-data and bench speed (--dense and --moe) check the weights as convert
    does, before any work: never a re-initialised tensor timed or scored."""
    conv = tmp_path / "conv"
    assert main(tiny_convert_argv(tmp_path, tiny_llama_dir, tiny_text, conv, tokens=0,
                                  export_format="qwen2_moe")) == 0
    dense = _copy(tiny_llama_dir, tmp_path / "dense")
    _edit_weights(dense, damage)
    moe = _copy(conv / "model", tmp_path / "moe")
    _edit_weights(moe, damage)
    report = tmp_path / "r.json"
    bench = ["bench", "speed", "--batch", "1", "--new-tokens", "2", "--runs", "1", "--prompt", "4"]
    for argv in (["eval", "--model", str(dense), "--out", str(report)],
                 ["eval", "--model", str(conv / "model"), "--dense", str(dense), "--out", str(report)],
                 ["sample-data", "--model", str(dense), "--out", str(tmp_path / "s.txt"), "--tokens", "8"],
                 bench + ["--dense", str(dense), "--moe", str(conv / "model")],
                 bench + ["--dense", str(tiny_llama_dir), "--moe", str(moe)]):
        assert shown in cli_error(argv, capsys), argv
    assert not report.exists() and not (tmp_path / "s.txt").exists()


def test_wrong_shaped_weight_is_one_line(tiny_llama_dir, tiny_text, tmp_path, capsys):
    model = _copy(tiny_llama_dir, tmp_path / "model")
    _edit_weights(model, lambda t: t.update({"model.layers.0.mlp.gate_proj.weight": torch.zeros(8, 32)}))
    line = cli_error(tiny_convert_argv(tmp_path, model, tiny_text, tmp_path / "out", tokens=0), capsys)
    assert "of the wrong shape in" in line and "model.layers.0.mlp.gate_proj.weight" in line
    assert not (tmp_path / "out").exists()


def test_a_model_that_is_already_a_moe_is_refused(tiny_llama_dir, tiny_text, tmp_path, capsys):
    conv = tmp_path / "conv"
    assert main(tiny_convert_argv(tmp_path, tiny_llama_dir, tiny_text, conv, tokens=0,
                                  export_format="qwen2_moe")) == 0
    line = cli_error(tiny_convert_argv(tmp_path, conv / "model", tiny_text, tmp_path / "again", tokens=0), capsys)
    assert "is already a Mixture-of-Experts model (num_experts = 4)" in line and not (tmp_path / "again").exists()


@pytest.fixture
def converted(tiny_llama_dir, tiny_text, tmp_path):
    """A training-free conversion (refitted down projections in trained_weights.safetensors) of a copy of the tiny
    model, not yet exported."""
    model = _copy(tiny_llama_dir, tmp_path / "model")
    conv = tmp_path / "conv"
    assert main(tiny_convert_argv(tmp_path, model, tiny_text, conv, tokens=0)) == 0
    assert (conv / "trained_weights.safetensors").is_file()
    return model, conv


def test_export_refuses_a_dense_model_changed_since_the_conversion(converted, tmp_path, capsys):
    model, conv = converted
    meta = json.loads((conv / "dotmoe_meta.json").read_text())
    assert set(meta["base_fingerprint"]) == {"model.safetensors"} and len(meta["trained_weights_sha256"]) == 64
    _edit_weights(model, lambda t: t["model.layers.0.self_attn.q_proj.weight"].mul_(1.01))
    line = cli_error(["export", "--from", str(conv), "--out", str(tmp_path / "moe")], capsys)
    assert f"the weights of its dense model {model} changed since the conversion (model.safetensors)" in line
    assert not (tmp_path / "moe").exists()


@pytest.mark.parametrize("damage, shown", [
    (lambda f: f.unlink(), "trained_weights.safetensors is missing"),
    (lambda f: _edit_weights_file(f), "is not the file this conversion wrote"),
])
def test_export_refuses_missing_or_changed_trained_weights(damage, shown, converted, tmp_path, capsys):
    _, conv = converted
    damage(conv / "trained_weights.safetensors")
    line = cli_error(["export", "--from", str(conv), "--out", str(tmp_path / "moe")], capsys)
    assert shown in line and not (tmp_path / "moe").exists()


def _edit_weights_file(path):
    tensors = load_file(str(path))
    name = next(iter(tensors))
    tensors[name] = tensors[name] * 2
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_export_parity_beyond_tolerance_fails_and_names_the_numbers():
    from dotmoe.export import check_parity
    from dotmoe.export_formats import ExportPlan

    exact, approx = ExportPlan("qwen2_moe", False, True), ExportPlan("mixtral", False, False)
    good = {"tokens": 256, "max_abs_logit_diff": 7e-5, "max_abs_logit": 20.0, "top1_agreement": 1.0}
    bad = {**good, "max_abs_logit_diff": 0.95, "top1_agreement": 0.977}
    check_parity(good, exact)
    check_parity(bad, approx)  # an approximate format is reported as APPROXIMATE, not failed
    with pytest.raises(DotMoeError, match=r"differ from the converted model's by up to 0.95 \(allowed 0.02\), "
                                          r"top-1 agreement 0.9770 on 256 tokens"):
        check_parity(bad, exact)


def test_resume_refuses_data_files_that_changed(joint_reference, tmp_path, capsys, interrupt_training):
    argv, _ = joint_reference
    data = tmp_path / "train.txt"
    at = argv.index("--data")
    shutil.copy(argv[at + 1], data)
    argv = argv[:at + 1] + [str(data)] + argv[at + 2:] + ["--out", str(tmp_path / "o")]
    interrupt_training(7)  # after the checkpoint at step 5
    assert main(argv) == 130
    interrupt_training(None)
    capsys.readouterr()
    data.write_text(data.read_text()[::-1])  # same path, same size, other text
    before = tree(tmp_path / "o")
    line = cli_error(argv + ["--resume"], capsys)
    assert "the data files changed since" in line and tree(tmp_path / "o") == before


def test_weight_hashes_are_remembered_across_processes_by_size_and_modification_time(tmp_path, monkeypatch):
    """A large weight file is hashed once: the next process reads its sha256 from the cache while the file's size
    and modification time are unchanged, and hashes it again once either changes."""
    import hashlib
    import os

    from dotmoe import run_dir

    monkeypatch.setenv("DOTMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(run_dir, "HASH_CACHE_MIN_BYTES", 0)
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"a" * 1000)
    first = run_dir.file_sha256(f)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()
    assert (tmp_path / "cache" / "sha256.json").is_file()
    st = f.stat()
    f.write_bytes(b"b" * 1000)  # same size; the modification time put back: the cache cannot tell
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    run_dir._sha256.cache_clear()  # a new process
    assert run_dir.file_sha256(f) == first  # from the cache, not from the bytes
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    run_dir._sha256.cache_clear()
    assert run_dir.file_sha256(f) == hashlib.sha256(b"b" * 1000).hexdigest()
