"""A 2-process (gloo, CPU) run gives the same partition and loss curve as a 1-process run with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dotmoe.artifacts import load_conversion


def test_two_process_ddp_matches_single_process(tiny_llama_dir, tiny_text, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("experts: 4\ntop_k: 2\ntokens: 3072\nseq_len: 32\nbatch_size: 4\nseed: 3\neval_tokens: 256\n"
                      "calib_tokens: 256\nexport_format: none\n")
    args = ["convert", "--config", str(config), "--model", str(tiny_llama_dir), "--data", str(tiny_text),
            "--eval-data", str(tiny_text)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "dotmoe.cli", *args, "--out", str(tmp_path / "one")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    # torchrun sets RANK/WORLD_SIZE; accelerate then runs DDP over gloo on CPU
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
              "-m", "dotmoe.cli"]
    double = subprocess.run([*launch, *args, "--out", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                            timeout=600)
    assert double.returncode == 0, double.stderr[-3000:]
    logs = [[json.loads(x) for x in (tmp_path / d / "train_log.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert len(logs[0]) == len(logs[1]) == 24
    for a, b in zip(*logs):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["kl"] == pytest.approx(a["kl"], rel=1e-3, abs=1e-6)
    one, two = load_conversion(tmp_path / "one"), load_conversion(tmp_path / "two")
    assert (one.meta["processes"], two.meta["processes"]) == (1, 2)
    assert torch.equal(one.partition, two.partition)
