"""Training losses: distillation KL to the dense teacher, LM cross-entropy, router z-loss, load balancing.

The LM head is applied here, chunk by chunk over tokens, each chunk's gradient computed while its logits exist, so at
most `chunk_tokens x vocab` logits exist at once and the backward recomputes nothing (a 128k vocabulary fits).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from dotmoe.router import RouterOutput

_teacher_head_cast: list = [None, -1, None]  # (weakref to the teacher's head weight, its version, its autocast copy)


def _frozen_cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` in `dtype`, cast once while the weight is unchanged: the teacher's head is frozen, so its autocast copy
    is reused across steps (the cast of a 49152 x 576 head is ~1% of a SmolLM2 step). Keyed by the tensor itself
    (a weak reference, so a freed weight whose memory is reused never matches) and its in-place version counter."""
    ref, version, cast = _teacher_head_cast
    if ref is not None and ref() is weight and version == weight._version and cast.dtype == dtype:
        return cast
    cast = weight.detach().to(dtype)
    _teacher_head_cast[:] = [weakref.ref(weight), weight._version, cast]
    return cast


def _teacher_head(weight: torch.Tensor, bias: torch.Tensor | None, device: str
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The teacher head's weight and bias as the chunks use them: fp32, or under autocast in its dtype. Autocast
    re-casts a detached weight at every chunk (it caches only leaves that require grad): cast once, to the very tensor
    it would make (on SmolLM2, 7 casts of the 49152 x 576 head per step, ~4% of a step), and a frozen head once per
    run (`_frozen_cast`)."""
    b = None if bias is None else bias.detach().float()
    if not torch.is_autocast_enabled(device):
        return weight.detach().float(), b
    dtype = torch.get_autocast_dtype(device)
    w = weight.detach().to(dtype) if weight.requires_grad else _frozen_cast(weight, dtype)
    return w, None if b is None else b.to(dtype)


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
        tw, tb = _teacher_head(teacher_weight, teacher_bias, h_s.device.type)
        unit_t = temperature == 1.0  # the KL's student log-softmax is the CE's: computed once, no division by T
        for start in range(0, h_s.shape[0], chunk):
            sl = slice(start, start + chunk)
            hs = h_s[sl].float()
            logits_s = F.linear(hs, w32, b32)
            y = labels[sl]
            valid = y != -100
            logp = F.log_softmax(logits_s, -1)
            # gather every row, then keep the labelled ones: indexing rows by the mask first copies whole rows
            ce_sum += -logp.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)[valid].sum()
            g_logits = {}
            if h_t is not None:
                logits_t = F.linear(h_t[sl].float(), tw, tb)
                logp_t = F.log_softmax(logits_t if unit_t else logits_t / temperature, -1)
                logp_s = logp if unit_t else F.log_softmax(logits_s / temperature, -1)
                p_t = logp_t.exp()
                kl_sum += (p_t * (logp_t - logp_s)).sum()
                if need_h or need_w or need_b:  # of sum p_t (log p_t - log q), q = softmax(s / T)
                    q = logp_s.exp() if unit_t and ce_grad else logp_s.exp_()  # logp is still the CE's below
                    g_logits["kl"] = q.sub_(p_t) if unit_t else (q - p_t) / temperature
                del logits_t, logp_t, logp_s, p_t
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
                    slot[1] = gw if slot[1] is None else slot[1].add_(gw)
                if need_b:
                    gb = g.sum(0)
                    slot[2] = gb if slot[2] is None else slot[2].add_(gb)
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
    logits exist at once; logits and softmaxes are fp32, or under autocast in its dtype (a SmolLM2 step's head, its
    matmuls and log-softmaxes in bf16, costs ~1.8 s of 7.6: `benchmarks/train_step_profile.py`). `ce_grad=False`:
    the cross-entropy is returned without a gradient (cheaper when its loss weight is 0). The teacher's logits come
    from `teacher_head` (default: `lm_head`) and are a fixed target: no gradient flows through them.
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
