"""Which experts a decode step must read, measured from an exported MoE's own routing on real text.

At batch 1 a step reads the k experts its token chose; at batch B it reads every expert that any of the B tokens
chose, which for B >= E / k is nearly all of them. The bytes-read bound of a batch therefore comes from the
number of distinct experts B tokens touch per layer: measured by drawing B tokens of the routed text at random
(the tokens of one decode step come from B independent sequences), and its expected value from the load
distribution, sum over experts of 1 - (1 - q_e)^B with q_e the share of tokens that choose expert e.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dotmoe.errors import DotMoeError


@dataclass(frozen=True)
class Coverage:
    """Distinct experts per layer a batch of `batch` tokens touches: measured (mean over draws and layers) and
    expected from the load distribution (mean over layers)."""

    batch: int
    measured: float
    expected: float


def experts_modules(model: nn.Module) -> list[nn.Module]:
    """The stock transformers experts modules (fused gate/up and down weights of all E experts), in layer order."""
    found = [m for m in model.modules() if hasattr(m, "num_experts") and hasattr(m, "gate_up_proj")]
    if not found:
        raise DotMoeError(f"{type(model).__name__} has no stock experts modules (gate_up_proj of num_experts "
                          "experts) whose routing could be measured")
    return found


@torch.no_grad()
def routing_choices(model: nn.Module, ids: torch.Tensor, seq_len: int = 256) -> list[torch.Tensor]:
    """Per MoE layer, the [T, k] experts each of the T tokens of `ids` (1-D) chose, from the model's own router
    (a forward over windows of `seq_len` tokens)."""
    modules = experts_modules(model)
    seen: list[list[torch.Tensor]] = [[] for _ in modules]

    def hook(i: int):
        def record(module, args, kwargs):
            index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            seen[i].append(index.detach().reshape(-1, index.shape[-1]).cpu())
        return record

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        device = next(model.parameters()).device
        for start in range(0, len(ids) - seq_len + 1, seq_len):
            model(input_ids=ids[start:start + seq_len].unsqueeze(0).to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not seen[0]:
        raise DotMoeError(f"routing needs at least {seq_len} tokens of text, got {len(ids)}")
    return [torch.cat(s) for s in seen]


def measured_touched(choices: torch.Tensor, num_experts: int, batch: int, draws: int = 256, seed: int = 0) -> float:
    """Mean distinct experts (of `num_experts`) among the choices of `batch` tokens drawn without replacement,
    over `draws` draws."""
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for _ in range(draws):
        rows = choices[torch.randperm(len(choices), generator=gen)[:batch]]
        total += int(torch.unique(rows[(rows >= 0) & (rows < num_experts)]).numel())
    return total / draws


def expected_touched(choices: torch.Tensor, num_experts: int, batch: int) -> float:
    """Expected distinct experts among `batch` independent tokens: sum over experts of 1 - (1 - q_e)^batch, q_e
    the share of tokens that chose expert e (a token's k choices are distinct)."""
    valid = choices[(choices >= 0) & (choices < num_experts)]
    share = torch.bincount(valid, minlength=num_experts).double() / len(choices)
    return float((1 - (1 - share.clamp(max=1)) ** batch).sum())


def coverage(choices: list[torch.Tensor], num_experts: int, batches: list[int], draws: int = 256) -> list[Coverage]:
    """Coverage of every batch size, each averaged over the MoE layers."""
    out = []
    for b in batches:
        measured = sum(measured_touched(c, num_experts, b, draws, seed=i) for i, c in enumerate(choices))
        expected = sum(expected_touched(c, num_experts, b) for c in choices)
        out.append(Coverage(b, measured / len(choices), expected / len(choices)))
    return out


def bytes_bound(dense_bytes: int, moe_bytes: int, expert_bytes: int, num_experts: int, touched: float) -> float:
    """Dense weight bytes over the bytes one MoE decode step reads: everything but the routed experts, plus the
    `touched` experts per layer (expert weights of one layer are E equal blocks)."""
    return dense_bytes / (moe_bytes - expert_bytes + expert_bytes * touched / num_experts)
