"""Gemma-3 (GeGLU tanh, (1 + w) sandwich norms, sqrt(d) embedding scale, sliding-window/global layers):
conversion with every method, the layer-wise mode, and the exact custom-class export."""

import json

import pytest
import torch
from test_export import assert_every_experts_kernel_agrees, fake_conversion

from dotmoe.config import ConvertConfig
from dotmoe.errors import DotMoeError
from dotmoe.export import export
from dotmoe.export_formats import plan_export
from dotmoe.sparse_model import load_sparse_model
from dotmoe.convert import convert

EXPORT_CASES = [  # gating, k, shared
    ("softmax", 1, 0), ("softmax", 2, 0), ("mask", 1, 0), ("mask", 3, 0),
    ("softmax", 2, 8), ("mask", 2, 8),
]


@pytest.mark.parametrize("gating,k,shared", EXPORT_CASES)
def test_gemma3_export_reloads_to_the_training_time_sparse_forward(gating, k, shared, tiny_gemma3_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from dotmoe.evaluate import router_statistics

    conv = fake_conversion(tiny_gemma3_dir, tmp_path / "conv", top_k=k, gating=gating, shared=shared)
    result = export(conv, tmp_path / "moe", check_tokens=0, progress=False)
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert result.plan.custom and result.plan.exact and cfg["architectures"] == ["DotMoeForCausalLM"]
    assert cfg["model_type"] == "dotmoe_gemma3_moe" and cfg["dotmoe_gating"] == gating
    reference, _, _ = load_sparse_model(conv)
    ids = torch.randint(0, 8000, (2, 24), generator=torch.Generator().manual_seed(1))  # 24 > sliding window 8
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32, trust_remote_code=True).eval()
    assert type(model).__name__ == "DotMoeForCausalLM"
    with torch.no_grad():
        got = model(input_ids=ids).logits
    diff = (expected - got).abs().max().item()
    print(f"gemma3 {gating} k={k} shared={shared}: max abs logit diff {diff:.2e} (logits up to "
          f"{expected.abs().max():.2f})")
    assert diff < 1e-5 and expected.abs().max() > 1
    assert_every_experts_kernel_agrees(model, ids, got)
    from dotmoe.speed import EXPERT_IMPLEMENTATIONS, load

    loaded = load(tmp_path / "moe", torch.float32, "cpu", EXPERT_IMPLEMENTATIONS[0], trust_remote_code=True)
    assert type(loaded).__name__ == "DotMoeForCausalLM"
    # cached generation (sliding-window cache) agrees with the training-time model's greedy tokens
    out = model.generate(ids[:1, :6], max_new_tokens=12, do_sample=False)
    seq = ids[:1, :6]
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, reference(input_ids=seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)
    stats = router_statistics(model, ids)
    assert stats is not None and len(stats["load"]) == 3


def test_gemma3_export_refuses_stock_formats_and_softcapping():
    dense = {"model_type": "gemma3_text", "final_logit_softcapping": None}
    with pytest.raises(DotMoeError, match="only as 'dotmoe'.*no stock transformers class"):
        plan_export(dense, "mixtral", 0, "softmax", 2)
    assert plan_export(dense, "auto", 8, "mask", 2).custom
    with pytest.raises(DotMoeError, match="final_logit_softcapping"):
        plan_export({**dense, "final_logit_softcapping": 30.0}, "auto", 0, "softmax", 2)


@pytest.mark.parametrize("method", ["dotmoe", "random", "sequential", "weight-kmeans", "activation",
                                    "hidden-kmeans-router", "prune"])
