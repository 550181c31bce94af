"""Faults of long jobs: kill -9, SIGINT and SIGTERM then resume, non-finite steps, unwritable/full disks, and bad
input writing nothing."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import save_tiny_llama, tiny_convert_argv

from dotmoe.artifacts import load_conversion
from dotmoe.cli import main
from dotmoe.config import ConvertConfig
from dotmoe.convert import convert
from dotmoe.errors import DotMoeError
from dotmoe.train import MoeTrainingModule


def _cfg(model, data, out, **kw):
    base = dict(shared_fraction=0.0,  # these tests exercise the plain MoE
                model=str(model), data=[str(data)], eval_data=[str(data)], out=str(out), experts=4, top_k=2,
                tokens=12 * 4 * 32, seq_len=32, batch_size=4, eval_tokens=256, calib_tokens=256, checkpoint_every=2,
                seed=5, export_format="none")
    base.update(kw)
    return ConvertConfig(**base)


def _records(out):
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def layerwise_run(tiny_text, tmp_path_factory):
    """The same for the layer-wise mode, on a 4-layer model (a checkpoint after each of the first 3 layers)."""
    tmp = tmp_path_factory.mktemp("layerwise")
    model = save_tiny_llama(tmp / "model", layers=4)
    argv = tiny_convert_argv(tmp, model, tiny_text, tmp / "full", mode="layerwise", layer_steps=30,
                             calib_tokens=1024)[:-2]
    assert main(argv + ["--out", str(tmp / "full")]) == 0
    return argv, tmp / "full"


def _start(argv, out, log):
    """The conversion in a subprocess (stderr to a file: a full pipe would block it)."""
    return subprocess.Popen([sys.executable, "-m", "dotmoe.cli", *argv, "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=log.open("w"))


def _wait_until(proc, ready, what):
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    assert proc.poll() is None, f"the run finished before {what}; make it longer"


def _log_steps(out):
    log = out / "train_log.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return sum(1 for line in lines if json.loads(line).get("step") != 0)  # step 0: the evaluation of the start


def _same_joint_result(out, full):
    resumed, reference = load_conversion(out), load_conversion(full)
    assert torch.equal(resumed.partition, reference.partition)
    final = [r for r in _records(out) if "loss" in r]
    assert [r["step"] for r in final] == list(range(1, reference.meta["steps"] + 1))
    assert final[-1]["loss"] == pytest.approx(reference.meta["final_terms"]["loss"], rel=1e-6)
    assert resumed.meta["final_terms"]["loss"] == pytest.approx(reference.meta["final_terms"]["loss"], rel=1e-6)


def test_kill_9_mid_training_then_resume_equals_uninterrupted(joint_reference, tmp_path):
    argv, full = joint_reference
    out = tmp_path / "killed"
    proc = _start(argv, out, tmp_path / "err")
    _wait_until(proc, lambda: (out / "checkpoint.pt").exists() and _log_steps(out) >= 7, "a checkpoint")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "dotmoe_meta.json").exists() and not (out / "COMPLETE").exists()
    assert main(argv + ["--out", str(out), "--resume"]) == 0
    _same_joint_result(out, full)


def _stopped(proc, signum, log):
    """Send `signum`; the run must stop within seconds with one line that says how to go on."""
    t0 = time.time()
    proc.send_signal(signum)
    proc.wait(timeout=120)
    err = log.read_text()
    lines = [line for line in err.splitlines() if line.startswith("dotmoe:")]
    assert proc.returncode == 128 + signum and "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert time.time() - t0 < 30 and f"interrupted by {signal.Signals(signum).name}" in lines[0]
    return lines[0]


def _resume_as_told(line):
    """Run the exact command the interrupted run printed."""
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[0] == "dotmoe" and command[-1] == "--resume"
    assert main(command[1:]) == 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_checkpoints_at_a_step_boundary_and_resume_ends_like_an_uninterrupted_run(signum, joint_reference,
                                                                                        tmp_path):
    argv, full = joint_reference
    out = tmp_path / "run"
    proc = _start(argv, out, tmp_path / "err")
    _wait_until(proc, lambda: _log_steps(out) >= 3, "3 steps")
    line = _stopped(proc, signum, tmp_path / "err")
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert f"at step {step} of 20 (checkpoint saved" in line and step >= 3
    assert _log_steps(out) == step and not (out / "dotmoe_meta.json").exists() and not (out / "COMPLETE").exists()
    _resume_as_told(line)
    _same_joint_result(out, full)


_original_forward = MoeTrainingModule.forward


def _interrupt_at_call(monkeypatch, n: int) -> None:
    """The n-th training forward sends this process SIGINT (as Ctrl-C would); the run stops after that step."""
    calls = {"n": 0}

    def forward(self, input_ids, tau, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return _original_forward(self, input_ids, tau, **kwargs)

    monkeypatch.setattr(MoeTrainingModule, "forward", forward)


def test_stop_during_the_last_step_resumes_to_the_uninterrupted_result(tiny_llama_dir, tiny_text, tmp_path,
                                                                      monkeypatch):
    """A stop request in the last step checkpoints after it; the resumed run's final phase then rounds the
    assignment at the last step's temperature (tau_end), as the uninterrupted run does, not at tau_start."""
    argv = tiny_convert_argv(tmp_path, tiny_llama_dir, tiny_text, tmp_path / "full", tau_start=3.0, tau_end=0.03,
                             lr_affinity=0.5, eval_every=0, shared_fraction=0.0,
                             mixed_precision="'no'")[:-2]  # YAML: quoted, else False
    assert main(argv + ["--out", str(tmp_path / "full")]) == 0
    _interrupt_at_call(monkeypatch, 12)  # the last of 12 steps
    assert main(argv + ["--out", str(tmp_path / "o")]) == 130
    assert torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)["step"] == 12
    monkeypatch.setattr(MoeTrainingModule, "forward", _original_forward)
    assert main(argv + ["--out", str(tmp_path / "o"), "--resume"]) == 0
    resumed, full = load_conversion(tmp_path / "o"), load_conversion(tmp_path / "full")
    assert torch.equal(resumed.partition, full.partition)
    assert resumed.meta["val_ppl"] == full.meta["val_ppl"]


