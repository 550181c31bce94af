"""Training losses: distillation KL to the dense teacher, LM cross-entropy, router z-loss, load balancing.

The LM head is applied here, chunk by chunk over tokens, each chunk's gradient computed while its logits exist, so at
most `chunk_tokens x vocab` logits exist at once and the backward recomputes nothing (a 128k vocabulary fits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dotmoe.router import RouterOutput


class _ChunkedHeadLoss(torch.autograd.Function):
    """KL(teacher || student) summed over tokens and CE summed over labels, with the LM head applied chunk by chunk.

    The gradient w.r.t. the student logits has a closed form (KL: (softmax(s / T) - p_t) / T before the T^2 scale; CE:
    softmax(s) - onehot(y)), so each chunk's gradient w.r.t. the hidden states (and the head, when it trains) is computed in the
    forward, while its logits exist, and the backward only scales it. A checkpointed chunk instead recomputed both
    heads and both log-softmaxes in the backward: on SmolLM2 (49k vocabulary) that was a third of a training step
    (`benchmarks/conversion_speed.py`). The same idea as Liger-Kernel's fused linear cross-entropy, which is GPU-only
    (Triton), hence written here. `ce_grad` False: CE is reported, not differentiated (ce_weight 0)."""

    @staticmethod
    def forward(ctx, h_s, h_t, labels, weight, bias, teacher_weight, teacher_bias, temperature: float, chunk: int,
                ce_grad: bool):
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        ce_grad = ce_grad and (need_h or need_w or need_b)
        kl_sum, ce_sum = h_s.new_zeros((), dtype=torch.float32), h_s.new_zeros((), dtype=torch.float32)
        grads = {name: [h_s.new_zeros(h_s.shape) if need_h and wanted else None, None, None]
                 for name, wanted in (("kl", h_t is not None), ("ce", ce_grad))}
        w32 = weight.float()
        b32 = None if bias is None else bias.float()
        tw = teacher_weight.detach().float()  # fp32, or the autocast dtype (below)
        tb = None if teacher_bias is None else teacher_bias.detach().float()
        device = h_s.device.type
        if torch.is_autocast_enabled(device):
            # autocast re-casts a detached weight at every chunk (it caches only leaves that require grad): cast once,
            # to the very tensor it would make (on SmolLM2, 7 casts of the 49152 x 576 head per step, ~4% of a step)
            tw = tw.to(torch.get_autocast_dtype(device))
            tb = None if tb is None else tb.to(tw.dtype)
        for start in range(0, h_s.shape[0], chunk):
            sl = slice(start, start + chunk)
            hs = h_s[sl].float()
            logits_s = F.linear(hs, w32, b32)
            g_logits = {}
            if h_t is not None:
                logp_t = F.log_softmax(F.linear(h_t[sl].float(), tw, tb) / temperature, -1)
                logp_s = F.log_softmax(logits_s / temperature, -1)
                p_t = logp_t.exp()
                kl_sum += (p_t * (logp_t - logp_s)).sum()
                if need_h or need_w or need_b:  # of sum p_t (log p_t - log q), q = softmax(s / T)
                    g_logits["kl"] = (logp_s.exp_() - p_t) / temperature
                del logp_t, logp_s, p_t
            y = labels[sl]
            logp = F.log_softmax(logits_s, -1)
            valid = y != -100
            ce_sum += -logp[valid].gather(-1, y[valid].unsqueeze(-1)).sum()
            if ce_grad:
                g = logp.exp_()  # softmax(s) - onehot(y), 0 on ignored positions
                rows = valid.nonzero().squeeze(-1)
                g[rows, y[rows]] -= 1
                g[~valid] = 0
                g_logits["ce"] = g
            del logp, logits_s
            for name, g in g_logits.items():
                slot = grads[name]
                if need_h:
                    slot[0][sl] = (g @ w32).to(h_s.dtype)
                if need_w:
                    gw = g.t() @ hs
                    slot[1] = gw if slot[1] is None else slot[1] + gw
                if need_b:
                    gb = g.sum(0)
                    slot[2] = gb if slot[2] is None else slot[2] + gb
        ctx.grads = grads
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return kl_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_kl, grad_ce):
        def combine(index):
            parts = [(ctx.grads[n][index], g) for n, g in (("kl", grad_kl), ("ce", grad_ce))
                     if ctx.grads[n][index] is not None]
            return sum(t * g.to(t.dtype) for t, g in parts) if parts else None

        g_h, g_w, g_b = combine(0), combine(1), combine(2)
        w_dtype, b_dtype = ctx.param_dtypes
        g_w = None if g_w is None else g_w.to(w_dtype)
        g_b = None if g_b is None else g_b.to(b_dtype)
        ctx.grads = None
        return g_h, None, None, g_w, g_b, None, None, None, None, None


def distill_and_lm_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor | None, labels: torch.Tensor,
                        lm_head: torch.nn.Linear, temperature: float = 1.0, chunk_tokens: int = 1024,
                        ce_grad: bool = True, teacher_head: torch.nn.Linear | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean forward KL(teacher || student) per token and mean next-token cross-entropy.

    `student_hidden`/`teacher_hidden` are final hidden states [B, T, d]; `labels` [B, T] are the input ids
    (shifted here). Positions with label -100 are ignored by the cross-entropy. At most `chunk_tokens x vocab`
    logits exist at once; logits and softmaxes are fp32 whatever the hidden states' dtype. `ce_grad=False`: the
    cross-entropy is returned without a gradient (cheaper when its loss weight is 0). The teacher's logits come from
    `teacher_head` (default: `lm_head`) and are a fixed target: no gradient flows through them.
    """
    d = student_hidden.shape[-1]
    h_s = student_hidden[:, :-1].reshape(-1, d)
    h_t = teacher_hidden[:, :-1].reshape(-1, d).detach() if teacher_hidden is not None else None
    y = labels[:, 1:].reshape(-1)
    teacher_head = teacher_head if teacher_head is not None else lm_head
    kl_total, ce_total = _ChunkedHeadLoss.apply(h_s, h_t, y, lm_head.weight, lm_head.bias, teacher_head.weight,
                                                teacher_head.bias, temperature, chunk_tokens, ce_grad)
    n_tokens = h_s.shape[0]
    n_labels = max(1, int((y != -100).sum()))
    return kl_total * temperature**2 / n_tokens if h_t is not None else kl_total, ce_total / n_labels


