"""`dotmoe export`: write a conversion as a standard MoE checkpoint, streamed one tensor at a time.

Each expert becomes a contiguous block: its neurons' gate/up rows and down columns are sliced out of the
dense MLP (experts smaller than the largest are padded with zero neurons, which contribute exactly 0).
The factor k of `softmax` gating is folded into the expert down projections, the Qwen2-MoE shared-expert
gate is a zero vector (sigmoid(0) = 1/2) with the factor 2 folded into the shared down projection, and every
other tensor is copied unchanged. Everything is written to a temporary directory that is renamed at the end,
so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from dotmoe.atomic import staged_directory
from dotmoe.artifacts import META_FILE, TRAINED_WEIGHTS_FILE, Conversion, load_conversion
from dotmoe.errors import DotMoeError
from dotmoe.export_formats import ExportPlan, moe_config, plan_export
from dotmoe.guards import check_export_destination
from dotmoe.record import ConversionRecord
from dotmoe.run_dir import REMOTE_CODE, TOKENIZER_FILES, destination_lock

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportResult:
    """Where the model went, what format, parameter counts, and the parity check (if run)."""

    out_dir: Path
    plan: ExportPlan
    params: dict[str, int]
    parity: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The JSON-able record kept in a conversion's metadata and printed by the CLI."""
        return {"dir": str(self.out_dir), "architecture": self.plan.architecture, "exact": self.plan.exact,
                **self.params, "parity": self.parity}


class TensorSource:
    """Lazy access to the dense checkpoint's tensors (sharded or not), trained weights taking precedence."""

    def __init__(self, model_dir: Path, trained: Path | None):
        from dotmoe.guards import model_weight_files

        files = model_weight_files(model_dir)  # the model's own files only, never a stray copy beside them
        self.where: dict[str, Path] = {}
        shapes: dict[str, list[int]] = {}
        for f in files + ([trained] if trained else []):
            try:
                with safe_open(str(f), framework="pt") as fh:
                    names = list(fh.keys())
                    mine = {k: fh.get_slice(k).get_shape() for k in names}
            except Exception as exc:  # truncated or foreign file
                raise DotMoeError(f"cannot read the weights in {f}: {str(exc).splitlines()[0]}") from exc
            if f == trained:  # a trained tensor replaces the dense one: same name, same shape
                wrong = [k for k in names if k not in shapes or shapes[k] != mine[k]]
                if wrong:
                    k = wrong[0]
                    raise DotMoeError(f"corrupt convert output: {f}: tensor {k!r} "
                                      + (f"has shape {mine[k]}, the dense model's {shapes[k]}" if k in shapes
                                         else "is not a weight of the dense model"))
            shapes.update(mine)
            twice = [k for k in names if k in self.where] if f != trained else []  # trained weights override
            if twice:
                raise DotMoeError(f"tensor {twice[0]!r} is in both {self.where[twice[0]]} and {f}")
            self.where.update({k: f for k in names})
        self._open: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self.where)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise DotMoeError(f"tensor {name!r} missing from the model checkpoint")
        f = self.where[name]
        if f not in self._open:
            self._open[f] = safe_open(str(f), framework="pt")
        tensor = self._open[f].get_tensor(name)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DotMoeError(f"non-finite weights (NaN/inf) in {f}: tensor {name}")
        return tensor

    def release(self) -> None:
        """Close the files (unmapping the pages read so far, which otherwise stay resident)."""
        self._open.clear()


class _ShardWriter:
    """Accumulates tensors and flushes safetensors shards of at most `max_bytes` (plus the index)."""

    def __init__(self, out: Path, max_bytes: int, dtype: torch.dtype):
        self.out, self.max_bytes, self.dtype = out, max_bytes, dtype
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, int]] = []  # per shard: name -> numel
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.to(self.dtype).contiguous()
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor
        self.pending_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, str(self.out / f"shard-{len(self.shards):05d}.safetensors"), metadata={"format": "pt"})
        self.shards.append({k: v.numel() for k, v in self.pending.items()})
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> dict[str, int]:
        """Name the shards HF-style, write the index if there are several; return name -> numel."""
        self.flush()
        count, weight_map, numels = len(self.shards), {}, {}
        for i, shard in enumerate(self.shards):
            final = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.out / f"shard-{i:05d}.safetensors", self.out / final)
            weight_map.update({k: final for k in shard})
            numels.update(shard)
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return numels