def test_resume_takes_the_checkpoints_auto_mixed_precision(tiny_llama_dir, tiny_text, tmp_path, monkeypatch, capsys):
    """`--mixed-precision auto` is decided by a timed probe; when it decides otherwise on resume (busy cores), the
    resume continues in the checkpoint's type instead of refusing the settings as changed."""
    import dotmoe.convert as convert_module

    real = convert_module.resolve_mixed_precision
    argv = tiny_convert_argv(tmp_path, tiny_llama_dir, tiny_text, tmp_path / "o", eval_every=0)[:-2]
    monkeypatch.setattr(convert_module, "resolve_mixed_precision", lambda *a: ("no", "probe: fp32 faster"))
    assert main(argv + ["--out", str(tmp_path / "full")]) == 0
    _interrupt_at_call(monkeypatch, 6)
    assert main(argv + ["--out", str(tmp_path / "o")]) == 130
    assert torch.load(tmp_path / "o" / "checkpoint.pt", weights_only=True)["config"]["mixed_precision"] == "no"
    monkeypatch.setattr(MoeTrainingModule, "forward", _original_forward)
    monkeypatch.setattr(convert_module, "resolve_mixed_precision", lambda *a: ("bf16", "probe: bf16 faster"))
    capsys.readouterr()
    assert main(argv + ["--out", str(tmp_path / "o"), "--resume"]) == 0
    assert "mixed precision no, as the checkpoint was trained" in capsys.readouterr().out
    assert load_conversion(tmp_path / "o").meta["val_ppl"] == load_conversion(tmp_path / "full").meta["val_ppl"]
    assert real("auto", torch.device("cpu"), False)[0] == "no"  # no weights train: no autocast, whatever the probe


def _stop_at_the_final_evaluation(monkeypatch):
    """The run's final MoE evaluation raises Interrupted (a stop there); returns the real perplexity to restore."""
    import dotmoe.joint_finish as finish
    from dotmoe.errors import Interrupted

    measure = finish.perplexity

    def stop(*args, desc="perplexity", **kw):
        if desc == "perplexity (MoE)":
            raise Interrupted()
        return measure(*args, desc=desc, **kw)

    monkeypatch.setattr(finish, "perplexity", stop)
    return measure


def test_resume_takes_the_checkpoints_auto_precision(tiny_llama_dir, tiny_text, tmp_path, monkeypatch):
    """`--precision auto` (bf16 frozen weights where the probe finds bf16 fast): a resume computes in the type its
    checkpoint was computed in, even where a new probe would choose otherwise, and ends like the uninterrupted run."""
    import dotmoe.joint_finish as finish
    import dotmoe.precision as precision
    from dotmoe.errors import Interrupted
    from dotmoe.run_dir import CHECKPOINT

    monkeypatch.setattr(precision, "fast_bf16", lambda device: (False, "probe: fp32 faster"))
    full = convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "full", tokens=0))
    out = tmp_path / "o"
    measure = _stop_at_the_final_evaluation(monkeypatch)
    with pytest.raises(Interrupted):
        convert(_cfg(tiny_llama_dir, tiny_text, out, tokens=0))
    assert torch.load(out / CHECKPOINT, weights_only=True)["config"]["precision"] == "fp32"  # resolved, recorded
    monkeypatch.setattr(finish, "perplexity", measure)
    monkeypatch.setattr(precision, "fast_bf16", lambda device: (True, "probe: bf16 faster"))
    resumed = convert(_cfg(tiny_llama_dir, tiny_text, out, tokens=0, resume=True))
    assert resumed.summary["precision"] == "fp32" and "as the checkpoint computed" in resumed.summary["precision_reason"]
    assert resumed.record.val_ppl == full.record.val_ppl


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_during_layerwise_conversion_resumes_to_the_same_result(signum, layerwise_run, tmp_path):
    from dotmoe.run_dir import LAYERWISE_CHECKPOINT

    argv, full = layerwise_run
    out = tmp_path / "run"
    proc = _start(argv, out, tmp_path / "err")
    _wait_until(proc, lambda: (out / LAYERWISE_CHECKPOINT).exists(), "its first checkpoint")
    line = _stopped(proc, signum, tmp_path / "err")
    assert (out / LAYERWISE_CHECKPOINT).is_file() and not (out / "dotmoe_meta.json").exists()
    _resume_as_told(line)
    resumed, reference = load_conversion(out), load_conversion(full)
    assert torch.equal(resumed.partition, reference.partition)
    assert all(torch.equal(a, b) for a, b in zip(resumed.routers, reference.routers))
    assert resumed.meta["layer_errors"] == reference.meta["layer_errors"]


