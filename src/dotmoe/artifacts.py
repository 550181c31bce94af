"""The conversion output: trained partition + routers (safetensors) and metadata (JSON)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dotmoe.errors import DotMoeError

ASSIGNMENT_FILE = "assignment.safetensors"
META_FILE = "dotmoe_meta.json"
TRAINED_WEIGHTS_FILE = "trained_weights.safetensors"  # only when the dense weights were trained too


def save_conversion(out: Path, partition: torch.Tensor, routers: list[torch.Tensor], model, summary: dict) -> None:
    """Write assignment.safetensors (partition [L, N], router.{l} [E, d]) and dotmoe_meta.json atomically."""
    tensors = {"partition": partition.to(torch.int64).contiguous()}
    tensors.update({f"router.{i}": w.float().contiguous() for i, w in enumerate(routers)})
    tmp = out / (ASSIGNMENT_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "dotmoe-assignment-v1"})
    os.replace(tmp, out / ASSIGNMENT_FILE)
    write_meta(out, summary)


def write_meta(out: Path, summary: dict) -> None:
    """Write (or rewrite) dotmoe_meta.json atomically."""
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, out / META_FILE)


def save_trained_weights(out: Path, state: dict[str, torch.Tensor]) -> None:
    """Write the dense weights of a model whose FFN/other weights were trained (`trained_weights`' output)."""
    tmp = out / (TRAINED_WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / TRAINED_WEIGHTS_FILE)


def trained_weights(model, keep: bool = True) -> dict[str, torch.Tensor]:
    """The dense weights of a model whose FFN/other weights were trained, MoeMLP wrappers and routers removed.

    Keys are the original checkpoint names; a tied output embedding is stored once (as the input one). Sharded
    (FSDP2) parameters are gathered whole, so under FSDP every process must call this; with `keep=False` (the
    processes that do not write) each gathered tensor is dropped at once and an empty dict is returned.
    """
    from dotmoe.sharding import full_tensor

    state = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if ".router." in name or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        whole = full_tensor(tensor.detach())
        if keep:
            state[name.replace(".dense.", ".")] = whole.contiguous()
    return state


@dataclass
class Conversion:
    """A loaded conversion output."""

    partition: torch.Tensor
    routers: list[torch.Tensor]
    meta: dict


def load_conversion(path: str | Path) -> Conversion:
    """Read a `dotmoe convert` output directory, with clear errors if it is incomplete or corrupt."""
    path = Path(path)
    if not (path / ASSIGNMENT_FILE).is_file() or not (path / META_FILE).is_file():
        raise DotMoeError(f"{path} is not a complete dotmoe convert output (needs {ASSIGNMENT_FILE} and {META_FILE})")
    try:
        meta = json.loads((path / META_FILE).read_text())
        tensors = load_file(str(path / ASSIGNMENT_FILE))
    except Exception as exc:  # JSON or safetensors corruption
        raise DotMoeError(f"corrupt convert output in {path}: {exc}") from exc
    layers = meta.get("num_layers")
    if "partition" not in tensors or layers is None or any(f"router.{i}" not in tensors for i in range(layers)):
        raise DotMoeError(f"corrupt convert output in {path}: missing partition or router tensors")
    return Conversion(tensors["partition"], [tensors[f"router.{i}"] for i in range(layers)], meta)
