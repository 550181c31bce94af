"""Training speed tooling: the opt-in step profiler (DOTMOE_PROFILE), autocast outside accelerate, the bf16 teacher."""

from __future__ import annotations

import torch

from dotmoe.precision import autocast
from dotmoe.step_profile import StepProfiler


def test_profiler_writes_the_profiled_steps_only(tmp_path, monkeypatch):
    table = tmp_path / "profile.md"
    monkeypatch.setenv("DOTMOE_PROFILE", str(table))
    monkeypatch.setenv("DOTMOE_PROFILE_STEPS", "2")
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    prof = StepProfiler(first_step=0)
    for step in range(5):  # step 0 warms up, 1-2 are profiled: one mm each, step 3 closes; 3-4 are not counted
        prof.step(step)
        a @ b
        if step == 2:
            a + 1.0
    prof.close()
    text = table.read_text()
    assert text.startswith("steps profiled: 2;")
    mm = next(line for line in text.splitlines() if line.startswith("| aten::mm | [[64, 32], [32, 16]]"))
    assert mm.split("|")[4].strip() == "1"  # calls per step: 2 calls over 2 steps
    assert "aten::add" in text


def test_profiler_unset_does_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("DOTMOE_PROFILE", raising=False)
    prof = StepProfiler(first_step=0)
    for step in range(4):
        prof.step(step)
    prof.close()
    assert prof.prof is None and not list(tmp_path.iterdir())


def test_autocast_follows_mixed_precision():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with autocast("bf16", torch.device("cpu")):
        assert torch.nn.functional.linear(x, w).dtype == torch.bfloat16
    with autocast("no", torch.device("cpu")):
        assert torch.nn.functional.linear(x, w).dtype == torch.float32


def test_bf16_teacher_copy_matches_autocast_of_the_fp32_teacher(tmp_path):
    """The teacher's Linear layers stored in bf16 give, under bf16 autocast, exactly what autocast makes of the fp32
    ones; the (tied) output embedding and the norms stay fp32."""
    from conftest import save_tiny_llama
    from transformers import AutoModelForCausalLM

    from dotmoe.distill_dense import teacher_copy

    model = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "m"), torch_dtype=torch.float32)
    plain, stored = teacher_copy(model), teacher_copy(model, torch.bfloat16)
    assert stored.model.layers[0].mlp.gate_proj.weight.dtype == torch.bfloat16
    assert stored.get_output_embeddings().weight.dtype == torch.float32
    assert stored.model.layers[0].input_layernorm.weight.dtype == torch.float32
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), autocast("bf16", torch.device("cpu")):
        a = plain.get_decoder()(input_ids=ids).last_hidden_state
        b = stored.get_decoder()(input_ids=ids).last_hidden_state
    assert torch.equal(a, b)
    assert not torch.equal(a.float(), model.get_decoder()(input_ids=ids).last_hidden_state)  # autocast did act
