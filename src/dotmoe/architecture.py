"""Load a dense causal LM safely and find its gated MLPs (gate_proj / up_proj / down_proj + act_fn)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dotmoe.errors import DotMoeError


# config.json keys that only a Mixture-of-Experts model has (Qwen2/3-MoE, Mixtral, DeepSeek, OLMoE, ...)
MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok",
                   "moe_intermediate_size")


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


def check_model_dir(path: str | Path, require_dense: bool = False) -> Path:
    """A local HF model directory with a valid config.json and safetensors weights, or a one-line error.

    A `.gguf` file stands for its dequantized, cached HF directory (`dotmoe.gguf_input`), which is returned.
    `require_dense`: refuse a model that is already a Mixture-of-Experts (what `convert` takes).
    """
    from dotmoe.gguf_input import resolve_model
    from dotmoe.guards import model_weight_files, read_head

    path = resolve_model(path)
    if path.is_file():
        gguf = read_head(path, 4) == b"GGUF"
        raise DotMoeError(f"--model {path} is a file, not a model directory" + (
            "; it is a GGUF file: name it *.gguf" if gguf else " (pass an HF model directory or a .gguf file)"))
    if not path.is_dir():
        raise DotMoeError(f"model directory not found: {path}" if not path.exists() else
                          f"--model {path} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DotMoeError(f"{config_file} is not a regular file" if config_file.exists() else
                          f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DotMoeError(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise DotMoeError(f"{config_file} is not a JSON object")
    if config.get("model_type") == "gemma3" and "text_config" in config:
        raise DotMoeError(f"{path} is a multimodal Gemma3ForConditionalGeneration; dotmoe converts its text model: "
                          "save it as a Gemma3ForCausalLM directory (model_type gemma3_text) and pass that")
    model_type = str(config.get("model_type", ""))
    moe_keys = [k for k in MOE_CONFIG_KEYS if config.get(k)]
    is_moe = moe_keys or "dotmoe" in config or "moe" in model_type or model_type in ("mixtral", "dbrx", "deepseek_v3")
    if require_dense and is_moe:
        why = f"{moe_keys[0]} = {config[moe_keys[0]]}" if moe_keys else f"model_type {model_type!r}"
        raise DotMoeError(f"{path} is already a Mixture-of-Experts model ({why}); dotmoe converts dense models")
    check_weight_dtypes(path, model_weight_files(path))  # its own weight files (never a stray *.safetensors beside
    return path                                          # them) exist, are readable and of one precision


FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def check_weight_dtypes(path: Path, files: list[Path]) -> None:
    """The floating-point weights are stored in one precision: a tensor of another (an fp16 projection among fp32
    weights) is a damaged or hand-edited checkpoint; transformers would cast it silently and every number
    computed from the model would be the damaged one's. Reads the safetensors headers only."""
    import struct
    from collections import Counter

    dtypes: dict[str, str] = {}
    for f in files:
        try:
            with f.open("rb") as fh:
                size = struct.unpack("<Q", fh.read(8))[0]
                header = json.loads(fh.read(size)) if size < 100 * 2**20 else {}
        except (OSError, struct.error, ValueError, UnicodeDecodeError):
            continue  # unreadable headers are reported by the loader, naming the file
        dtypes.update({k: FLOAT_DTYPES[v["dtype"]] for k, v in header.items()
                       if isinstance(v, dict) and v.get("dtype") in FLOAT_DTYPES})
    if len(set(dtypes.values())) < 2:
        return
    common = Counter(dtypes.values()).most_common(1)[0][0]
    odd = sorted(k for k, v in dtypes.items() if v != common)
    more = f" and {len(odd) - 3} more" if len(odd) > 3 else ""
    raise DotMoeError(f"{len(odd)} weight tensor(s) in {path} stored in another precision than the other "
                      f"{len(dtypes) - len(odd)} ({common}): {', '.join(f'{k} ({dtypes[k]})' for k in odd[:3])}{more}; "
                      "a damaged or edited checkpoint (save every weight in one dtype)")


def from_pretrained_checked(path: Path, dtype: torch.dtype, trust_remote_code: bool = False, **kwargs):
    """`AutoModelForCausalLM.from_pretrained` (safetensors only) with its load report replaced by one line: a
    missing, unexpected or wrong-shaped tensor is an error, never a silently re-initialised weight."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report is replaced by check_loaded_weights' one line
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                           trust_remote_code=trust_remote_code,
                                                           ignore_mismatched_sizes=True, output_loading_info=True,
                                                           **kwargs)
    except ValueError as exc:
        raise DotMoeError(f"cannot load {path} as a causal LM: {str(exc).splitlines()[0]}") from exc
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise DotMoeError(f"cannot read model weights in {path}: {str(exc).splitlines()[0]}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    check_loaded_weights(path, info.get("missing_keys", ()), info.get("unexpected_keys", ()),
                         [k[0] for k in info.get("mismatched_keys", ())])
    return model


def check_loaded_weights(path: Path, missing, unexpected, mismatched=()) -> None:
    """The checkpoint's tensors are exactly the model's: a missing, unexpected or wrong-shaped tensor (a damaged
    directory, or a config.json of another architecture or size than the weights) would be re-initialised or
    dropped and the conversion would run on a different model than the one asked for."""
    unexpected = [k for k in unexpected if not k.endswith("rotary_emb.inv_freq")]  # a buffer old checkpoints kept
    for label, keys in (("missing from", missing), ("of the wrong shape in", mismatched),
                        ("in the checkpoint but not in the model of config.json, in", unexpected)):
        keys = sorted(keys)
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise DotMoeError(f"{len(keys)} weight tensor(s) {label} {path}: {', '.join(keys[:3])}{more}; the "
                              "weights and config.json do not describe the same model")


def check_checkpoint_names(path: Path, model: nn.Module, names) -> None:
    """`check_loaded_weights` for a model built from its config (the layer-wise mode streams the weights)."""
    expected = {n for n, _ in model.named_parameters()}  # tied weights once (the embedding)
    names = set(names)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    check_loaded_weights(path, expected - names, names - expected - tied)


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                   require_dense: bool = False):
    """Load model + tokenizer from a local HF directory (or a `.gguf` file) with one-line errors for bad input.

    Only safetensors weights are accepted (no pickle), and remote code runs only when asked for.
    """
    from transformers import AutoTokenizer

    path = check_model_dir(path, require_dense)
    model = from_pretrained_checked(path, dtype, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # tokenizers raise many exception types
        raise DotMoeError(f"cannot load the tokenizer in {path}: {' '.join(str(exc).split())[:400]}") from exc
    if len(tokenizer) > model.config.vocab_size:
        raise DotMoeError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                          f"{model.config.vocab_size}")
    return model, tokenizer
