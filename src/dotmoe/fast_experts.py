"""Decode-friendly experts kernels for stock transformers MoE classes: `experts_implementation="dotmoe_gather"`
(the selected experts only), `"dotmoe_all"` (every expert in two batched matmuls, for small batches that
touch most experts anyway) and `"dotmoe_auto"` (per step: the chosen experts' matrix-vector products for a token or
a few pairs, `dotmoe_all`, or stock grouped_mm).

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


PAIRS_PATH_MAX = 4  # dotmoe_auto: steps of at most this many token-expert pairs (or one token) take the pairs path


def _native_matvec(hidden_states: torch.Tensor) -> bool:
    """Whether the pairs path turns oneDNN off around its matrix-vector products: bf16/fp16 on CPU. There a single-row
    oneDNN matmul pays a fixed cost of ~10-15 us per call, PyTorch's native matrix-vector kernel a few us, and expert
    matrices are small (2-core AMD EPYC, 2 threads: 96x576 19.3 -> 6.1 us, 8x576 12.7 -> 3.8 us;
    `benchmarks/results/linear_call_cost_epyc.md`). Larger steps keep oneDNN: its multi-row matmuls are faster."""
    return hidden_states.device.type == "cpu" and hidden_states.dtype in (torch.bfloat16, torch.float16) \
        and torch.backends.mkldnn.enabled


def pairs_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor) -> torch.Tensor:
    """Every (token, chosen expert) pair of a tiny step as two matrix-vector products on views of that expert's
    weights, the routing weight folded into the down projection's in-place accumulation (addmm's alpha): per pair
    2 matmuls and the gate, nothing else (no grouping, gathers or scatters). An expert two tokens share is read
    twice, the second time from cache. For batch-1 decoding and steps of a few pairs."""
    rows, weights = top_k_index.tolist(), top_k_weights.tolist()  # one host sync each
    native = _native_matvec(hidden_states)
    if native:
        torch.backends.mkldnn.enabled = False  # process-wide flag: restored below, before anything else runs
    try:
        out = torch.zeros_like(hidden_states)
        for token, (experts, gates) in enumerate(zip(rows, weights)):
            x, y = hidden_states[token : token + 1], out[token : token + 1]
            for expert, gate in zip(experts, gates):
                if not 0 <= expert < self.num_experts:  # a sentinel slot
                    continue
                gate_up, down = self.gate_up_proj[expert], self.down_proj[expert]
                if self.is_transposed:  # [d, 2I] / [I, d] layouts
                    gate_up, down = gate_up.t(), down.t()
                y.addmm_(self._apply_gate(F.linear(x, gate_up)).to(y.dtype), down.t(), alpha=gate)
        return out
    finally:
        if native:
            torch.backends.mkldnn.enabled = True


def gather_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """hidden_states [S, d], top_k_index / top_k_weights [S, k] -> [S, d] (sum of weighted expert outputs)."""
    if _stock_step(self, top_k_index):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if hidden_states.shape[0] == 1:  # batch-1 decoding
        return pairs_forward(self, hidden_states, top_k_index, top_k_weights)
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
    """The kernel for the step's size, chosen from its shape alone: one token, or at most PAIRS_PATH_MAX
    token-expert pairs -> `pairs_forward` (matrix-vector products of the chosen experts only); up to
    SMALL_STEP_PAIRS pairs -> `dotmoe_all` (the batch touches most experts anyway); more (prefill) -> stock
    `grouped_mm`. Measured on SmolLM2-135M exports, 2-core AMD EPYC, 2 threads, bf16, the 30 FFN blocks of one
    decode step with their weights streamed (`benchmarks/moe_block_speed.py`,
    `benchmarks/results/moe_block_speed_epyc.md`): pairs is fastest at batch 1 (k=2 and k=4) and at k=2 batch 2,
    all at every larger step up to 16 tokens."""
    if hidden_states.shape[0] == 1 or top_k_index.numel() <= PAIRS_PATH_MAX:
        if not _stock_step(self, top_k_index):
            return pairs_forward(self, hidden_states, top_k_index, top_k_weights)
    return all_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def register() -> None:
    """Make `experts_implementation="dotmoe_gather"`, `"dotmoe_all"` and `"dotmoe_auto"` available to every
    transformers MoE model."""
    ExpertsInterface.register(NAME, gather_experts_forward)
    ExpertsInterface.register(ALL_NAME, all_experts_forward)
    ExpertsInterface.register(AUTO_NAME, auto_experts_forward)


register()
assert NAME in ALL_EXPERTS_FUNCTIONS and ALL_NAME in ALL_EXPERTS_FUNCTIONS and AUTO_NAME in ALL_EXPERTS_FUNCTIONS
