"""The frozen teacher's final hidden states per training sequence, kept for the passes after the first.

A run whose token budget exceeds its corpus (the bundled Wikipedia train split is 437,736 SmolLM2 tokens: 1M training
tokens are 2.4 passes) would run the teacher on every sequence again in each pass, to the same result: the teacher is
frozen, and a sequence's output does not depend on the batch it sits in (bit for bit, eager and compiled:
tests/test_teacher_cache.py). Keeping the outputs skips the teacher's forward in the later passes. Under autocast
they are kept in the autocast dtype, to which the LM head casts them anyway (`losses._ChunkedHeadLoss`), so a hit
gives the very numbers a recomputation would: a run with the cache trains exactly as one without, and `--resume`
(which starts with an empty cache) stays exact. Only the last hidden state is kept: runs with a layer term
(`hidden_weight`) do not use the cache.
"""

from __future__ import annotations

import torch
from transformers.modeling_outputs import BaseModelOutput


class TeacherCache:
    """Teacher outputs by sequence index, up to `budget_bytes`; `dtype` None keeps them as the teacher returns them."""

    def __init__(self, budget_bytes: int, dtype: torch.dtype | None = None):
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        self.budget_bytes, self.dtype = budget_bytes, dtype
        self.used_bytes = self.hits = self.misses = 0
        self._hidden: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._hidden)

    def lookup(self, seq_ids: torch.Tensor) -> BaseModelOutput | None:
        """The batch's teacher output when every one of its sequences is kept, else None (the batch is recomputed)."""
        ids = seq_ids.tolist()
        if not ids or any(i not in self._hidden for i in ids):
            self.misses += 1
            return None
        self.hits += 1
        return BaseModelOutput(last_hidden_state=torch.stack([self._hidden[i] for i in ids]))

    def insert(self, seq_ids: torch.Tensor, last_hidden: torch.Tensor) -> None:
        """Keep each sequence's rows of `last_hidden` [B, T, d] not kept yet, while the budget allows."""
        for row, i in enumerate(seq_ids.tolist()):
            if i in self._hidden:
                continue
            kept = last_hidden[row].detach()
            kept = kept.to(self.dtype) if self.dtype is not None and kept.dtype != self.dtype else kept.clone()
            size = kept.numel() * kept.element_size()
            if self.used_bytes + size > self.budget_bytes:
                return
            self._hidden[i] = kept
            self.used_bytes += size

    def teacher_output(self, teacher_forward, input_ids: torch.Tensor, seq_ids: torch.Tensor) -> BaseModelOutput:
        """The kept output of this batch, or `teacher_forward(input_ids)` (then kept)."""
        out = self.lookup(seq_ids)
        if out is None:
            out = teacher_forward(input_ids)
            self.insert(seq_ids, out.last_hidden_state)
        return out


# the cache takes at most this share of the memory free when the run starts (beside `teacher_cache_mb`), so that
# it never decides whether a run fits: the training-memory estimate (dotmoe.training_memory) leaves it out
MAX_SHARE_OF_FREE_MEMORY = 0.1


def make_teacher_cache(cfg, num_sequences: int, autocast_dtype: torch.dtype | None,
                       device: torch.device | None = None) -> TeacherCache | None:
    """The cache for a run, or None where it cannot help or would change the result: `teacher_cache_mb` 0, no KL
    term, a layer term (it needs every layer's output), or a run that sees no sequence twice. Its budget:
    `teacher_cache_mb`, at most MAX_SHARE_OF_FREE_MEMORY of the memory free on `device` (default CPU) now."""
    from dotmoe.training_memory import available_memory

    seen = cfg.steps * cfg.batch_size * cfg.grad_accum
    if cfg.teacher_cache_mb <= 0 or cfg.kl_weight <= 0 or cfg.hidden_weight > 0 or seen <= num_sequences:
        return None
    free = available_memory(device or torch.device("cpu"))
    return TeacherCache(max(1, min(cfg.teacher_cache_mb << 20, int(MAX_SHARE_OF_FREE_MEMORY * free))), autocast_dtype)
