"""End-to-end conversion on a tiny model: balance, exact resume, outputs, and clear errors for bad input."""

import json

import pytest
import torch

from dotmoe.artifacts import load_conversion
from dotmoe.cli import main
from dotmoe.config import ConvertConfig
from dotmoe.convert import convert
from dotmoe.errors import DotMoeError


def _cfg(model, data, out, **kw):
    base = dict(shared_fraction=0.0,  # these tests exercise the plain MoE
                model=str(model), data=[str(data)], eval_data=[str(data)], out=str(out), experts=4, top_k=2,
                tokens=12 * 4 * 32, seq_len=32, batch_size=4, eval_tokens=256, calib_tokens=256,
                checkpoint_every=4, seed=3)
    base.update(kw)
    return ConvertConfig(**base)


def test_partition_balanced_with_uneven_capacities_and_shared(tiny_llama_dir, tiny_text, tmp_path):
    cfg = _cfg(tiny_llama_dir, tiny_text, tmp_path / "o", shared=6, capacities=[10, 14, 16, 18], tokens=4 * 4 * 32)
    res = convert(cfg, progress=False)
    for layer in res.partition:
        assert torch.bincount(layer, minlength=5).tolist() == [10, 14, 16, 18, 6]
    loaded = load_conversion(tmp_path / "o")
    assert torch.equal(loaded.partition, res.partition)
    assert loaded.routers[0].shape == (4, 32)
    assert loaded.meta["capacities"] == [10, 14, 16, 18, 6]


def test_interrupted_run_resumes_exactly(tiny_llama_dir, tiny_text, tmp_path, interrupt_training):
    full = convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "full"), progress=False)

    interrupt_training(7)  # after the checkpoint at step 4, mid-way through step 7
    with pytest.raises(KeyboardInterrupt):
        convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "cut"), progress=False)
    interrupt_training(None)
    assert (tmp_path / "cut" / "checkpoint.pt").is_file()
    resumed = convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "cut", resume=True), progress=False)

    assert torch.equal(resumed.partition, full.partition)
    assert resumed.summary["final_terms"]["loss"] == full.summary["final_terms"]["loss"]
    assert resumed.summary["val_ppl"] == full.summary["val_ppl"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(0, 13)) and not (tmp_path / "cut" / "checkpoint.pt").exists()  # 0: the start


@pytest.mark.parametrize("kw, message", [
    (dict(experts=1), "--experts must be >= 2"),
    (dict(experts=4, top_k=4), "--top-k must be between 1 and experts-1=3"),
    (dict(gating="dense"), "gating must be one of"),
    (dict(experts=4, capacities=[1, 2]), "capacities must be 4 sizes"),
    (dict(tau_end=0.0), "must be > 0"),
])
def test_config_rejects_bad_values(kw, message):
    with pytest.raises(DotMoeError, match=message):
        ConvertConfig(**kw)


def _run_cli(argv, capsys):
    """Exit code and the dotmoe error line (stderr also carries transformers' own loading progress bars)."""
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("dotmoe:")]
    assert len(lines) == 1, err
    return code, lines[0]


@pytest.mark.parametrize("extra, message", [
    (["--model", "/nonexistent/dir"], "model directory not found"),
    (["--shared", "64"], "must be smaller than the intermediate size"),
    (["--capacities", "10", "10", "10", "10"], "capacities sum to 40"),
    (["--data", "/nonexistent.txt"], "data file not found"),
])
def test_cli_bad_input_is_one_clear_line(extra, message, tiny_llama_dir, tiny_text, tmp_path, capsys):
    argv = ["convert", "--model", str(tiny_llama_dir), "--data", str(tiny_text), "--out", str(tmp_path / "o"),
            "--experts", "4", "--top-k", "2", "--tokens", "256", "--seq-len", "32"]
    code, err = _run_cli(argv + extra, capsys)
    assert code == 2 and message in err


def test_cli_rejects_non_gated_model_and_unknown_yaml_key(tmp_path, capsys):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from dotmoe.paths import reference_model_dir

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=8192, n_embd=16, n_layer=1, n_head=2)).save_pretrained(gpt2)
    AutoTokenizer.from_pretrained(reference_model_dir()).save_pretrained(gpt2)
    code, err = _run_cli(["convert", "--model", str(gpt2), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "GPT2LMHeadModel has no gated MLP" in err

    (tmp_path / "c.yaml").write_text("experts: 4\ntop_kk: 2\n")
    code, err = _run_cli(["convert", "--config", str(tmp_path / "c.yaml")], capsys)
    assert code == 2 and "unknown config key 'top_kk'" in err and "did you mean 'top_k'" in err

    (tmp_path / "t.yaml").write_text("experts: eight\n")
    code, err = _run_cli(["convert", "--config", str(tmp_path / "t.yaml"), "--out", str(tmp_path / "t")], capsys)
    assert code == 2 and "experts must be int; got 'eight'" in err and not (tmp_path / "t").exists()

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    code, err = _run_cli(["convert", "--model", str(tmp_path / "bad")], capsys)
    assert code == 2 and "not valid JSON" in err


def test_config_values_are_type_checked_and_yaml_float_strings_are_read_as_floats(tmp_path):
    import pytest

    from dotmoe.config import ConvertConfig, load_yaml_config
    from dotmoe.errors import DotMoeError

    (tmp_path / "c.yaml").write_text("lr_weights: 1e-4\ntau_end: 1\n")  # YAML 1.1 reads 1e-4 as a string
    raw = load_yaml_config(tmp_path / "c.yaml")
    assert raw["lr_weights"] == "1e-4"
    cfg = ConvertConfig(**raw)
    assert cfg.lr_weights == 1e-4 and isinstance(cfg.lr_weights, float) and cfg.tau_end == 1.0
    for bad, message in [({"experts": "8"}, "experts must be int"), ({"top_k": True}, "top_k must be int"),
                         ({"lr_router": "fast"}, "lr_router must be float"), ({"resume": "yes"}, "resume must be bool"),
                         ({"data": "a.txt"}, "data must be list[str]"),
                         ({"capacities": [1, 2.5]}, "capacities must be list[int] or null")]:
        with pytest.raises(DotMoeError, match=message.replace("[", r"\[").replace("]", r"\]")):
            ConvertConfig(**bad)


@torch.no_grad()
def _mlp_inputs_one_sequence_at_a_time(model, mlps, batches):
    """Inputs of each MLP from full-model forwards of one sequence each (independent of convert's batched hooks)."""
    store = [[] for _ in mlps]
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: store[i].append(args[0].reshape(-1, args[0].shape[-1])))
             for i, m in enumerate(mlps)]
    for batch in batches:
        model(input_ids=batch.unsqueeze(0))
    for h in hooks:
        h.remove()
    return [torch.cat(s).float() for s in store]


