"""Shared fixtures: tiny random gated-FFN models saved as real HF directories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dotmoe.paths import reference_model_dir


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


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.txt"
    words = ("the python tutorial explains lists tuples dictionaries classes modules functions and the standard "
             "library with many small examples of code ").split()
    g = torch.Generator().manual_seed(0)
    path.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (6000,), generator=g).tolist()))
    return path
