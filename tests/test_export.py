"""Export: stock MoE checkpoints reload with plain transformers and reproduce the training-time sparse model."""

import json

import pytest
import torch

from dotmoe.errors import DotMoeError
from dotmoe.export import export
from dotmoe.export_formats import plan_export
from dotmoe.paths import reference_model_dir
from dotmoe.sparse_model import load_sparse_model
from dotmoe_dev.tiny_models import fake_conversion  # noqa: F401


def save_tiny(kind: str, path, seed: int = 0):
    """A tiny random dense model of the given family, saved with its tokenizer."""
    import transformers
    from transformers import AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(reference_model_dir())
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg = {"llama": lambda: transformers.LlamaConfig(**common, tie_word_embeddings=True),
           "mistral": lambda: transformers.MistralConfig(**common, tie_word_embeddings=False, sliding_window=None),
           "qwen2": lambda: transformers.Qwen2Config(**common, tie_word_embeddings=False),
           "qwen3": lambda: transformers.Qwen3Config(**common, head_dim=8, tie_word_embeddings=True)}[kind]()
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # make biases non-trivial so their copy is tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def logits_of_export(out, ids, remote=False):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=remote).eval()
    with torch.no_grad():
        return model, model(input_ids=ids).logits


def assert_every_experts_kernel_agrees(model, ids, logits):
    """`dotmoe bench speed` switches the experts kernel of an export (transformers decides whether a class allows
    that by reading its source file, so a custom class must say so itself); every kernel computes `logits`."""
    import dotmoe.fast_experts  # noqa: F401  registers "dotmoe_gather"
    from dotmoe.speed import EXPERT_IMPLEMENTATIONS

    for impl in EXPERT_IMPLEMENTATIONS:
        model.set_experts_implementation(impl)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=1e-4, atol=1e-4)
    model.set_experts_implementation(EXPERT_IMPLEMENTATIONS[0])


CASES = [  # family, gating, k, shared, capacities, expected architecture
    ("llama", "softmax", 2, 0, None, "MixtralForCausalLM"),
    ("mistral", "mask", 1, 0, None, "MixtralForCausalLM"),
    ("llama", "softmax", 2, 0, [10, 12, 13, 13], "MixtralForCausalLM"),  # uneven: zero-padded experts
    ("qwen3", "softmax", 3, 0, None, "Qwen3MoeForCausalLM"),
    ("qwen2", "softmax", 2, 0, None, "Qwen2MoeForCausalLM"),  # shared expert of size 0, zero gate
    ("qwen2", "softmax", 2, 8, None, "Qwen2MoeForCausalLM"),
    ("llama", "softmax", 2, 8, None, "Qwen2MoeForCausalLM"),  # llama + shared -> Qwen2-MoE, qkv_bias=False
]


@pytest.mark.parametrize("family,gating,k,shared,caps,arch", CASES)
def test_stock_export_matches_training_time_sparse_forward(family, gating, k, shared, caps, arch, tmp_path):
    dense = save_tiny(family, tmp_path / "dense")
    conv = fake_conversion(dense, tmp_path / "conv", top_k=k, gating=gating, shared=shared, capacities=caps)
    result = export(conv, tmp_path / "moe", check_tokens=0, progress=False)
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["architectures"] == [arch] and "auto_map" not in cfg and result.plan.exact
    reference, _, _ = load_sparse_model(conv)
    ids = torch.randint(0, 8000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    model, got = logits_of_export(tmp_path / "moe", ids)
    diff = (expected - got).abs().max().item()
    print(f"{family} {gating} k={k} shared={shared} -> {arch}: max abs logit diff {diff:.2e}")
    assert diff < 1e-4
    generated = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9)