def test_default_shared_and_dropped_columns_hold_the_budget_and_export_exactly(tiny_llama_dir, tiny_text, tmp_path):
    """The default structure: an always-on shared expert of the most important neurons and dropped least important
    ones, sized so the active FFN budget is exactly k/E; the export leaves the dropped neurons out and reproduces
    the training-time sparse forward."""
    import json

    from dotmoe.output_aware import neuron_importance
    from dotmoe.prepare import calibration_sequences, prepare

    cfg = _cfg(tiny_llama_dir, tiny_text, tmp_path / "o", shared_fraction=None, tokens=0, export_format="auto")
    result = convert(cfg, progress=False)
    s = result.summary
    n, e, k = s["intermediate_size"], s["experts"], s["top_k"]
    routed = s["capacities"][:e]
    assert s["shared"] > 0 and s["drop"] > 0 and s["capacities"][e:] == [s["shared"], s["drop"]]
    assert s["shared"] + k * routed[0] == n * k // e  # active neurons per token = k/E of the FFN
    for row in result.partition:
        assert torch.bincount(row, minlength=e + 2).tolist() == s["capacities"]
    # dropped = the least important neurons of each layer (the same calibration tokens as the conversion)
    prep = prepare(_cfg(tiny_llama_dir, tiny_text, tmp_path / "p", shared_fraction=None, tokens=0))
    inputs = _mlp_inputs_one_sequence_at_a_time(prep.model, prep.mlps, calibration_sequences(prep.seqs, cfg))
    for layer, (mlp, x) in enumerate(zip(prep.mlps, inputs)):
        least = set(neuron_importance(mlp, x).argsort()[: s["drop"]].tolist())
        assert set((result.partition[layer] == e + 1).nonzero().flatten().tolist()) == least
    exported = json.loads((tmp_path / "o" / "model" / "config.json").read_text())
    parity = json.loads((tmp_path / "o" / "model" / "parity.json").read_text())
    assert exported["shared_expert_intermediate_size"] == s["shared"]
    assert parity["max_abs_logit_diff"] < 1e-5 and parity["top1_agreement"] == 1.0


def test_lr_affinity_zero_trains_with_the_starting_partition_frozen(tiny_llama_dir, tiny_text, tmp_path):
    """The paper's ablation: the same training with the initial partition frozen (router and weights still train)."""
    free = convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "free", tokens=0), progress=False)
    # keep_best off: the runs end where training took them (not at a better start)
    learned = convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "learned", lr_affinity=20.0, keep_best=False),
                      progress=False)
    frozen = convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "frozen", lr_affinity=0.0, keep_best=False),
                     progress=False)
    assert torch.equal(frozen.partition, free.partition)
    assert not torch.equal(learned.partition, free.partition)  # a learned assignment moves neurons at this rate
    assert not torch.equal(load_conversion(tmp_path / "frozen").routers[0], load_conversion(tmp_path / "free").routers[0])
    with pytest.raises(DotMoeError, match="init_affinity random has none"):
        ConvertConfig(lr_affinity=0.0, init_affinity="random")


def _live_tensor_bytes() -> int:
    """Bytes of every distinct tensor storage Python still references (after a collection)."""
    import gc

    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_a_joint_run_holds_at_most_one_model_copy_when_its_export_begins(tiny_llama_dir, tiny_text, tmp_path,
                                                                          monkeypatch):
    """The export loads two models of its own to check parity: by then the run has let go of its student, teacher,
    optimizer state and snapshots (JointFinish._release), holding at most one fp32 model's worth of tensors."""
    from transformers import AutoModelForCausalLM

    import dotmoe.joint_finish as joint_finish

    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model_bytes = sum(p.numel() * 4 for p in dense.parameters())
    del dense
    before, held = _live_tensor_bytes(), []
    original = joint_finish.export_and_record
    monkeypatch.setattr(joint_finish, "export_and_record",
                        lambda *a, **k: held.append(_live_tensor_bytes() - before) or original(*a, **k))
    convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "o", trainable="full"), progress=False)
    assert len(held) == 1 and held[0] <= model_bytes, (held, model_bytes)
