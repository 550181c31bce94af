"""Hard, exactly balanced neuron -> expert assignments from a soft plan.

`greedy_round` returns exactly what the sequential greedy does (visit entries in descending order, give
neuron i to expert e if i is free and e has room) without a Python loop over N*E entries: one sort of all
entries, then passes that each accept, vectorised, the longest stretch of the order the sequential scan
would accept unchanged. A pass ends when an expert fills up, so there are at most E passes.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def _check_caps(plan: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    n, e = plan.shape
    caps = caps.to(plan.device, torch.long)
    if caps.shape != (e,) or int(caps.sum()) != n or int(caps.min()) < 0:
        raise ValueError(f"capacities {caps.tolist()} must be {e} non-negative sizes summing to N={n}")
    return caps


def greedy_round(plan: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Expert index per neuron (long [N]) for one plan [N, E]; expert e gets exactly caps[e] neurons."""
    n, e = plan.shape
    caps = _check_caps(plan, caps)
    order = torch.argsort(plan.detach().float().flatten(), descending=True, stable=True)
    neuron, expert = order // e, order % e
    room = caps.clone()
    out = torch.full((n,), -1, dtype=torch.long, device=plan.device)
    while True:
        live = (out[neuron] < 0) & (room[expert] > 0)
        neuron, expert = neuron[live], expert[live]
        if neuron.numel() == 0:
            return out
        # The first entry of each free neuron is what the sequential scan would try first for it.
        pos = torch.arange(neuron.numel(), device=plan.device)
        first = torch.full((n,), neuron.numel(), device=plan.device).scatter_reduce(0, neuron, pos, "amin")
        cand = pos[first[neuron] == pos]
        cand_expert = expert[cand]
        taken = torch.nn.functional.one_hot(cand_expert, e).cumsum(0).gather(1, cand_expert[:, None]).squeeze(1)
        over = taken > room[cand_expert]
        # Up to the first candidate that finds its expert full, the scan accepts every candidate; past it the
        # refused neuron may reappear, so stop there (its expert is now full: at most E passes).
        cut = int(over.int().argmax()) if bool(over.any()) else cand.numel()
        out[neuron[cand[:cut]]] = cand_expert[:cut]
        room -= torch.bincount(cand_expert[:cut], minlength=e)


def exact_round(plan: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Optimal assignment maximising the sum of plan entries (scipy LAP over expert slots; small N only)."""
    caps = _check_caps(plan, caps)
    scores = plan.detach().float().cpu().numpy()
    slots = np.repeat(np.arange(scores.shape[1]), caps.cpu().numpy())
    rows, cols = linear_sum_assignment(-scores[:, slots])
    out = np.empty(scores.shape[0], dtype=np.int64)
    out[rows] = slots[cols]
    return torch.from_numpy(out)


def assignment_objective(plan: torch.Tensor, assignment: torch.Tensor) -> float:
    """Sum of plan entries picked by an assignment (what rounding maximises)."""
    return float(plan.detach().float()[torch.arange(plan.shape[0]), assignment.to(plan.device)].sum())


def one_hot_assignment(assignment: torch.Tensor, num_experts: int, dtype=torch.float32) -> torch.Tensor:
    """[N] expert ids -> [N, E] one-hot matrix."""
    return torch.nn.functional.one_hot(assignment, num_experts).to(dtype)


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Forward value `hard`, gradient of `soft`: M = M_hard + M_soft - stopgrad(M_soft)."""
    return hard + (soft - soft.detach())  # parenthesised so the forward equals `hard` exactly
