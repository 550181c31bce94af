"""A 2-process (gloo, CPU) run gives the same partition and loss curve as a 1-process run with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dotmoe.artifacts import load_conversion


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
BASE_YAML = ("experts: 4\ntop_k: 2\ntokens: 3072\nseq_len: 32\nbatch_size: 4\nseed: 3\neval_tokens: 256\n"
             "calib_tokens: 256\nexport_format: none\n"
             # the pre-training refit (skipped under FSDP) leaves a KL of ~1e-6 here, below reduction-order noise
             "refit_before_training: false\n"
             # the recipe these comparisons were written for (no evaluation during training, warmup 10)
             "trainable: router+assignment\neval_every: 0\nwarmup_steps: 10\n"
             # fp32, as these exact comparisons were written for (with bf16 autocast FSDP2 and DDP differed by 9%)
             "mixed_precision: 'no'\n")
SINGLE = [sys.executable, "-m", "dotmoe.cli"]
# torchrun sets RANK/WORLD_SIZE; accelerate then runs DDP over gloo on CPU
DDP_LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
              "-m", "dotmoe.cli"]
FSDP_LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               os.path.join(os.path.dirname(__file__), "fsdp_cpu_launch.py")]


def _convert_args(config_dir, model, data, yaml_text: str) -> list[str]:
    config = config_dir / "c.yaml"
    config.write_text(yaml_text)
    return ["convert", "--config", str(config), "--model", str(model), "--data", str(data), "--eval-data", str(data)]


def _run(cmd, env=ENV, ok=True):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return proc


def _log(out):
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_process_run(tiny_llama_dir, tiny_text, tmp_path_factory):
    """(convert args, output dir) of the 1-process reference run the 2-process runs are compared with."""
    tmp = tmp_path_factory.mktemp("single")
    args = _convert_args(tmp, tiny_llama_dir, tiny_text, BASE_YAML)
    _run([*SINGLE, *args, "--out", str(tmp / "one")])
    return args, tmp / "one"


def _assert_same_run(one, two):
    """Same loss curve (within float reduction-order noise) and the same partition."""
    a, b = _log(one), _log(two)
    assert len(a) == len(b) == 24
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-6)
        assert y["kl"] == pytest.approx(x["kl"], rel=1e-3, abs=1e-6)
    assert torch.equal(load_conversion(one).partition, load_conversion(two).partition)


def test_two_process_ddp_matches_single_process(single_process_run, tmp_path):
    args, one = single_process_run
    _run([*DDP_LAUNCH, *args, "--out", str(tmp_path / "two")])
    _assert_same_run(one, tmp_path / "two")
    assert (load_conversion(one).meta["processes"], load_conversion(tmp_path / "two").meta["processes"]) == (1, 2)


def test_two_process_fsdp2_shards_each_layer_and_matches_single_process(single_process_run, tmp_path):
    """accelerate's FSDP2 path (one unit per decoder layer, the teacher being the same modules) trains to the
    same partition and loss curve as one process."""
    args, one = single_process_run
    probe = tmp_path / "units.txt"  # the launcher writes the FSDP units of the prepared module here
    _run([*FSDP_LAUNCH, *args, "--out", str(tmp_path / "fsdp")], {**ENV, "DOTMOE_TEST_FSDP_REPORT": str(probe)})
    units = probe.read_text().split()
    assert units == ["<root>", "model.model.layers.0", "model.model.layers.1"], units
    _assert_same_run(one, tmp_path / "fsdp")
    fsdp = load_conversion(tmp_path / "fsdp")
    assert fsdp.meta["processes"] == 2
    for a, b in zip(load_conversion(one).routers, fsdp.routers):
        assert torch.allclose(a, b, atol=1e-5)


def test_fsdp2_full_training_crash_and_resume_equals_ddp(tiny_llama_dir, tiny_text, tmp_path):
    """All weights trained (a sharded teacher copy too): an FSDP2 run killed after its first checkpoint and resumed
    ends exactly where an uninterrupted 2-process DDP run does (checkpoints hold whole tensors, re-sharded on load)."""
    from safetensors.torch import load_file

    args = _convert_args(tmp_path, tiny_llama_dir, tiny_text, BASE_YAML.replace("tokens: 3072", "tokens: 2048")
                         + "trainable: full\nlr_weights: 1e-4\ncheckpoint_every: 6\n")
    _run([*DDP_LAUNCH, *args, "--out", str(tmp_path / "ddp")])
    out = tmp_path / "fsdp"
    _run([*FSDP_LAUNCH, *args, "--out", str(out)], {**ENV, "DOTMOE_TEST_DIE_AFTER_CHECKPOINT": "1"}, ok=False)
    assert (out / "checkpoint.pt").exists() and len(_log(out)) == 6 and not (out / "dotmoe_meta.json").exists()
    _run([*FSDP_LAUNCH, *args, "--out", str(out), "--resume"])
    a, b = _log(tmp_path / "ddp"), _log(out)
    assert [r["step"] for r in b] == list(range(1, 17))
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-7)
    assert torch.equal(load_conversion(tmp_path / "ddp").partition, load_conversion(out).partition)
    wa, wb = load_file(tmp_path / "ddp" / "trained_weights.safetensors"), load_file(out / "trained_weights.safetensors")
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6


def test_fsdp_config_on_a_machine_without_gpu_is_refused_not_silently_ddp(tiny_llama_dir, tiny_text, tmp_path,
                                                                          monkeypatch):
    from dotmoe.config import ConvertConfig
    from dotmoe.errors import DotMoeError
    from dotmoe.convert import convert

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with an FSDP config sets
    out = tmp_path / "o"
    with pytest.raises(DotMoeError, match="asks for FSDP, but accelerate runs FSDP only on GPUs"):
        convert(ConvertConfig(model=str(tiny_llama_dir), data=[str(tiny_text)], out=str(out), experts=4, tokens=256,
                              seq_len=32, batch_size=4, export_format="none"), progress=False)
    assert not out.exists()
