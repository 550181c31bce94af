"""The training-time sparse model of a conversion: dense weights + MoeMLP masks, rebuilt from its output dir.

This is the reference every export is checked against: it computes exactly what `dotmoe convert` trained.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from dotmoe.architecture import load_causal_lm
from dotmoe.artifacts import TRAINED_WEIGHTS_FILE, Conversion, load_conversion
from dotmoe.moe_mlp import install_moe
from dotmoe.rounding import one_hot_assignment


def load_sparse_model(convert_dir: str | Path, dtype: torch.dtype = torch.float32, round_to: torch.dtype | None = None,
                      require_complete: bool = True):
    """(model with MoeMLP layers using the saved hard partition and routers, tokenizer, conversion).

    `round_to` rounds routers and trained weights through that dtype first (to mirror an export in bf16).
    """
    conv = load_conversion(convert_dir, require_complete)
    record = conv.record
    model, tokenizer = load_causal_lm(record.base_model, dtype=round_to or dtype,
                                      trust_remote_code=record.config.get("trust_remote_code", False))
    model.to(dtype)
    trained = Path(convert_dir) / TRAINED_WEIGHTS_FILE
    if trained.is_file():  # experts / full training changed the dense weights themselves
        from dotmoe.errors import DotMoeError
        from dotmoe.guards import check_finite

        try:
            state = load_file(str(trained))
        except Exception as exc:  # truncated or foreign file
            raise DotMoeError(f"corrupt convert output: {trained}: {exc}") from exc
        own = model.state_dict()
        missing = [k for k in state if k not in own]
        if missing:
            raise DotMoeError(f"{trained} has tensors the base model lacks: {missing[:3]}")
        wrong = [k for k, v in state.items() if v.shape != own[k].shape]
        if wrong:
            raise DotMoeError(f"{trained}: tensor {wrong[0]} has shape {list(state[wrong[0]].shape)}, the base "
                              f"model's is {list(own[wrong[0]].shape)}")
        check_finite(state.items(), str(trained))
        model.load_state_dict({k: v.to(round_to or dtype).to(dtype) for k, v in state.items()}, strict=False)
    moes = install_moe(model, record.experts, record.top_k, record.gating, shared=record.shared > 0,
                       dropped=record.drop > 0)
    apply_conversion(moes, conv, round_to)
    return model.eval(), tokenizer, conv


def apply_conversion(moes, conv: Conversion, router_dtype: torch.dtype | None = None) -> None:
    """Give each MoeMLP its hard one-hot assignment and trained router."""
    num_columns = len(conv.record.capacities)
    for layer, moe in enumerate(moes):
        moe.assignment = one_hot_assignment(conv.partition[layer], num_columns)
        weight = conv.routers[layer]
        if router_dtype is not None:
            weight = weight.to(router_dtype)
        moe.router.weight.data.copy_(weight.float())
