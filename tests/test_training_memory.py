"""Training defaults decided at the start of a run: the default token budget, autocast (mixed precision auto) and
activation checkpointing (auto), each against what it must equal."""

import json
import shutil

import pytest
import torch

from dotmoe.config import DEFAULT_TRAIN_TOKENS, ConvertConfig
from dotmoe.convert import convert


def test_default_tokens_train_in_the_joint_mode_only():
    assert ConvertConfig().tokens == DEFAULT_TRAIN_TOKENS
    assert ConvertConfig().steps == DEFAULT_TRAIN_TOKENS // (8 * 256)
    assert ConvertConfig().trainable == "full"
    assert ConvertConfig(tokens=0).steps == 0 and ConvertConfig(tokens=0).trainable == "router+assignment"
    assert ConvertConfig(mode="layerwise").tokens is None  # the layer-wise mode trains layer_steps per layer


def test_mixed_precision_auto_is_bf16_only_for_trained_weights_on_fast_bf16(monkeypatch):
    from dotmoe import precision

    cpu = torch.device("cpu")
    for fast in (True, False):
        monkeypatch.setattr(precision, "fast_bf16", lambda device, fast=fast: (fast, "probe"))
        assert precision.resolve_mixed_precision("auto", cpu, trains_weights=True)[0] == ("bf16" if fast else "no")
        assert precision.resolve_mixed_precision("auto", cpu, trains_weights=False)[0] == "no"
        for asked in ("no", "bf16", "fp16"):
            assert precision.resolve_mixed_precision(asked, cpu, trains_weights=True)[0] == asked
    with pytest.raises(Exception, match="mixed_precision must be one of"):
        ConvertConfig(mixed_precision="fp8")


def test_gradient_checkpointing_auto_only_when_memory_is_short(tiny_llama_dir):
    from dotmoe.architecture import load_causal_lm
    from dotmoe.training_memory import activation_bytes, state_bytes, use_gradient_checkpointing

    model, _ = load_causal_lm(tiny_llama_dir)
    cfg = ConvertConfig(tokens=4096, seq_len=32, batch_size=4)
    need = state_bytes(cfg, model) + activation_bytes(cfg, model)
    params = sum(p.numel() for p in model.parameters())
    assert state_bytes(cfg, model) == 20 * params  # fp32 weights + teacher + gradients + 2 AdamW moments
    c = model.config
    assert activation_bytes(cfg, model) == 4 * 4 * 32 * c.num_hidden_layers * (
        12 * c.hidden_size + 6 * c.intermediate_size + 2 * c.num_attention_heads * 32)
    assert not use_gradient_checkpointing(cfg, model, available=int(need / 0.8) + 1)
    assert use_gradient_checkpointing(cfg, model, available=int(need / 0.8) - 1)
    assert use_gradient_checkpointing(ConvertConfig(tokens=4096, gradient_checkpointing=True), model, available=10**15)
    assert not use_gradient_checkpointing(ConvertConfig(tokens=4096, gradient_checkpointing=False), model, available=0)
    assert not use_gradient_checkpointing(ConvertConfig(tokens=0), model, available=0)  # nothing trains


def _runs_off_and_on(model, data, tmp_path, setting: str, steps: int):
    """Two short fp32 trainings of the tiny model, `setting` False then True (outputs tmp_path/False, /True): their
    results and train logs."""
    runs, logs = {}, []
    for on in (False, True):
        cfg = ConvertConfig(model=str(model), data=[str(data)], eval_data=[str(data)], out=str(tmp_path / str(on)),
                            experts=4, top_k=2, tokens=steps * 4 * 32, seq_len=32, batch_size=4, eval_tokens=256,
                            calib_tokens=256, seed=3, mixed_precision="no", export_format="none", **{setting: on})
        runs[on] = convert(cfg, progress=False)
        logs.append([json.loads(x) for x in (tmp_path / str(on) / "train_log.jsonl").read_text().splitlines()])
    return runs, logs


def test_gradient_checkpointing_changes_no_number(tiny_llama_dir, tiny_text, tmp_path):
    """Why a resume may change gradient_checkpointing (resume_guards.RUN_ONLY_SETTINGS): the recomputed forward gives the
    same losses, perplexities and trained weights bit for bit."""
    runs, logs = _runs_off_and_on(tiny_llama_dir, tiny_text, tmp_path, "gradient_checkpointing", 4)
    losses = [[r["loss"] for r in log if "loss" in r] for log in logs]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    assert runs[False].summary["val_ppl"] == runs[True].summary["val_ppl"]
    assert runs[False].summary["config"]["gradient_checkpointing"] is False
    assert runs[True].summary["config"]["gradient_checkpointing"] is True
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / str(on) / "trained_weights.safetensors") for on in (False, True))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


_CXX = next((cc for cc in ("g++", "c++", "clang++") if shutil.which(cc)), None)


def test_compile_auto_only_for_long_runs_of_large_models():
    from dotmoe.compiled import COMPILE_MIN_PARAMS, COMPILE_MIN_STEPS, compile_by_default

    cpu = torch.device("cpu")
    assert compile_by_default(COMPILE_MIN_STEPS, COMPILE_MIN_PARAMS, 1, cpu) == (_CXX is not None)
    assert not compile_by_default(COMPILE_MIN_STEPS - 1, COMPILE_MIN_PARAMS, 1, cpu)
    assert not compile_by_default(COMPILE_MIN_STEPS, COMPILE_MIN_PARAMS - 1, 1, cpu)  # the bundled 10M model
    assert not compile_by_default(COMPILE_MIN_STEPS, COMPILE_MIN_PARAMS, 2, cpu)  # FSDP / DDP: eager


@pytest.mark.skipif(_CXX is None, reason="no C++ compiler for inductor's CPU code")
def test_compiled_training_follows_the_eager_run(tiny_llama_dir, tiny_text, tmp_path, monkeypatch):
    """compile: true runs the same training (same data, steps and terms): in fp32 its losses match eager's to float
    rounding, its layers really are compiled, and the record says so."""
    import dotmoe.joint_setup as setup

    calls, original = [], setup.compile_decoder_layers
    monkeypatch.setattr(setup, "compile_decoder_layers", lambda *models: calls.append(len(models)) or original(*models))
    from torch._dynamo.utils import counters

    counters.clear()
    runs, logs = _runs_off_and_on(tiny_llama_dir, tiny_text, tmp_path, "compile", 3)
    eager, fused = ([r["kl"] for r in log if "loss" in r] for log in logs)
    assert len(eager) == 3 and eager != [0.0] * 3
    assert fused == pytest.approx(eager, rel=1e-3, abs=1e-6)
    assert runs[True].summary["val_ppl"] == pytest.approx(runs[False].summary["val_ppl"], rel=1e-4)
    assert calls == [2]  # student and teacher (trainable full)
    assert counters["stats"]["unique_graphs"] >= 2 and not counters["graph_break"]  # compiled, not an eager fallback
    assert runs[True].summary["config"]["compile"] is True and runs[False].summary["config"]["compile"] is False
