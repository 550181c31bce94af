"""Memory of a training run, decided before it starts: does full training fit, and is activation checkpointing
needed. Estimates from the parameter count and the model config, not measurements: they err on the large side."""

from __future__ import annotations

import torch
from torch import nn

from dotmoe.architecture import find_gated_mlps
from dotmoe.errors import DotMoeError

# gradient_checkpointing auto turns checkpointing on when the estimate exceeds this share of the available memory
CHECKPOINT_ABOVE = 0.8


def available_memory(device: torch.device) -> int:
    """Bytes free for this run: the GPU's free memory on CUDA, what the OS reports as available elsewhere."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def state_bytes(cfg, model: nn.Module) -> int:
    """fp32 weights, the dense teacher's copy when weights train, and (gradients, 2 AdamW moments) of what trains."""
    total = sum(p.numel() for p in model.parameters())
    if not cfg.trains_weights:
        return 4 * total
    trained = total if cfg.trainable == "full" else sum(p.numel() for m in find_gated_mlps(model) for p in m[1].parameters())
    return 4 * total + 4 * total + 12 * trained


def activation_bytes(cfg, model: nn.Module) -> int | None:
    """Upper estimate of the activations one batch keeps for the backward without checkpointing: per token and
    layer ~12 hidden-sized and ~6 intermediate-sized fp32 tensors plus the attention probabilities (fp32 copies of
    autocast tensors included). None when the model config lacks the sizes."""
    conf = getattr(model.config, "text_config", model.config)
    try:
        layers, hidden = conf.num_hidden_layers, conf.hidden_size
        inter, heads = conf.intermediate_size, conf.num_attention_heads
    except AttributeError:
        return None
    per_token = 12 * hidden + 6 * inter + 2 * heads * cfg.seq_len
    return 4 * cfg.batch_size * cfg.seq_len * layers * per_token


def check_training_memory(cfg, model: nn.Module, available: int | None = None) -> None:
    """Before anything long starts: training the model's weights on the CPU fits in the memory available (fp32
    weights, their gradients and two AdamW moments for what trains, plus the dense teacher's copy), else a one-line
    error that says what to pass instead. `available` (bytes) defaults to what the OS reports as available."""
    if not cfg.steps or not cfg.trains_weights or next(model.parameters()).device.type != "cpu":
        return
    need = state_bytes(cfg, model)
    available = available_memory(torch.device("cpu")) if available is None else available
    if need > available:
        raise DotMoeError(f"training the model's weights (trainable {cfg.trainable}) needs about {need / 2**30:.1f} "
                          f"GiB of memory, {available / 2**30:.1f} GiB is available: pass --trainable "
                          "router+assignment (trains only the router and assignment), or --tokens 0 (training-free)")


def use_gradient_checkpointing(cfg, model: nn.Module, available: int | None = None) -> bool:
    """`gradient_checkpointing` resolved: as set, or (None) on only when the training state plus one batch's
    activations might not fit in CHECKPOINT_ABOVE of the available memory. Without it a step saves the recomputed
    forward of the student; with it the activations shrink by about the layer count."""
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing
    if not cfg.steps:
        return False
    acts = activation_bytes(cfg, model)
    if acts is None:
        return True
    available = available_memory(next(model.parameters()).device) if available is None else available
    return state_bytes(cfg, model) + acts > CHECKPOINT_ABOVE * available