def _expert_tensors(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, neurons: torch.Tensor, size: int,
                    down_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slice one expert's gate/up rows and down columns, zero-padded to `size` neurons."""
    pad = size - len(neurons)
    g, u = gate[neurons].float(), up[neurons].float()
    d = down[:, neurons].float() * down_scale
    if pad:
        g = torch.cat([g, g.new_zeros(pad, g.shape[1])])
        u = torch.cat([u, u.new_zeros(pad, u.shape[1])])
        d = torch.cat([d, d.new_zeros(d.shape[0], pad)], dim=1)
    return g, u, d


def _moe_tensors(conv: Conversion, plan: ExportPlan, layer: int, prefix: str, src: TensorSource,
                 expert_size: int) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is_routed_expert) of one layer's MoE block."""
    record = conv.record
    experts, top_k, shared = record.experts, record.top_k, record.shared
    gate, up, down = (src.get(f"{prefix}.{w}_proj.weight") for w in ("gate", "up", "down"))
    part = conv.partition[layer]
    # stock weights are renormalised top-k probabilities (sum 1); softmax gating sums to k, and so does the
    # stock approximation of mask gating. Only the custom class gives each selected expert exactly 1.
    scale = 1.0 if record.gating == "mask" and plan.custom else float(top_k)
    target = plan.target
    yield target.router_key(prefix), conv.routers[layer], False
    for e in range(experts):
        neurons = (part == e).nonzero().flatten()
        for name, t in zip(target.expert_keys(prefix, e), _expert_tensors(gate, up, down, neurons, expert_size, scale)):
            yield name, t, True
    if target.shared_expert:
        neurons = (part == experts).nonzero().flatten()  # shared column = last id; empty when shared == 0
        g, u, d = _expert_tensors(gate, up, down, neurons, shared, 2.0)
        for w, t in (("gate", g), ("up", u), ("down", d)):
            yield f"{prefix}.shared_expert.{w}_proj.weight", t, False
        yield f"{prefix}.shared_expert_gate.weight", gate.new_zeros(1, gate.shape[1]), False


def _remote_code(name: str, plan: ExportPlan) -> str:
    """The custom class's file `name` for this target: the template filled in with its stock classes, or the
    target's own file (Gemma-3: its model with stock Qwen2-MoE blocks)."""
    from importlib.resources import files

    target, folder = plan.target, files("dotmoe").joinpath("assets", "remote_code")
    if target.class_prefix is None:
        return folder.joinpath(name.replace(".py", f"_{target.name.removesuffix('_moe')}.py")).read_text()
    return folder.joinpath(name).read_text().replace("__BASE_CLASS__", target.class_prefix).replace("__BASE__",
                                                                                                  target.name)


def _model_card(cfg: dict, plan: ExportPlan, record: ConversionRecord, params: dict[str, int]) -> str:
    load = "AutoModelForCausalLM.from_pretrained(path" + (", trust_remote_code=True)" if plan.custom else ")")
    return "\n".join([
        f"# {plan.architecture} converted by dotmoe", "",
        f"Dense model `{record.base_model}` converted with `{record.method}` into {record.experts} experts, "
        f"top-{record.top_k} routing ({record.gating} gating)"
        + (f", shared expert of {record.shared} neurons" if record.shared else "") + ".", "",
        f"- total parameters: {params['total_params']:,}",
        f"- active parameters per token: {params['active_params']:,} "
        f"(all non-expert parameters incl. embeddings + k/E of routed expert parameters)",
        f"- active non-embedding parameters: {params['active_non_embedding_params']:,}",
        f"- validation perplexity at conversion: {record.val_ppl} (dense {record.dense_val_ppl})",
        f"- exact equivalent of the training-time sparse model: {plan.exact}" + (f" ({plan.note})" if plan.note else ""),
        "", "```python", "from transformers import AutoModelForCausalLM", f"model = {load}", "```", ""])


