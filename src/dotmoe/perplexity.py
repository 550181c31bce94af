"""Token-level perplexity with strided windows (the Hugging Face protocol).

Windows of `max_len` tokens start every `stride` tokens; each window scores only the tokens that the
previous window did not (the first window scores all but its first token), so every token after the first
is scored exactly once, with at least `max_len - stride` tokens of context once past the start. Windows
are evaluated `batch_size` at a time, fewer when their fp32 logits would exceed `max_logits_bytes` (a 262k
vocabulary has 268 MB of logits per 256-token window); the last window may be shorter and is run on its own.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

MIN_EVAL_TOKENS = 128  # perplexity on fewer tokens than this is noise, not a measurement


def _windows(n: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over n tokens."""
    out, prev_end, begin = [], 0, 0
    while prev_end < n:
        end = min(begin + max_len, n)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end, begin = end, begin + stride
    return out


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, max_len: int = 256, stride: int = 128, max_tokens: int | None = None,
               batch_size: int = 16, progress: bool = False, max_logits_bytes: int = 128 * 2**20,
               desc: str = "perplexity") -> float:
    """Perplexity of `model` on a 1-D id stream (`progress`: a bar named `desc`)."""
    if not 0 < stride <= max_len:
        raise ValueError("need 0 < stride <= max_len")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("need at least 2 tokens to compute perplexity")
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    batch_size = max(1, min(batch_size, max_logits_bytes // (max_len * vocab * 4)))
    windows = _windows(len(ids), max_len, stride)
    full = [w for w in windows if w[1] - w[0] == max_len]
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[w] for w in windows if w[1] - w[0] != max_len]
    nll, count = 0.0, 0
    for group in tqdm(groups, desc=desc, unit="batch", disable=not progress):
        batch = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
        target = batch.clone()
        for row, (b, _, first) in enumerate(group):
            target[row, : first - b] = -100
        logits = model(input_ids=batch).logits.float()
        nll += torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), target[:, 1:].flatten(),
                                                 ignore_index=-100, reduction="sum").item()
        count += int((target[:, 1:] != -100).sum())
    return math.exp(nll / count)
