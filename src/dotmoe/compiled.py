"""torch.compile for training: the decoder layers of the student and of the frozen teacher.

A training step's matmuls already run near the kernels' peak; much of the rest is elementwise work between them
(RMSNorm, rotary embeddings, autocast's casts, the FFN's act * up * gates), which eager PyTorch runs as separate passes
over memory and inductor fuses. SmolLM2-135M (E=8/k=2, bf16 autocast, batch 8 x 256, 2 threads of an AMD EPYC with
AVX512-BF16): 11.9 s a step eager, 8.2 s compiled (`benchmarks/train_step_profile.py [--compile]`). The loss's
chunked log-softmaxes over the vocabulary stay eager: a compiled fp32 version of them was no faster (8.2 s).
Compiling costs about a minute at the first steps, so `compile` (auto) is on only for runs long enough to repay it.
"""

from __future__ import annotations

import shutil

import torch
from torch import nn

# auto compiles runs long enough to repay about a minute of compiling: at least this many optimizer steps of a model
# at least this large (SmolLM2-135M saves ~3.7 s a step; the bundled 10M model's steps take well under a second)
COMPILE_MIN_STEPS = 64
COMPILE_MIN_PARAMS = 50_000_000


def compile_by_default(steps: int, num_params: int, num_processes: int, device: torch.device) -> bool:
    """`compile: auto`: a single-process run of at least COMPILE_MIN_STEPS steps of a model of at least
    COMPILE_MIN_PARAMS parameters, on CUDA or on a CPU with a C++ compiler (inductor's CPU code is C++)."""
    if steps < COMPILE_MIN_STEPS or num_params < COMPILE_MIN_PARAMS or num_processes > 1:
        return False
    return device.type == "cuda" or any(shutil.which(cc) for cc in ("g++", "c++", "clang++"))


def compile_decoder_layers(*models: nn.Module) -> None:
    """Compile every decoder layer of `models` in place (`nn.Module.compile`: the state dict keeps its names).

    The layers of a model share one compiled graph per kind (parameters are graph inputs); dynamo's default cache
    of 8 entries per code object would stop compiling after 8 layers (train and eval, student and teacher, Gemma's
    two attention kinds), so the limits are raised for this process; a layer inductor cannot compile (an unusual
    architecture, a broken C++ toolchain) falls back to eager instead of failing the run."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly (a warning), not fails
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 4096)
    for model in models:
        for layer in model.get_decoder().layers:
            layer.compile(dynamic=False)
