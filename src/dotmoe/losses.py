"""Training losses: distillation KL to the dense teacher, LM cross-entropy, router z-loss, load balancing.

The LM head is applied here, chunk by chunk over tokens with activation checkpointing, so at most
`chunk_tokens x vocab` logits exist at once in the forward and the backward (a 128k vocabulary fits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dotmoe.router import RouterOutput


def _chunk_terms(h_s, h_t, labels, weight, bias, temperature: float):
    logits_s = F.linear(h_s, weight, bias).float()
    kl = logits_s.new_zeros(())
    if h_t is not None:
        logits_t = F.linear(h_t, weight, bias).float()
        logp_t = F.log_softmax(logits_t / temperature, -1)
        logp_s = F.log_softmax(logits_s / temperature, -1)
        kl = (logp_t.exp() * (logp_t - logp_s)).sum() * temperature**2
    ce = F.cross_entropy(logits_s, labels, ignore_index=-100, reduction="sum")
    return kl, ce


def distill_and_lm_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor | None, labels: torch.Tensor,
                        lm_head: torch.nn.Linear, temperature: float = 1.0, chunk_tokens: int = 1024
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean forward KL(teacher || student) per token and mean next-token cross-entropy.

    `student_hidden`/`teacher_hidden` are final hidden states [B, T, d]; `labels` [B, T] are the input ids
    (shifted here). Positions with label -100 are ignored by the cross-entropy.
    """
    d = student_hidden.shape[-1]
    h_s = student_hidden[:, :-1].reshape(-1, d)
    h_t = teacher_hidden[:, :-1].reshape(-1, d) if teacher_hidden is not None else None
    y = labels[:, 1:].reshape(-1)
    kl_total, ce_total = h_s.new_zeros((), dtype=torch.float32), h_s.new_zeros((), dtype=torch.float32)
    for start in range(0, h_s.shape[0], chunk_tokens):
        sl = slice(start, start + chunk_tokens)
        args = (h_s[sl], None if h_t is None else h_t[sl], y[sl], lm_head.weight, lm_head.bias, temperature)
        kl, ce = checkpoint(_chunk_terms, *args, use_reentrant=False) if torch.is_grad_enabled() \
            else _chunk_terms(*args)
        kl_total, ce_total = kl_total + kl, ce_total + ce
    n_tokens = h_s.shape[0]
    n_labels = max(1, int((y != -100).sum()))
    return kl_total / n_tokens, ce_total / n_labels


def router_z_loss(outputs: list[RouterOutput]) -> torch.Tensor:
    """ST-MoE z-loss: mean over layers and tokens of logsumexp(logits)^2."""
    return torch.stack([torch.logsumexp(o.logits, -1).pow(2).mean() for o in outputs]).mean()


def _global_counts(mask: torch.Tensor) -> torch.Tensor:
    """Top-k slot counts per expert summed over all data-parallel processes (the global batch)."""
    counts = mask.sum(0).detach()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    return counts


def load_balancing_loss(outputs: list[RouterOutput]) -> torch.Tensor:
    """Switch load-balancing loss E * sum_e f_e * P_e (f_e: share of top-k slots, P_e: mean prob), layer mean.

    Under data parallelism f is taken over the global batch (P stays local: gradient averaging across processes
    then equals the single-process gradient of the global-batch loss).
    """
    terms = []
    for o in outputs:
        e = o.probs.shape[-1]
        counts = _global_counts(o.topk_mask.reshape(-1, e))
        f = counts / counts.sum()
        p = o.probs.reshape(-1, e).mean(0)
        terms.append(e * (f * p).sum())
    return torch.stack(terms).mean()


def expert_load_cv(outputs: list[RouterOutput]) -> float:
    """Mean over layers of the coefficient of variation of expert load (top-k slot counts)."""
    cvs = []
    for o in outputs:
        load = _global_counts(o.topk_mask.reshape(-1, o.topk_mask.shape[-1]))
        cvs.append(float(load.std(unbiased=False) / load.mean().clamp_min(1e-9)))
    return sum(cvs) / max(1, len(cvs))