def test_every_method_converts_and_exports_gemma3(method, tiny_gemma3_dir, tiny_text, tmp_path):
    cfg = ConvertConfig(model=str(tiny_gemma3_dir), data=[str(tiny_text)], eval_data=[str(tiny_text)],
                        out=str(tmp_path / "conv"), method=method, experts=4, top_k=2, tokens=2 * 4 * 32,
                        seq_len=32, batch_size=4, eval_tokens=256, calib_tokens=256, seed=0)
    summary = convert(cfg, progress=False).summary
    # the recorded validation PPL is the saved model's, recomputed here from its files
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dotmoe.data import load_texts, tokenize_stream
    from dotmoe.perplexity import perplexity

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "conv" / "model", trust_remote_code=method != "prune")
    ids = tokenize_stream(AutoTokenizer.from_pretrained(tmp_path / "conv" / "model"), load_texts([str(tiny_text)]),
                          256)
    assert summary["val_ppl"] == pytest.approx(perplexity(saved.eval(), ids, 32, 16), rel=1e-3)
    assert summary["val_ppl"] != pytest.approx(summary["dense_val_ppl"], rel=1e-3)  # it is not the dense model
    if method == "prune":
        assert json.loads((tmp_path / "conv" / "model" / "config.json").read_text())["architectures"] == \
            ["Gemma3ForCausalLM"]
        return
    assert summary["export"]["architecture"] == "DotMoeForCausalLM"
    assert summary["export"]["parity"]["max_abs_logit_diff"] < 1e-5
    assert summary["export"]["parity"]["top1_agreement"] == 1.0


def test_layerwise_gemma3_sees_the_dense_models_ffn_inputs(tiny_gemma3_dir, tiny_text, tmp_path, layer_inputs_seen):
    """Streamed layer by layer: per-layer-type RoPE, the sliding-window mask and the sqrt(d) embedding scale."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dotmoe.architecture import find_gated_mlps
    from dotmoe.data import load_texts, pack_sequences, tokenize_stream

    seen = layer_inputs_seen
    cfg = ConvertConfig(model=str(tiny_gemma3_dir), data=[str(tiny_text)], out=str(tmp_path / "lw"), experts=4,
                        top_k=2, mode="layerwise", layer_steps=3, seq_len=32, batch_size=4, calib_tokens=64, seed=0)
    convert(cfg, progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_gemma3_dir)
    seqs = pack_sequences(tokenize_stream(tok, load_texts([str(tiny_text)])), 32)
    calib = seqs[torch.randperm(len(seqs), generator=torch.Generator().manual_seed(1))][:2]
    dense = AutoModelForCausalLM.from_pretrained(tiny_gemma3_dir, dtype=torch.float32).eval()
    store = []
    hooks = [m.register_forward_hook(lambda mod, a, o: store.append((a[0].reshape(-1, a[0].shape[-1]),
                                                                     o.reshape(-1, o.shape[-1]))))
             for _, m in find_gated_mlps(dense)]
    with torch.no_grad():
        dense(input_ids=calib)
    for h in hooks:
        h.remove()
    assert len(seen) == len(store) == 3
    for (x, y), (x_ref, y_ref) in zip(seen, store):
        assert torch.allclose(x, x_ref, atol=1e-5) and torch.allclose(y, y_ref, atol=1e-5)
    assert (tmp_path / "lw" / "model" / "modeling_dotmoe.py").is_file()


def test_multimodal_gemma3_is_refused_with_one_line(tmp_path):
    from dotmoe.architecture import check_model_dir

    (tmp_path / "mm").mkdir()
    (tmp_path / "mm" / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {}}))
    with pytest.raises(DotMoeError, match="Gemma3ForConditionalGeneration.*gemma3_text"):
        check_model_dir(tmp_path / "mm")


def test_perplexity_batches_are_capped_by_logit_memory(tiny_llama_dir, monkeypatch):
    """A 262k vocabulary would make 16 windows of logits 4.3 GB: batches shrink, the perplexity does not change."""
    from transformers import AutoModelForCausalLM

    from dotmoe.perplexity import perplexity

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 8000, (2000,), generator=torch.Generator().manual_seed(0))
    sizes = []
    original = model.forward
    monkeypatch.setattr(model, "forward", lambda input_ids, **kw: sizes.append(len(input_ids)) or original(
        input_ids=input_ids, **kw))
    full = perplexity(model, ids, 256, 128)
    assert max(sizes) == 14  # all 14 full windows at once: 14 x 256 x 8192 x 4 B = 117 MB < 512 MiB
    sizes.clear()
    capped = perplexity(model, ids, 256, 128, max_logits_bytes=3 * 256 * 8192 * 4)
    assert max(sizes) == 3
    assert abs(capped - full) < 1e-4 * full
