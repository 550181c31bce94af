"""Why a Gemma-3 MoE is not exported as transformers' Gemma-4 MoE: the best weight mapping, measured.

    PYTHONPATH=src:tests python benchmarks/gemma4_mapping.py

A tiny random Gemma-3 (2 layers: sliding + global, as Gemma-4 forces the last layer global) gets a random
conversion (E=4, k=2, softmax gating, no shared expert), and the training-time sparse model (dotmoe.sparse_model)
is compared with `Gemma4ForCausalLM(enable_moe_block=True)` carrying the best mapping we know:
(1 + w) norms -> w; query scaling query_pre_attn_scalar^-0.5 folded into q_norm (Gemma-4's attention scale is 1);
the parallel dense MLP zeroed (its RMS-normalised output is then 0); the MoE branch's own post-norm set to 1 (a
pure RMS normalisation, which the following post-FFN norm absorbs up to eps); the router's input scale set to
(1 + w_pre) sqrt(d) so that it sees the training router's input; k in per_expert_scale. The remaining mismatch
is Gemma-4's value normalisation (`v_norm`, no weight), which Gemma-3 has not and no weight can undo, and the MoE
branch's own RMS normalisation, exact only up to eps. The script prints the logit difference of the stock class,
then with `v_norm` replaced by the identity, then with the branch norm removed too (both not stock: to show these
are the only gaps). Results: benchmarks/results/gemma_export.md.
"""

import json
import tempfile
from pathlib import Path

import torch


def main() -> None:
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    from dotmoe.sparse_model import load_sparse_model
    from dotmoe_dev.tiny_models import fake_conversion, save_tiny_gemma3

    tmp = Path(tempfile.mkdtemp())
    dense_dir = save_tiny_gemma3(tmp / "dense", layers=2)
    conv = fake_conversion(dense_dir, tmp / "conv", experts=4, top_k=2, gating="softmax")
    reference, _, c = load_sparse_model(conv)
    g3 = json.loads((dense_dir / "config.json").read_text())
    E, k, d = c.meta["experts"], c.meta["top_k"], g3["hidden_size"]
    size = c.meta["capacities"][0]
    cfg = Gemma4TextConfig(
        vocab_size=g3["vocab_size"], hidden_size=d, intermediate_size=8, num_hidden_layers=g3["num_hidden_layers"],
        num_attention_heads=g3["num_attention_heads"], num_key_value_heads=g3["num_key_value_heads"],
        head_dim=g3["head_dim"], global_head_dim=g3["head_dim"], hidden_activation=g3["hidden_activation"],
        max_position_embeddings=g3["max_position_embeddings"], rms_norm_eps=g3["rms_norm_eps"],
        sliding_window=g3["sliding_window"], layer_types=g3["layer_types"], rope_parameters=g3["rope_parameters"],
        hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=E, top_k_experts=k,
        moe_intermediate_size=size, tie_word_embeddings=True, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    g4 = Gemma4ForCausalLM(cfg).eval()
    src = {n: p.detach() for n, p in reference.named_parameters()}
    one_plus = lambda name: 1.0 + src[name]  # noqa: E731
    state = {"model.embed_tokens.weight": src["model.embed_tokens.weight"],
             "model.norm.weight": one_plus("model.norm.weight")}
    scale_q = g3["query_pre_attn_scalar"] ** -0.5
    for i in range(cfg.num_hidden_layers):
        a, b = f"model.layers.{i}.", f"model.layers.{i}."
        for w in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[b + f"self_attn.{w}.weight"] = src[a + f"self_attn.{w}.weight"]
        state[b + "self_attn.q_norm.weight"] = one_plus(a + "self_attn.q_norm.weight") * scale_q
        state[b + "self_attn.k_norm.weight"] = one_plus(a + "self_attn.k_norm.weight")
        for n in ("input_layernorm", "post_attention_layernorm", "post_feedforward_layernorm"):
            state[b + f"{n}.weight"] = one_plus(a + f"{n}.weight")
        pre = one_plus(a + "pre_feedforward_layernorm.weight")
        state[b + "pre_feedforward_layernorm.weight"] = pre
        state[b + "pre_feedforward_layernorm_2.weight"] = pre
        state[b + "post_feedforward_layernorm_1.weight"] = torch.ones(d)
        state[b + "post_feedforward_layernorm_2.weight"] = torch.ones(d)
        for w in ("gate_proj", "up_proj", "down_proj"):  # the parallel dense MLP: zero
            state[b + f"mlp.{w}.weight"] = torch.zeros_like(g4.get_parameter(b + f"mlp.{w}.weight"))
        state[b + "layer_scalar"] = torch.ones(1)
        state[b + "router.proj.weight"] = c.routers[i]
        state[b + "router.scale"] = pre * d**0.5
        state[b + "router.per_expert_scale"] = torch.full((E,), float(k))
        gate, up = src[a + "mlp.dense.gate_proj.weight"], src[a + "mlp.dense.up_proj.weight"]
        down = src[a + "mlp.dense.down_proj.weight"]
        neurons = [(c.partition[i] == e).nonzero().flatten() for e in range(E)]
        state[b + "experts.gate_up_proj"] = torch.stack([torch.cat([gate[n], up[n]]) for n in neurons])
        state[b + "experts.down_proj"] = torch.stack([down[:, n] for n in neurons])
    missing, unexpected = g4.load_state_dict(state, strict=False)
    assert not unexpected and all(m.endswith("lm_head.weight") for m in missing), (missing, unexpected)
    g4.tie_weights()

    ids = torch.randint(0, 8000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        with_vnorm = g4(input_ids=ids).logits
        for layer in g4.model.layers:
            layer.self_attn.v_norm.forward = lambda x: x
        without_vnorm = g4(input_ids=ids).logits
        for layer in g4.model.layers:
            layer.post_feedforward_layernorm_2.forward = lambda x: x
        neither = g4(input_ids=ids).logits
    print(f"max |logit| of the training-time model: {expected.abs().max():.3f}")
    print(f"Gemma4ForCausalLM, best mapping:              max |dlogit| {(expected - with_vnorm).abs().max():.3e}, "
          f"top-1 agreement {(expected.argmax(-1) == with_vnorm.argmax(-1)).float().mean():.3f}")
    print(f"same, v_norm replaced by identity (not stock): max |dlogit| {(expected - without_vnorm).abs().max():.3e}")
    print(f"and the MoE branch's own post-norm too:        max |dlogit| {(expected - neither).abs().max():.3e}")


if __name__ == "__main__":
    main()
