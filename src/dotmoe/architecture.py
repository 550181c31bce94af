"""Load a dense causal LM safely and find its gated MLPs (gate_proj / up_proj / down_proj + act_fn)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dotmoe.errors import DotMoeError


def is_gated_mlp(module: nn.Module) -> bool:
    """True for a LLaMA-style gated MLP: down(act(gate(x)) * up(x))."""
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")) \
        and callable(getattr(module, "act_fn", None))


def ffn_activations(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP's neuron activations H = act(x W_gate) * (x W_up) [..., N], in the weights' dtype (x is cast
    to it: calibration keeps its inputs in fp32 while a bf16 model's weights are bf16)."""
    x = x.to(mlp.gate_proj.weight.dtype)
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


def find_gated_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All gated MLP modules in forward order; a clear error naming the class if there are none."""
    found = [(name, m) for name, m in model.named_modules() if is_gated_mlp(m)]
    if not found:
        raise DotMoeError(f"{type(model).__name__} has no gated MLP (gate_proj/up_proj/down_proj + act_fn); "
                          "dotmoe converts LLaMA/Mistral/Qwen2/Qwen3-style models")
    sizes = {m.gate_proj.out_features for _, m in found}
    if len(sizes) != 1:
        raise DotMoeError(f"gated MLPs of {type(model).__name__} have different intermediate sizes {sorted(sizes)}")
    return found


def check_model_dir(path: str | Path) -> Path:
    """A local HF model directory with a valid config.json and safetensors weights, or a one-line error.

    A `.gguf` file stands for its dequantized, cached HF directory (`dotmoe.gguf_input`), which is returned.
    """
    from dotmoe.gguf_input import resolve_model

    path = resolve_model(path)
    if not path.is_dir():
        raise DotMoeError(f"model directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DotMoeError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DotMoeError(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise DotMoeError(f"{config_file} is not a JSON object")
    if config.get("model_type") == "gemma3" and "text_config" in config:
        raise DotMoeError(f"{path} is a multimodal Gemma3ForConditionalGeneration; dotmoe converts its text model: "
                          "save it as a Gemma3ForCausalLM directory (model_type gemma3_text) and pass that")
    from dotmoe.guards import model_weight_files

    model_weight_files(path)  # its own weight files (never a stray *.safetensors beside them) exist and are readable
    return path


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Load model + tokenizer from a local HF directory (or a `.gguf` file) with one-line errors for bad input.

    Only safetensors weights are accepted (no pickle), and remote code runs only when asked for.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_dir(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise DotMoeError(f"cannot load {path} as a causal LM: {str(exc).splitlines()[0]}") from exc
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise DotMoeError(f"cannot read model weights in {path}: {str(exc).splitlines()[0]}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # tokenizers raise many exception types
        raise DotMoeError(f"cannot load the tokenizer in {path}: {str(exc).splitlines()[0]}") from exc
    if len(tokenizer) > model.config.vocab_size:
        raise DotMoeError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{model.config.vocab_size}")
    return model, tokenizer