def test_mask_gating_k2_exact_in_custom_class_and_approximate_in_stock(tmp_path):
    dense = save_tiny("llama", tmp_path / "dense")
    conv = fake_conversion(dense, tmp_path / "conv", top_k=2, gating="mask")
    reference, _, _ = load_sparse_model(conv)
    ids = torch.randint(0, 8000, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits

    custom = export(conv, tmp_path / "custom", check_tokens=0, progress=False)
    assert custom.plan.custom and custom.plan.exact
    cfg = json.loads((tmp_path / "custom" / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_dotmoe.DotMoeForCausalLM"
    model, got = logits_of_export(tmp_path / "custom", ids, remote=True)
    assert type(model).__name__ == "DotMoeForCausalLM"
    assert (expected - got).abs().max().item() < 1e-4
    assert_every_experts_kernel_agrees(model, ids, got)
    assert model.generate(ids[:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)

    approx = export(conv, tmp_path / "stock", fmt="mixtral", check_tokens=64, progress=False)
    assert not approx.plan.exact and "APPROXIMATION" in approx.plan.note
    _, stock = logits_of_export(tmp_path / "stock", ids)
    assert (expected - stock).abs().max().item() > 1e-3  # it really is a different function
    # the recorded parity is this export's, measured again here on the text the check reads (64 validation tokens)
    from dotmoe.data import load_texts, tokenize_stream
    from dotmoe.paths import default_data_file

    _, tokenizer, _ = load_sparse_model(conv)
    text = load_texts([str(default_data_file("validation", str(dense)))])
    check_ids = tokenize_stream(tokenizer, text, 64).unsqueeze(0)
    with torch.no_grad():
        a = reference(input_ids=check_ids).logits
        _, b = logits_of_export(tmp_path / "stock", check_ids)
    assert approx.parity["tokens"] == 64
    assert approx.parity["max_abs_logit_diff"] == pytest.approx((a - b).abs().max().item(), rel=1e-3)
    assert approx.parity["top1_agreement"] == pytest.approx((a.argmax(-1) == b.argmax(-1)).float().mean().item())


def test_parameter_counts_follow_hf_convention(tmp_path):
    dense = save_tiny("llama", tmp_path / "dense")
    conv = fake_conversion(dense, tmp_path / "conv", experts=4, top_k=1)
    result = export(conv, tmp_path / "moe", check_tokens=0, progress=False)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe")
    total = sum(p.numel() for p in model.parameters())  # tied embedding counted once
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    embed = model.get_input_embeddings().weight.numel()
    assert result.params["total_params"] == total
    assert result.params["active_params"] == total - experts + experts // 4
    assert result.params["active_non_embedding_params"] == total - experts + experts // 4 - embed
    card = (tmp_path / "moe" / "README.md").read_text()
    assert f"{total:,}" in card


def test_reference_model_export_reports_parity(tmp_path):
    conv = fake_conversion(reference_model_dir(), tmp_path / "conv", experts=8, top_k=2)
    result = export(conv, tmp_path / "moe", check_tokens=128, progress=False)
    assert result.parity["max_abs_logit_diff"] < 1e-3 and result.parity["top1_agreement"] == 1.0
    assert json.loads((tmp_path / "moe" / "parity.json").read_text()) == result.parity


def test_bad_input_writes_nothing(tmp_path):
    dense = save_tiny("llama", tmp_path / "dense")
    with pytest.raises(DotMoeError, match="not a complete dotmoe convert output"):
        export(tmp_path / "nothing", tmp_path / "out1", progress=False)
    conv = fake_conversion(dense, tmp_path / "conv")
    (conv / "assignment.safetensors").write_bytes(b"garbage")
    with pytest.raises(DotMoeError, match="corrupt"):
        export(conv, tmp_path / "out2", progress=False)
    conv = fake_conversion(dense, tmp_path / "conv2")
    with pytest.raises(DotMoeError, match="qwen3_moe"):
        export(conv, tmp_path / "out3", fmt="qwen3_moe", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    for overwrite in (False, True):  # a directory with files dotmoe did not write: never replaced
        with pytest.raises(DotMoeError, match=r"holds files that dotmoe did not write or that changed since \(x\)"):
            export(conv, tmp_path / "busy", progress=False, overwrite=overwrite)
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()
    assert not list(tmp_path.glob(".*tmp*"))


def test_failure_mid_export_removes_the_temporary_directory(tmp_path, monkeypatch):
    dense = save_tiny("llama", tmp_path / "dense")
    conv = fake_conversion(dense, tmp_path / "conv")
    import dotmoe.export as ex

    def broken(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(ex, "save_file", broken)
    with pytest.raises(OSError):
        export(conv, tmp_path / "moe", progress=False)
    assert not (tmp_path / "moe").exists() and not list(tmp_path.glob(".moe*"))


def test_unsupported_architectures_are_named():
    with pytest.raises(DotMoeError, match="gpt_neox"):
        plan_export({"model_type": "gpt_neox"}, "auto", 0, "softmax", 2)
    with pytest.raises(DotMoeError, match="shared expert"):
        plan_export({"model_type": "qwen3"}, "auto", 8, "softmax", 2)
    with pytest.raises(DotMoeError, match="bias"):
        plan_export({"model_type": "llama", "attention_bias": True}, "auto", 0, "softmax", 2)
    with pytest.raises(DotMoeError, match="--format"):
        plan_export({"model_type": "llama"}, "gguf", 0, "softmax", 2)


def test_convert_exports_trained_expert_weights_exactly(tiny_llama_dir, tiny_text, tmp_path):
    from dotmoe.config import ConvertConfig
    from dotmoe.convert import convert

    cfg = ConvertConfig(shared_fraction=0.0, model=str(tiny_llama_dir), data=[str(tiny_text)], eval_data=[str(tiny_text)],
                        out=str(tmp_path / "conv"), experts=4, top_k=2, tokens=4 * 4 * 32, seq_len=32, batch_size=4,
                        eval_tokens=256, calib_tokens=256, trainable="experts", lr_weights=1e-2, seed=0)
    summary = convert(cfg, progress=False).summary
    assert (tmp_path / "conv" / "trained_weights.safetensors").is_file()
    assert summary["export"]["architecture"] == "MixtralForCausalLM"
    assert summary["export"]["parity"]["max_abs_logit_diff"] < 1e-4
    # the trained weights really differ from the dense ones, and the export carries them
    from safetensors.torch import load_file

    trained = load_file(str(tmp_path / "conv" / "trained_weights.safetensors"))
    dense = load_file(str(tiny_llama_dir / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    assert (trained[name] - dense[name]).abs().max() > 1e-4


def test_sharded_export_writes_an_index_and_reloads(tmp_path):
    dense = save_tiny("qwen3", tmp_path / "dense")
    conv = fake_conversion(dense, tmp_path / "conv")
    export(conv, tmp_path / "moe", max_shard_bytes=20_000, check_tokens=0, progress=False)
    index = json.loads((tmp_path / "moe" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "moe" / s).is_file() for s in shards)
    reference, _, _ = load_sparse_model(conv)
    ids = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    _, got = logits_of_export(tmp_path / "moe", ids)
    assert (expected - got).abs().max().item() < 1e-4


def test_a_tied_head_is_written_out_for_qwen2_moe_only(tmp_path):
    """llama.cpp's qwen2moe loader requires output.weight (its llama and qwen3moe loaders fall back to the token
    embedding): a tied dense model's Qwen2-MoE export holds lm_head.weight, a copy of the embedding, and says
    tie_word_embeddings false, and still reloads to the training-time sparse model's logits; the Mixtral export
    stays tied."""
    from safetensors import safe_open

    dense = save_tiny("llama", tmp_path / "dense")
    for fmt, shared in (("qwen2_moe", 8), ("mixtral", 0)):
        conv = fake_conversion(dense, tmp_path / f"conv-{fmt}", experts=4, top_k=2, shared=shared)
        out = tmp_path / fmt
        result = export(conv, out, fmt=fmt, check_tokens=32, progress=False)
        tensors = {}
        for shard in out.glob("*.safetensors"):
            with safe_open(shard, "pt") as fh:
                tensors.update({k: fh.get_tensor(k) for k in fh.keys()})
        cfg = json.loads((out / "config.json").read_text())
        if fmt == "qwen2_moe":
            assert cfg["tie_word_embeddings"] is False and result.params["tied_embeddings"] == 0
            assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
        else:
            assert cfg["tie_word_embeddings"] is True and "lm_head.weight" not in tensors
        assert result.parity["max_abs_logit_diff"] < 1e-4 and result.parity["top1_agreement"] == 1.0