def test_training_free_run_stopped_after_its_refit_resumes_from_it(tiny_llama_dir, tiny_text, tmp_path, monkeypatch):
    """A training-free run stopped during its final evaluation keeps its partition and refit (the slow part) in a
    checkpoint: --resume neither calibrates nor refits again and ends exactly like an uninterrupted run."""
    from safetensors.torch import load_file

    import dotmoe.joint_finish as finish
    import dotmoe.joint_setup as setup
    from dotmoe.errors import Interrupted
    from dotmoe.resume_guards import output_state
    from dotmoe.run_dir import CHECKPOINT

    full = convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "full", tokens=0))
    out = tmp_path / "stopped"
    measure = _stop_at_the_final_evaluation(monkeypatch)
    with pytest.raises(Interrupted):
        convert(_cfg(tiny_llama_dir, tiny_text, out, tokens=0))
    assert output_state(out) == "resumable" and not (out / "dotmoe_meta.json").exists()

    saved = torch.load(out / CHECKPOINT, weights_only=True)
    torch.save({**saved, "stage": "trained"}, out / CHECKPOINT)  # not a refitted state: refused, named
    with pytest.raises(DotMoeError, match="is damaged"):
        convert(_cfg(tiny_llama_dir, tiny_text, out, tokens=0, resume=True))
    torch.save(saved, out / CHECKPOINT)

    def must_not_run(*args, **kw):
        raise AssertionError("the resumed run redid work its checkpoint holds")

    monkeypatch.setattr(finish, "perplexity", measure)
    monkeypatch.setattr(setup, "initial_partitions", must_not_run)
    for module in (setup, finish):
        monkeypatch.setattr(module, "refit_moe_down", must_not_run)
    resumed = convert(_cfg(tiny_llama_dir, tiny_text, out, tokens=0, resume=True))
    assert torch.equal(resumed.partition, full.partition)
    assert resumed.record.val_ppl == full.record.val_ppl and resumed.record.refit_errors == full.record.refit_errors
    got, want = load_conversion(out), load_conversion(tmp_path / "full")
    assert all(torch.equal(a, b) for a, b in zip(got.routers, want.routers))
    got_w, want_w = (load_file(d / "trained_weights.safetensors") for d in (out, tmp_path / "full"))
    assert got_w.keys() == want_w.keys() and all(torch.equal(got_w[k], want_w[k]) for k in want_w)
    assert output_state(out) == "complete" and not (out / CHECKPOINT).exists()


def test_non_finite_step_is_reverted_logged_and_skipped(tiny_llama_dir, tiny_text, tmp_path, monkeypatch):
    original = MoeTrainingModule.forward
    calls = {"n": 0}

    def poisoned(self, input_ids, tau, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # a router blows up mid-run
            self.moes[1].router.weight.data.fill_(float("nan"))
        return original(self, input_ids, tau, **kwargs)

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

    def always_nan(self, input_ids, tau, **kwargs):
        terms = original(self, input_ids, tau, **kwargs)
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
    # pruning (+ distillation) checks the same before it distils or saves
    trained = {}

    def no_distillation(*args, **kwargs):
        trained["ran"] = True

    import dotmoe.distill_dense

    monkeypatch.setattr(dotmoe.distill_dense, "distill_dense", no_distillation)
    with pytest.raises(DotMoeError, match="not enough disk space"):
        convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "full_prune", method="prune"), progress=False)
    assert not (tmp_path / "full_prune").exists() and not trained


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


@pytest.mark.parametrize("flags", [["--refit-down"], ["--refit-stream", "0.5"], ["--refit-after-training"]])
def test_layerwise_refuses_refit_options_it_would_ignore(flags, tiny_llama_dir, tiny_text, tmp_path, capsys):
    argv = tiny_convert_argv(tmp_path, tiny_llama_dir, tiny_text, tmp_path / "lw", mode="layerwise", layer_steps=2)
    line = _cli_error(argv + flags, capsys)
    assert "--mode layerwise" in line and flags[0] in line and "joint mode only" in line
    assert not (tmp_path / "lw").exists()
    assert main(argv + ["--no-refit-down"]) == 0  # what it does anyway: accepted