def hidden_state_loss(student_states: tuple[torch.Tensor, ...], teacher_states: tuple[torch.Tensor, ...]
                      ) -> torch.Tensor:
    """Mean over decoder layers of ||h_s - h_t||^2 / ||h_t||^2 (each layer's output against the dense teacher's).

    The tuples are a decoder's `hidden_states` (embeddings first, then one per layer; the embeddings are left out).
    Relative per layer, so that layers whose residual stream is large (Gemma's grows by orders of magnitude with
    depth) do not outweigh the rest; fp32 sums whatever the states' dtype."""
    if len(student_states) != len(teacher_states) or len(student_states) < 2:
        raise ValueError(f"hidden states of {len(student_states)} and {len(teacher_states)} entries")
    terms = []
    for s, t in zip(student_states[1:], teacher_states[1:]):
        t32 = t.detach().float()  # one fp32 copy of the teacher's layer output, not two
        terms.append((s.float() - t32).pow(2).sum() / t32.pow(2).sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def distillation_terms(student_out, teacher_out, input_ids: torch.Tensor, head: torch.nn.Linear, cfg,
                       teacher_head: torch.nn.Linear | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(KL, CE, layer term or None) of a batch from the student's and the teacher's decoder outputs, as the
    config's loss weights ask: the KL only with kl_weight > 0, CE differentiated only with ce_weight > 0, the
    layer term (`hidden_state_loss`, from outputs with `hidden_states`) only with hidden_weight > 0. The joint
    run and the pruned model's distillation both train on these."""
    teacher_hidden = teacher_out.last_hidden_state if cfg.kl_weight > 0 else None
    kl, ce = distill_and_lm_loss(student_out.last_hidden_state, teacher_hidden, input_ids, head, cfg.kl_temperature,
                                 cfg.chunk_tokens, ce_grad=cfg.ce_weight > 0, teacher_head=teacher_head)
    hid = hidden_state_loss(student_out.hidden_states, teacher_out.hidden_states) if cfg.hidden_weight > 0 else None
    return kl, ce, hid


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
