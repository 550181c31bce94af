"""Helpers the benchmarks share (benchmarks/*.py import them from here instead of from each other): real models by
name, test-split scores of a conversion or a dense model, per-token oracles, synthetic Llama shapes with their MoE
exports."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from dotmoe.router import RouterOutput


def model_dir(name: str) -> Path:
    """A real model by name (fetched and cached by dotmoe_dev.real_models) or a local HF model directory."""
    from dotmoe_dev.real_models import real_model_dir

    return real_model_dir(name) if not Path(name).is_dir() else Path(name)


def load_scored(out: Path, method: str):
    """(model, tokenizer) a run is scored with: the pruned dense export, else the training-time sparse model."""
    if method == "prune":
        return load_dense(out / "model")
    from dotmoe.sparse_model import load_sparse_model

    model, tok, _ = load_sparse_model(out)
    return model, tok


@torch.no_grad()
def score(out: Path, method: str, eval_tokens: int, cloze: bool) -> dict:
    return test_scores(*load_scored(out, method), eval_tokens, cloze)


def load_dense(model: Path):
    """(model, tokenizer) of the dense checkpoint, fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(model)


def dense_scores(model: Path, eval_tokens: int, cloze: bool) -> dict:
    return test_scores(*load_dense(model), eval_tokens, cloze)


def cloze_accuracy(model, tok) -> float:
    from dotmoe.evaluate import run_tasks

    return round(run_tasks(model, tok, ["wiki_cloze"])["wiki_cloze"]["acc"], 4)


@torch.no_grad()
def test_scores(model, tok, eval_tokens: int, cloze: bool) -> dict:
    """PPL on the first `eval_tokens` of the Wikipedia and Python-docs test splits (pydocs: half as many), and the
    wiki_cloze accuracy."""
    from dotmoe.data import load_texts, tokenize_stream
    from dotmoe.paths import reference_data_file
    from dotmoe.perplexity import perplexity

    res = {}
    for name, split, n in (("wiki_test_ppl", "wiki_test", eval_tokens), ("pydocs_test_ppl", "test", eval_tokens // 2)):
        ids = tokenize_stream(tok, load_texts([str(reference_data_file(split))]))
        res[name] = round(perplexity(model, ids, 256, 128, max_tokens=n), 3)
    if cloze:
        res["wiki_cloze_acc"] = cloze_accuracy(model, tok)
    return res


class OracleRouter(nn.Module):
    """Top-k experts by the norm of their true contribution to this token's FFN output (gates exactly 1). The
    contributions use the dense down projection as it is at construction, so a later refit does not change them."""

    def __init__(self, mlp: nn.Module, partition: torch.Tensor, top_k: int, experts: int):
        super().__init__()
        self.mlp, self.partition, self.top_k, self.experts = [mlp], partition, top_k, experts
        self.down_norm = mlp.down_proj.weight.detach().float().norm(dim=0)

    def forward(self, x: torch.Tensor) -> RouterOutput:
        mlp = self.mlp[0]
        c = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).float().abs() * self.down_norm
        scores = torch.stack([c[..., self.partition == e].norm(dim=-1) for e in range(self.experts)], -1)
        mask = torch.zeros_like(scores).scatter_(-1, scores.topk(self.top_k, -1).indices, 1.0)
        return RouterOutput(scores, scores, mask, mask)


class OracleMLP(nn.Module):
    """A gated MLP that keeps, per token, only its `keep` neurons of largest contribution."""

    def __init__(self, mlp: nn.Module, keep: int):
        super().__init__()
        self.mlp, self.keep = mlp, keep
        self.register_buffer("dense_down", mlp.down_proj.weight.detach().clone(), persistent=False)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h * mask, h): the kept activations and all of them."""
        h = self.mlp.act_fn(self.mlp.gate_proj(x)) * self.mlp.up_proj(x)
        score = h.abs() * self.dense_down.norm(dim=0)
        mask = torch.zeros_like(h).scatter_(-1, score.topk(self.keep, dim=-1).indices, 1.0)
        return h * mask, h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.down_proj(self.features(x)[0])


SHAPES = {  # name: (hidden, intermediate, layers, heads)
    "100m": (768, 3072, 12, 12),
    "0.5b": (1280, 5120, 22, 20),
    "1.5b": (2048, 8192, 24, 16),
}


def synthetic_pair(name: str, root: Path, experts: int, top_k: int) -> tuple[Path, Path]:
    """Save a random dense Llama of the named shape and its MoE export (random balanced partition)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dotmoe.artifacts import save_conversion
    from dotmoe.export import export
    from dotmoe.paths import reference_model_dir
    from dotmoe.record import ConversionRecord

    hidden, inter, layers, heads = SHAPES[name]
    dense_dir = root / f"dense-{name}"
    cfg = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=2048,
                      tie_word_embeddings=False, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(dense_dir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(reference_model_dir() / f, dense_dir / f)
    params = sum(p.numel() for p in model.parameters())
    del model
    g = torch.Generator().manual_seed(0)
    partition = torch.stack([torch.randperm(inter, generator=g) % experts for _ in range(layers)])
    routers = [torch.randn(experts, hidden, generator=g) for _ in range(layers)]
    conv = root / f"conv-{name}"
    conv.mkdir()
    save_conversion(conv, partition, routers, ConversionRecord(
        method="random", experts=experts, top_k=top_k, gating="softmax", capacities=[inter // experts] * experts,
        intermediate_size=inter, num_layers=layers, mlp_modules=[f"model.layers.{i}.mlp" for i in range(layers)],
        base_model=str(dense_dir)))
    moe_dir = root / f"moe-{name}"
    export(conv, moe_dir, check_tokens=0, progress=False)
    print(f"{name}: {params / 1e6:.0f}M params dense", flush=True)
    return dense_dir, moe_dir
