"""FSDP2 helpers for the training loop: work outside `forward` on sharded parameters, and checkpoints that hold
full tensors so a run resumes the same whether its parameters were sharded (FSDP) or replicated (DDP, one
process).

Under FSDP2 (accelerate's `fsdp_version: 2`) every parameter is a DTensor shard except inside the forward of its
unit. Evaluation, the final assignment and saving run outside it, so they unshard first; all helpers that gather
are collectives and must be called on every process. Without FSDP they are no-ops.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def _fsdp_units(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """Every FSDP2 unit of `module` unsharded for the duration, so code outside `forward` (evaluation, the final
    assignment) can use the root's parameters. Units with their own forward (decoder layers) reshard again after
    it when `reshard_after_forward` is set, so read their parameters with `full_tensor`."""
    units = _fsdp_units(module)
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def has_sharded_parameters(module: nn.Module) -> bool:
    """Whether any parameter of `module` is a DTensor shard (FSDP2), i.e. not whole outside its unit's forward."""
    dtensor = _dtensor_type()
    return any(isinstance(p, dtensor) for p in module.parameters())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective), or `t` itself."""
    return t.full_tensor() if isinstance(t, _dtensor_type()) else t


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `param`: this process's shard when `param` is a DTensor, else `full` unchanged."""
    if isinstance(param, _dtensor_type()):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements)
    return full


def full_trainable_state(module: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The whole (unsharded) trainable parameters, by name: gathered copies of shards, the parameters' own tensors
    (detached, not copied) otherwise, so write them out before the parameters change. With `keep=False` (the
    processes that do not write the checkpoint) each shard still takes part in the gather, but nothing is kept."""
    state = {}
    for k, v in module.named_parameters():
        if v.requires_grad:
            whole = full_tensor(v.detach())
            if keep:
                state[k] = whole
    return state


def load_full_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors saved by `full_trainable_state` into `module`'s (possibly sharded) parameters."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in state:
                p.copy_(shard_like(state[name], p))


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool = True) -> dict:
    """`optimizer.state_dict()` with every sharded state tensor (e.g. AdamW moments) gathered whole; with
    `keep=False` the gathers happen (they are collectives) but an empty dict is returned."""
    sd = optimizer.state_dict()
    state = {}
    for i, s in sd["state"].items():
        whole = {k: full_tensor(v) for k, v in s.items()}
        if keep:
            state[i] = whole
    return {**sd, "state": state} if keep else {}


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, sd: dict) -> None:
    """Load a `full_optimizer_state` dict, re-sharding each moment like the parameter it belongs to."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: shard_like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v for k, v in s.items()}
    optimizer.load_state_dict({**sd, "state": state})
