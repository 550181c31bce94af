"""Tiny random models and text for tests and benchmarks: real HF directories of gated-FFN models small enough to
convert in seconds, their training text, and a fake finished conversion of any dense model's shapes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dotmoe.artifacts import mark_complete, save_conversion
from dotmoe.paths import reference_model_dir
from dotmoe.record import ConversionRecord


def save_tiny_llama(path: Path, seed: int = 0, intermediate: int = 64, layers: int = 2) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(reference_model_dir())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_gemma3(path: Path, seed: int = 0, intermediate: int = 48, layers: int = 3) -> Path:
    """A tiny random Gemma-3 text model: sliding window 8 < seq_len on local layers, a global layer, scalar 16
    != head_dim for the query scaling, norm weights away from their zero init (the (1 + w) scaling matters) and
    weights 5x the default init, so logits are O(1-10) and a wrong computation shows."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(reference_model_dir())
    types = ["sliding_attention", "full_attention"] * layers
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=intermediate,
                           num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           max_position_embeddings=128, sliding_window=8, layer_types=types[:layers],
                           query_pre_attn_scalar=16, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                           pad_token_id=0)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.mul_(5)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_tiny_text(path: Path) -> Path:
    """6,000 words drawn (seed 0) from a small vocabulary: the tiny models' training and evaluation text."""
    words = ("the python tutorial explains lists tuples dictionaries classes modules functions and the standard "
             "library with many small examples of code ").split()
    g = torch.Generator().manual_seed(0)
    path.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (6000,), generator=g).tolist()))
    return path


def fake_conversion(model_dir, out, experts=4, top_k=2, gating="softmax", shared=0, capacities=None, seed=0):
    """A convert output with a random balanced partition and random (sharp) routers for the model's shapes."""
    dense = json.loads((model_dir / "config.json").read_text())
    neurons, hidden, layers = dense["intermediate_size"], dense["hidden_size"], dense["num_hidden_layers"]
    g = torch.Generator().manual_seed(seed)
    caps = capacities or [(neurons - shared) // experts] * experts
    caps = caps + ([shared] if shared else [])
    ids = torch.repeat_interleave(torch.arange(len(caps)), torch.tensor(caps))
    partition = torch.stack([ids[torch.randperm(neurons, generator=g)] for _ in range(layers)])
    routers = [torch.randn(experts, hidden, generator=g) for _ in range(layers)]
    record = ConversionRecord(method="dotmoe", experts=experts, top_k=top_k, shared=shared, gating=gating,
                              capacities=caps, intermediate_size=neurons, num_layers=layers,
                              mlp_modules=[f"model.layers.{i}.mlp" for i in range(layers)], base_model=str(model_dir))
    out.mkdir(parents=True)
    save_conversion(out, partition, routers, record)
    mark_complete(out)
    return out
