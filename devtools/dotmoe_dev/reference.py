"""Train the bundled reference model: byte-level BPE tokenizer + small LlamaForCausalLM, on CPU.

Everything is seeded; `python scripts/train_reference.py` reproduces it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from dotmoe.data import tokenize_stream
from dotmoe_dev.corpus import DEFAULT_INFO, read_info_nodes, split_corpus

EOS = "</s>"


@dataclass(frozen=True)
class ReferenceConfig:
    """Shape and training budget of the reference model."""

    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_layers: int = 8
    num_heads: int = 4
    num_kv_heads: int = 2
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 3000
    lr: float = 2e-3
    warmup: int = 100
    seed: int = 0
    train_sample_chars: int = 2_000_000

    def __post_init__(self) -> None:
        if self.intermediate_size % 64 or self.hidden_size % self.num_heads:
            raise ValueError("intermediate_size must divide by 64 and hidden_size by num_heads")
        if min(self.steps, self.batch_size, self.seq_len, self.vocab_size) < 1:
            raise ValueError("steps, batch_size, seq_len and vocab_size must be positive")


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Train a byte-level BPE and save it in HF format; return the PreTrainedTokenizerFast."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)
    tok.save_pretrained(out_dir)
    return tok


def build_model(cfg: ReferenceConfig, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=2 * cfg.seq_len,
        tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def _write_splits(splits: dict[str, list[str]], data_dir: Path, sample_chars: int) -> None:
    """The bundled validation and test splits, and a train sample of about `sample_chars` characters drawn evenly
    from the train split."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for name in ("validation", "test"):
        (data_dir / f"{name}.txt").write_text("\n\n".join(splits[name]) + "\n", encoding="utf-8")
    sample, size = [], 0
    for doc in splits["train"][:: max(1, len(splits["train"]) // 2000)]:
        if size > sample_chars:
            break
        sample.append(doc)
        size += len(doc)
    (data_dir / "train_sample.txt").write_text("\n\n".join(sample) + "\n", encoding="utf-8")


def train_reference(out_dir: Path, data_dir: Path, cfg: ReferenceConfig = ReferenceConfig(),
                    info_path: Path = DEFAULT_INFO) -> dict:
    """Train tokenizer + model, write the HF model dir and the bundled text splits; return the report."""
    torch.manual_seed(cfg.seed)
    splits = split_corpus(read_info_nodes(info_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_splits(splits, data_dir, cfg.train_sample_chars)

    tok = train_tokenizer(splits["train"], cfg.vocab_size, out_dir)
    train_ids = tokenize_stream(tok, splits["train"])
    model = build_model(cfg, len(tok))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(cfg.seed)
    start, log = time.time(), []
    bar = tqdm(range(cfg.steps), desc="train reference", unit="step")
    for step in bar:
        starts = torch.randint(0, len(train_ids) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        batch = torch.stack([train_ids[s : s + cfg.seq_len] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{(step + 1) * batch.numel() / (time.time() - start):.0f}")
        if step % 50 == 0 or step == cfg.steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4)})
    wall = time.time() - start

    model.eval()
    model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    report = {
        "config": asdict(cfg), "parameters": n_params, "train_tokens": cfg.steps * cfg.batch_size * cfg.seq_len,
        "corpus_train_tokens": len(train_ids), "wall_seconds": round(wall, 1), "loss_log": log,
    }
    (out_dir / "training_report.json").write_text(json.dumps(report, indent=2))
    return report


def unigram_perplexity(tok, train_texts: list[str], eval_ids: torch.Tensor) -> float:
    """Perplexity of an add-one unigram model fit on the train split's tokens."""
    counts = torch.ones(len(tok), dtype=torch.float64)
    counts += torch.bincount(tokenize_stream(tok, train_texts), minlength=len(tok)).double()
    logp = (counts / counts.sum()).log()
    return float(torch.exp(-logp[eval_ids].mean()))