def _count_params(numels: dict[str, int], record: ConversionRecord, tied: bool) -> dict[str, int]:
    routed = sum(n for k, n in numels.items() if ".experts." in k)
    embedding = sum(n for k, n in numels.items() if k.endswith("embed_tokens.weight") or k.startswith("lm_head."))
    total = sum(numels.values())
    active = total - routed + routed * record.top_k // record.experts
    return {"total_params": total, "active_params": active, "active_non_embedding_params": active - embedding,
            "routed_expert_params": routed, "tied_embeddings": int(tied)}


def _write_tensors(writer: "_ShardWriter", conv, plan, src: "TensorSource", expert_size: int, tied: bool,
                   untie: bool, progress: bool) -> None:
    """Every tensor of the MoE checkpoint, streamed from `src` in its order: each gated MLP as its MoE tensors (on
    the layer's gate tensor), the rest as they are (a tied head left out, or with `untie` written as a copy)."""
    mlp_prefixes = conv.record.mlp_modules
    mlp_tensor_names = {f"{p}.{w}_proj.weight" for p in mlp_prefixes for w in ("gate", "up", "down")}
    for name in tqdm(src.names(), desc="export", unit="tensor", disable=not progress):
        if name in mlp_tensor_names:
            prefix = name.rsplit(".", 2)[0]  # model.layers.3.mlp.gate_proj.weight -> model.layers.3.mlp
            if name.endswith("gate_proj.weight"):  # emit the whole layer once, on its gate tensor
                layer = mlp_prefixes.index(prefix)
                for moe_name, tensor, _ in _moe_tensors(conv, plan, layer, prefix, src, expert_size):
                    writer.add(moe_name, tensor)
            continue
        if tied and name.startswith("lm_head."):
            continue
        tensor = src.get(name)
        writer.add(name, tensor)
        if untie and name.endswith("embed_tokens.weight"):
            writer.add("lm_head.weight", tensor.clone())  # its own storage (safetensors)


def export(convert_dir: str | Path, out: str | Path, fmt: str = "auto", dtype: str = "auto",
           max_shard_bytes: int = 2 * 1024**3, overwrite: bool = False, check_tokens: int = 256,
           pad_to: int = 8, progress: bool = True, require_complete: bool = True) -> ExportResult:
    """Write the conversion in `convert_dir` as a MoE checkpoint in `out` (see module doc); optionally check it.
    `require_complete=False` is for `convert` itself, which exports before it marks its output finished. One
    export at a time writes `out` (a second is refused, naming the first)."""
    with destination_lock(out):
        return _export(Path(convert_dir), Path(out), fmt, dtype, max_shard_bytes, overwrite, check_tokens, pad_to,
                       progress, require_complete)


