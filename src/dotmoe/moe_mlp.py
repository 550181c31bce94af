"""The MoE-ified gated MLP used in training: it wraps the dense MLP in place and simulates the MoE.

    H = act(x W_gate) * (x W_up);  Y_hat = (H * (G M^T)) W_down

G [tokens, E'] are the router gates plus the fixed columns: 1 for the always-on shared expert (when there is
one) and 0 for the dropped neurons (when some are dropped); M [N, E'] the neuron -> column assignment
(hard in the forward, soft in the backward). With the mask off the module runs
the dense MLP's exact computation, so the dense teacher needs no second copy of the model.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from dotmoe.architecture import ffn_activations, find_gated_mlps
from dotmoe.router import RouterOutput, TopKRouter


class MoeMLP(nn.Module):
    """Dense gated MLP + router + assignment matrix (set each step by the assigner)."""

    def __init__(self, dense_mlp: nn.Module, num_experts: int, top_k: int, gating: str, shared: bool,
                 dropped: bool = False):
        super().__init__()
        self.dense = dense_mlp
        hidden = dense_mlp.gate_proj.in_features
        self.router = TopKRouter(hidden, num_experts, top_k, gating).to(dense_mlp.gate_proj.weight.device)
        self.shared, self.dropped = shared, dropped
        self.moe_enabled = True
        self.assignment: torch.Tensor | None = None  # [N, E(+1)]
        # the dense model's own down projection, kept once the sparse one is refitted (dotmoe.refit) so the dense
        # teacher stays exact; not in the state dict (the export writes the refitted one)
        self.register_buffer("teacher_down", None, persistent=False)

    def keep_teacher_down(self) -> None:
        """Keep a copy of the dense down projection before `dense.down_proj` is overwritten (once)."""
        if self.teacher_down is None:
            self.teacher_down = self.dense.down_proj.weight.detach().clone()

    def dense_down(self, h: torch.Tensor) -> torch.Tensor:
        """The dense FFN's down projection of the neuron activations h (the original weights, even after a refit)."""
        down = self.dense.down_proj
        if self.teacher_down is None:  # the module call (FSDP2 unshards its parameters around it)
            return down(h)
        return torch.nn.functional.linear(h, self.teacher_down, down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.dense
        if not self.moe_enabled:
            return self.dense_down(ffn_activations(mlp, x))
        if self.assignment is None:
            raise RuntimeError("MoeMLP has no assignment; call the assigner before the forward")
        h = ffn_activations(mlp, x)
        return mlp.down_proj(h * self.neuron_gates(x).to(h.dtype))

    def neuron_gates(self, x: torch.Tensor) -> torch.Tensor:
        """Per-neuron gate [..., N] of the tokens x: G M^T (router gates + the fixed shared / dropped columns)."""
        gates = self.router(x).gates
        fixed = [1.0] * self.shared + [0.0] * self.dropped  # shared expert always on; dropped neurons never
        if fixed:
            gates = torch.cat([gates, gates.new_tensor(fixed).expand(gates.shape[:-1] + (len(fixed),))], dim=-1)
        return gates @ self.assignment.t().to(gates.dtype)


def install_moe(model: nn.Module, num_experts: int, top_k: int, gating: str, shared: bool,
                dropped: bool = False) -> list[MoeMLP]:
    """Replace every gated MLP of `model` by a MoeMLP wrapping it (in place); return them in layer order."""
    moes = []
    for name, mlp in find_gated_mlps(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        moe = MoeMLP(mlp, num_experts, top_k, gating, shared, dropped)
        setattr(parent, child, moe)
        moes.append(moe)
    return moes


@contextmanager
def recorded_routing(moes: list[MoeMLP]):
    """The router outputs of the forward run inside the block, one per MoE layer in layer order (None for a layer
    that did not route, e.g. under `moe_disabled`): a forward hook on each router, declared where it is read (as
    transformers records router logits), instead of state the layers keep."""
    outputs: list[RouterOutput | None] = [None] * len(moes)

    def keep(layer: int):
        return lambda module, args, out: outputs.__setitem__(layer, out)

    handles = [m.router.register_forward_hook(keep(i)) for i, m in enumerate(moes)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def moe_layers(model: nn.Module) -> list[MoeMLP]:
    return [m for m in model.modules() if isinstance(m, MoeMLP)]


@contextmanager
def moe_disabled(model: nn.Module):
    """Run `model` as the original dense model (the teacher) inside the block."""
    layers = moe_layers(model)
    for m in layers:
        m.moe_enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.moe_enabled = True
