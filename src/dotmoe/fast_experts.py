"""Decode-friendly experts kernels for stock transformers MoE classes: `experts_implementation="dotmoe_gather"`
(the selected experts only), `"dotmoe_all"` (every expert in two batched matmuls, for small batches that
touch most experts anyway) and `"dotmoe_auto"` (the one of the two, or stock grouped_mm, for each step's size).

    import dotmoe.fast_experts  # registers it
    AutoModelForCausalLM.from_pretrained(path, experts_implementation="dotmoe_gather")

Experts are contiguous weight blocks, so running the k experts a token selected needs no routing machinery:
group the few (token, slot) pairs by expert and run each selected expert's gate/up and down projections on
views of its weights (no copies, no padding to all E experts). Used when the step has at most
`SMALL_STEP_PAIRS` token-expert pairs (decoding); larger steps (prefill) go to transformers' `grouped_mm`.
Registered through transformers' own `ExpertsInterface`, so it works with the stock Mixtral / Qwen-MoE classes
(and the custom dotmoe class) without remote code.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface, grouped_mm_experts_forward

NAME = "dotmoe_gather"
SMALL_STEP_PAIRS = 64


def _stock_step(experts, top_k_index: torch.Tensor) -> bool:
    """A step these kernels leave to stock `grouped_mm`: more than SMALL_STEP_PAIRS token-expert pairs (prefill),
    or experts with biases or without a gate."""
    return top_k_index.numel() > SMALL_STEP_PAIRS or experts.has_bias or not experts.has_gate


def gather_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """hidden_states [S, d], top_k_index / top_k_weights [S, k] -> [S, d] (sum of weighted expert outputs)."""
    if _stock_step(self, top_k_index):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if hidden_states.shape[0] == 1:  # batch-1 decoding: k matrix-vector products on weight views, nothing else
        out = None
        for slot, expert in enumerate(top_k_index[0].tolist()):
            gate_up, down = self.gate_up_proj[expert], self.down_proj[expert]
            if self.is_transposed:
                gate_up, down = gate_up.t(), down.t()
            y = F.linear(self._apply_gate(F.linear(hidden_states, gate_up)), down) * top_k_weights[0, slot]
            out = y if out is None else out + y
        return out.to(hidden_states.dtype)
    out = torch.zeros_like(hidden_states)
    slots: dict[int, list[tuple[int, int]]] = {}
    for token, row in enumerate(top_k_index.tolist()):  # a handful of pairs: one host sync, no kernels
        for slot, expert in enumerate(row):
            if 0 <= expert < self.num_experts:
                slots.setdefault(expert, []).append((token, slot))
    for expert, pairs in slots.items():
        tokens = torch.tensor([t for t, _ in pairs], device=hidden_states.device)
        weights = top_k_weights[tokens, torch.tensor([s for _, s in pairs], device=hidden_states.device)]
        gate_up, down = self.gate_up_proj[expert], self.down_proj[expert]
        if self.is_transposed:  # [d, 2I] / [I, d] layouts
            gate_up, down = gate_up.t(), down.t()
        h = self._apply_gate(F.linear(hidden_states[tokens], gate_up))
        y = F.linear(h, down) * weights.unsqueeze(-1).to(h.dtype)
        out.index_add_(0, tokens, y.to(out.dtype))
    return out


ALL_NAME = "dotmoe_all"


def all_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """Every expert on every token of the step, as two batched matmuls over the expert axis, the outputs of the
    experts a token did not choose weighted 0: the step reads each expert's weights once, in as few kernels as a
    dense FFN takes (no per-expert gathers, no host sync). For small decode batches that touch most experts anyway
    (batch 8 of E=8, k=2 touches ~7 of 8 per layer), where the per-expert paths pay more in kernel launches than
    they save in bytes; the compute grows by E / k, which a memory-bound decode step does not notice. Larger steps
    (more than SMALL_STEP_PAIRS token-expert pairs) go to transformers' `grouped_mm`."""
    if _stock_step(self, top_k_index):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    experts, tokens = self.num_experts, hidden_states.shape[0]
    # routing weight of (token, expert), 0 where not chosen; out-of-range indices (sentinels) go to a spare column
    weights = torch.zeros(tokens, experts + 1, dtype=top_k_weights.dtype, device=hidden_states.device)
    weights.scatter_add_(1, top_k_index.clamp(0, experts), top_k_weights)
    gate_up = self.gate_up_proj if self.is_transposed else self.gate_up_proj.transpose(1, 2)  # [E, d, 2I]
    down = self.down_proj if self.is_transposed else self.down_proj.transpose(1, 2)  # [E, I, d]
    h = self._apply_gate(torch.matmul(hidden_states.unsqueeze(0), gate_up))  # [E, S, I]
    h = h * weights[:, :experts].t().unsqueeze(-1).to(h.dtype)
    return torch.bmm(h, down).sum(0).to(hidden_states.dtype)  # [S, d]


AUTO_NAME = "dotmoe_auto"


def auto_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """The kernel for the step's size, chosen from its shape alone (no host sync): fewer token-expert pairs than
    half the experts (batch-1 decoding at small k/E) -> `dotmoe_gather`, which reads only the selected experts;
    up to SMALL_STEP_PAIRS pairs -> `dotmoe_all` (the batch touches most experts anyway); more (prefill) -> stock
    `grouped_mm`. SmolLM2-135M exports, 2 threads, bf16 (benchmarks/results/speed_smollm2_xeon.md): gather is
    fastest at k=2 batch 1 (2 of 8 experts), all at every batch of 2-16 and at k=4 batch 1; in fp32 stock
    grouped_mm is faster at k=2 batches 2-8 (speed_smollm2_auto_fp32_xeon.md), which this rule does not see."""
    if top_k_index.numel() < self.num_experts / 2:
        return gather_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return all_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def register() -> None:
    """Make `experts_implementation="dotmoe_gather"`, `"dotmoe_all"` and `"dotmoe_auto"` available to every
    transformers MoE model."""
    ExpertsInterface.register(NAME, gather_experts_forward)
    ExpertsInterface.register(ALL_NAME, all_experts_forward)
    ExpertsInterface.register(AUTO_NAME, auto_experts_forward)


register()
assert NAME in ALL_EXPERTS_FUNCTIONS and ALL_NAME in ALL_EXPERTS_FUNCTIONS and AUTO_NAME in ALL_EXPERTS_FUNCTIONS