def _export(convert_dir: Path, out: Path, fmt: str, dtype: str, max_shard_bytes: int, overwrite: bool,
            check_tokens: int, pad_to: int, progress: bool, require_complete: bool) -> ExportResult:
    conv = load_conversion(convert_dir, require_complete)
    record = conv.record
    base_dir = Path(record.base_model)
    if not (base_dir / "config.json").is_file():
        raise DotMoeError(f"the dense model of this conversion is missing: {base_dir}/config.json")
    dense = json.loads((base_dir / "config.json").read_text())
    plan = plan_export(dense, fmt, record.shared, record.gating, record.top_k)
    check_export_destination(convert_dir, out, base_dir, overwrite)
    trained = convert_dir / TRAINED_WEIGHTS_FILE
    src = TensorSource(base_dir, trained if trained.is_file() else None)
    out_dtype_name = (dense.get("dtype") or dense.get("torch_dtype") or "float32") if dtype == "auto" else dtype
    if out_dtype_name not in DTYPES:
        raise DotMoeError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {out_dtype_name!r}")
    routed_caps = record.capacities[: record.experts]
    # torch's CPU grouped_mm (transformers' default experts kernel) needs 16-byte strides: pad every expert with
    # zero neurons to a multiple of `pad_to` (8 covers bf16/fp16); zero neurons contribute exactly 0.
    expert_size = -(-max(routed_caps) // pad_to) * pad_to
    tied = bool(dense.get("tie_word_embeddings", False))
    untie = tied and plan.target.unties_lm_head  # the head written as a copy of the embedding (see ExportTarget)

    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_directory(out) as tmp:  # written whole, then renamed onto `out`
        writer = _ShardWriter(tmp, max_shard_bytes, DTYPES[out_dtype_name])
        _write_tensors(writer, conv, plan, src, expert_size, tied, untie, progress)
        numels = writer.finish()
        params = _count_params(numels, record, tied and not untie)
        cfg = moe_config(dense, plan, experts=record.experts, top_k=record.top_k, expert_size=expert_size,
                         shared=record.shared, gating=record.gating, dtype=out_dtype_name)
        if untie:
            cfg["tie_word_embeddings"] = False
        cfg["dotmoe"] = {**params, "method": record.method, "gating": record.gating, "exact": plan.exact,
                         "base_model": record.base_model,
                         "capacities": record.capacities}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        for f in TOKENIZER_FILES:
            if (base_dir / f).is_file():
                shutil.copy2(base_dir / f, tmp / f)
        if plan.custom:
            for f in REMOTE_CODE:
                (tmp / f).write_text(_remote_code(f, plan))
        shutil.copy2(convert_dir / META_FILE, tmp / META_FILE)
        (tmp / "README.md").write_text(_model_card(cfg, plan, record, params))
        parity = check_export(convert_dir, tmp, plan, check_tokens, require_complete) if check_tokens else {}
        if parity:
            (tmp / "parity.json").write_text(json.dumps(parity, indent=2))
            check_parity(parity, plan)
    return ExportResult(out, plan, params, parity)


@torch.no_grad()
def check_export(convert_dir: Path, model_dir: Path, plan: ExportPlan, tokens: int,
                 require_complete: bool = True) -> dict:
    """Logits of the reloaded export vs the training-time sparse model (fp32) on validation text."""
    from transformers import AutoModelForCausalLM

    from dotmoe.data import TextFiles, tokenize_stream
    from dotmoe.paths import default_data_file
    from dotmoe.sparse_model import load_sparse_model

    cfg = json.loads((model_dir / "config.json").read_text())
    reference, tokenizer, conv = load_sparse_model(convert_dir, round_to=DTYPES[cfg["dtype"]],
                                                   require_complete=require_complete)
    exported = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, trust_remote_code=plan.custom)
    exported.eval()
    base = conv.record.base_model
    ids = tokenize_stream(tokenizer, TextFiles([str(default_data_file("validation", base))]), tokens).unsqueeze(0)
    a = reference(input_ids=ids).logits
    b = exported(input_ids=ids).logits
    return {"tokens": ids.shape[1], "max_abs_logit_diff": float((a - b).abs().max()),
            "max_abs_logit": float(a.abs().max()),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()), "exact_format": plan.exact}


# An exact format reproduces the training-time sparse model up to float rounding: measured <= 7e-5 on logits of
# magnitude ~20 (SmolLM2, bf16 weights) and <= 1e-5 on the bundled model, i.e. < 1e-5 of the largest logit.
PARITY_TOLERANCE = 1e-3  # of the largest reference logit (at least 1)


def check_parity(parity: dict, plan: ExportPlan) -> None:
    """An exact export whose reloaded logits differ from the training-time model beyond `PARITY_TOLERANCE` is
    broken (damaged or changed inputs, a wrong weight layout): fail, naming the numbers."""
    bound = PARITY_TOLERANCE * max(1.0, parity["max_abs_logit"])
    if plan.exact and parity["max_abs_logit_diff"] > bound:
        raise DotMoeError(f"export check failed: the reloaded {plan.base} checkpoint's logits differ from the "
                          f"converted model's by up to {parity['max_abs_logit_diff']:.3g} (allowed {bound:.3g}), "
                          f"top-1 agreement {parity['top1_agreement']:.4f} on {parity['tokens']} tokens; nothing "
                          "was written")
