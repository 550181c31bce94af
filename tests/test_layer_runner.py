"""Layer-by-layer calibration (dotmoe.layer_runner): the stacked layer calls reproduce the model's own forward, and
the per-layer FFN inputs are the ones a whole-model forward gives the FFNs."""

from __future__ import annotations

import pytest
import torch


def _qwen2(tmp_path, attn: str = "sdpa"):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      use_sliding_window=True, sliding_window=8, max_window_layers=1)
    cfg._attn_implementation = attn
    return Qwen2ForCausalLM(cfg).eval()


def _load(path, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()


@pytest.mark.parametrize("kind", ["llama", "llama-eager", "qwen2-sliding", "gemma3"])
def test_stacked_layers_reproduce_the_decoder(kind, tiny_llama_dir, tiny_gemma3_dir, tmp_path):
    """The last layer's output, through the final norm, equals decoder(input_ids).last_hidden_state: masks (causal,
    sliding window 8 < 24 tokens, eager attention's explicit mask), position embeddings per layer type and the
    embedding scale are those of the model's own forward. Chunks of 2 sequences: chunking changes nothing."""
    from dotmoe.layer_runner import LayerRunner

    model = {"llama": lambda: _load(tiny_llama_dir), "llama-eager": lambda: _load(tiny_llama_dir, "eager"),
             "qwen2-sliding": lambda: _qwen2(tmp_path), "gemma3": lambda: _load(tiny_gemma3_dir)}[kind]()
    if kind == "qwen2-sliding":
        assert "sliding_attention" in model.config.layer_types
    decoder = model.get_decoder()
    ids = torch.randint(0, 300, (5, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = decoder(input_ids=ids).last_hidden_state
        runner = LayerRunner(decoder, ids, chunk=2)
        hidden = runner.hidden
        for i in range(len(runner)):
            hidden = runner.run(i, hidden)
        ours = decoder.norm(hidden)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    if kind == "gemma3":  # a wrong mask or RoPE base must show: not equal to the full-causal, one-RoPE forward
        assert (reference[:, 8:] - reference[:, 8:].mean()).abs().max() > 1e-2


def test_map_layer_inputs_sees_the_whole_model_forward_inputs(tiny_gemma3_dir):
    from dotmoe.architecture import find_gated_mlps
    from dotmoe.layer_runner import map_layer_inputs

    model = _load(tiny_gemma3_dir)
    mlps = [m for _, m in find_gated_mlps(model)]
    ids = torch.randint(0, 300, (5, 24), generator=torch.Generator().manual_seed(2))
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: seen.append(a[0].reshape(-1, a[0].shape[-1]))) for m in mlps]
    with torch.no_grad():
        model.get_decoder()(input_ids=ids)
    for h in hooks:
        h.remove()
    got = map_layer_inputs(model, mlps, ids, lambda i, x: (i, x), chunk=3)
    assert [i for i, _ in got] == list(range(len(mlps)))
    for (_, x), ref in zip(got, seen):
        torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)


def test_feed_gives_the_ffn_inputs_and_skips_the_ffn(tiny_gemma3_dir):
    """`LayerRunner.feed` hands over the same FFN inputs as a full run (`run_capturing`), chunk by chunk, and the
    FFN itself never runs (its output is not needed)."""
    from dotmoe.architecture import find_gated_mlps
    from dotmoe.layer_runner import LayerRunner

    model = _load(tiny_gemma3_dir)
    mlps = [m for _, m in find_gated_mlps(model)]
    ids = torch.randint(0, 300, (5, 24), generator=torch.Generator().manual_seed(3))
    runner = LayerRunner(model.get_decoder(), ids, chunk=2)
    calls = []
    counter = mlps[1].register_forward_hook(lambda m, a, out: calls.append(1))
    hidden = runner.run(0, runner.hidden)
    _, want = runner.run_capturing(1, hidden, mlps[1])
    assert len(calls) == 3  # run_capturing runs the FFN: 3 chunks of <= 2 sequences
    got = []
    runner.feed(1, hidden, mlps[1], got.append)
    counter.remove()
    assert len(calls) == 3 and len(got) == 3
    torch.testing.assert_close(torch.cat(got).float(), want)
