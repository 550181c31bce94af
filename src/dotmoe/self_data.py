"""Data-free conversion: calibration / training text sampled from the dense model itself.

When no text of the model's domain is at hand, the dense model can write it: ancestral sampling from its own
distribution (temperature 1, nucleus top-p) starting from its BOS token. The sampled text is a plain .txt file
that `dotmoe convert --data` reads like any other, one sample per paragraph.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from dotmoe.atomic import atomic_write
from dotmoe.errors import DotMoeError


@torch.no_grad()
def sample_texts(model, tokenizer, tokens: int, length: int = 256, batch: int = 16, top_p: float = 0.95,
                 seed: int = 0, progress: bool = True) -> list[str]:
    """About `tokens` tokens of text sampled from `model`, in sequences of up to `length` new tokens."""
    if tokens < 1 or length < 1 or batch < 1 or not 0 < top_p <= 1:
        raise DotMoeError(f"need tokens, length, batch >= 1 and 0 < top_p <= 1; got {tokens}, {length}, {batch}, "
                          f"{top_p}")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise DotMoeError("the tokenizer has neither a BOS nor an EOS token to start sampling from")
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    texts: list[str] = []
    made = 0
    bar = tqdm(total=tokens, desc="sampling", unit="tok", disable=not progress)
    while made < tokens:
        n = min(batch, -(-(tokens - made) // length))
        prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_p=top_p,
                             temperature=1.0, top_k=0, max_new_tokens=length, min_new_tokens=length,
                             pad_token_id=tokenizer.eos_token_id if tokenizer.eos_token_id is not None else start)
        for row in out[:, 1:]:
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
        made += n * length
        bar.update(n * length)
    bar.close()
    return [t for t in texts if t]


def write_texts(texts: list[str], out: str | Path) -> Path:
    """Write the samples as one .txt file (paragraphs separated by blank lines), atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(t.replace("\n\n", "\n") for t in texts) + "\n"
    atomic_write(out, lambda tmp: tmp.write_text(text), unique=True, record="sampled text")
    return out
