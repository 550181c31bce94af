"""What every conversion does before it converts: load and check data and model, pick the calibration
sequences, check the output directory has room."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dotmoe.architecture import find_gated_mlps, load_causal_lm
from dotmoe.config import ConvertConfig
from dotmoe.data import TextFiles, tokenize_stream, training_sequences
from dotmoe.errors import DotMoeError
from dotmoe.guards import check_finite, check_seq_len, write_probe
from dotmoe.layer_runner import map_layer_inputs
from dotmoe.perplexity import MIN_EVAL_TOKENS


def calibration_sequences(seqs: torch.Tensor, cfg: ConvertConfig) -> torch.Tensor:
    """`cfg.calibration_tokens` worth of packed sequences used for calibration (a seeded random subset)."""
    shuffled = seqs[torch.randperm(len(seqs), generator=torch.Generator().manual_seed(cfg.seed + 1))]
    return shuffled[: max(1, cfg.calibration_tokens // cfg.seq_len)]


def preflight(out: Path, cfg: ConvertConfig, model: nn.Module, checkpoints: bool = True) -> None:
    """Before training: the output directory is writable and its disk has room for checkpoints + export
    (`checkpoints` False: a run that writes none, --method prune, needs room for its fp32 model only).

    A directory created here is removed again when the check fails, so bad output paths leave nothing.
    """
    import shutil

    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_probe(out)
    except OSError as exc:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise DotMoeError(f"output directory {out} is not writable: {exc.strerror or exc}") from exc
    if checkpoints:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        checkpoint = 12 * sum(p.numel() for p in model.parameters() if p.requires_grad)  # fp32 params + 2 AdamW moments
        trained = weights if cfg.trainable != "router+assignment" else 0  # trained dense weights are saved too
    else:  # only the model, saved in fp32 whatever it computed in
        weights, checkpoint, trained = 4 * sum(p.numel() for p in model.parameters()), 0, 0
    need = int(1.1 * (checkpoint + weights + trained)) + 64 * 1024**2
    free = shutil.disk_usage(out).free
    if free < need:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise DotMoeError(f"not enough disk space in {out}: about {need / 1024**3:.2f} GiB needed for checkpoints "
                          f"and the export, {free / 1024**3:.2f} GiB free")


@dataclass
class Prepared:
    """Everything a conversion needs before it starts: model, tokenizer, packed data, evaluation ids, MLPs."""

    model: nn.Module
    tokenizer: object
    model_path: Path
    seqs: torch.Tensor
    eval_ids: torch.Tensor
    mlp_names: list[str]
    mlps: list[nn.Module]

    @property
    def num_neurons(self) -> int:
        return self.mlps[0].gate_proj.out_features

    def map_calibration_inputs(self, cfg: ConvertConfig, fn, progress: bool = False) -> list:
        """[fn(i, x_i)] on the dense MLP inputs of `calibration_tokens` tokens of (shuffled) training data, one layer's
        inputs resident at a time (`map_layer_inputs`)."""
        return map_layer_inputs(self.model, self.mlps, calibration_sequences(self.seqs, cfg), fn, progress=progress)


def prepare(cfg: ConvertConfig, dtype: torch.dtype = torch.float32) -> Prepared:
    """Load data (first: bad data fails before a large model loads), model (its weights in `dtype`) and tokenizer;
    validate sizes."""
    from dotmoe.gguf_input import resolve_model
    from dotmoe.paths import default_data_file, reference_model_dir

    texts = TextFiles(cfg.data or [str(default_data_file("train", cfg.model))])
    eval_texts = TextFiles(cfg.eval_data or [str(default_data_file("validation", cfg.model))])
    model_path = resolve_model(cfg.model or reference_model_dir())  # a .gguf: its dequantized HF directory
    model, tokenizer = load_causal_lm(model_path, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                                      require_dense=True)
    named_mlps = find_gated_mlps(model)
    mlps = [m for _, m in named_mlps]
    warning = cfg.fit_shared_to_export(model.config.to_dict())
    if warning:
        print(warning, file=sys.stderr)
    cfg.validate_for(mlps[0].gate_proj.out_features)
    check_seq_len(cfg.seq_len, model.config, "--seq-len")
    check_finite(model.named_parameters(), f"the input model {model_path}")
    seqs = training_sequences(tokenizer, texts, cfg)
    if len(seqs) < cfg.batch_size:
        raise DotMoeError(f"data too short: {len(seqs)} sequences of {cfg.seq_len} tokens, need >= batch size "
                          f"{cfg.batch_size}")
    eval_ids = tokenize_stream(tokenizer, eval_texts, cfg.eval_tokens)
    check_eval_tokens(len(eval_ids), cfg.eval_data)
    model.requires_grad_(False)
    return Prepared(model, tokenizer, model_path, seqs, eval_ids, [n for n, _ in named_mlps], mlps)


def check_eval_tokens(count: int, files: list[str]) -> None:
    """Enough held-out tokens for a perplexity that means something."""
    if count < MIN_EVAL_TOKENS:
        source = ", ".join(files) if files else "the bundled validation text"
        raise DotMoeError(f"evaluation data {source} has {count} tokens; at least {MIN_EVAL_TOKENS} are needed")
