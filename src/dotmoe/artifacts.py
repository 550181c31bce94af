"""The conversion output: trained partition + routers (safetensors) and metadata (JSON)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dotmoe.atomic import atomic_write
from dotmoe.errors import DotMoeError
from dotmoe.record import ConversionRecord, RecordError, is_int
from dotmoe.run_dir import CHECKPOINT, COMPLETE, LAYERWISE_CHECKPOINT, META_FILE, drop_previous, file_sha256

ASSIGNMENT_FILE = "assignment.safetensors"
TRAINED_WEIGHTS_FILE = "trained_weights.safetensors"  # only when the dense weights were trained too


def save_conversion(out: Path, partition: torch.Tensor, routers: list[torch.Tensor], record: ConversionRecord) -> None:
    """Write assignment.safetensors (partition [L, N], router.{l} [E, d]) and dotmoe_meta.json atomically."""
    tensors = {"partition": partition.to(torch.int64).contiguous()}
    tensors.update({f"router.{i}": w.float().contiguous() for i, w in enumerate(routers)})
    atomic_write(out / ASSIGNMENT_FILE,
                  lambda tmp: save_file(tensors, str(tmp), metadata={"format": "dotmoe-assignment-v1"}))
    write_record(out, record)


def base_fingerprint(model_dir: str | Path) -> dict[str, str]:
    """sha256 of each weight file of the dense model (file name -> hex digest): a conversion holds only the
    partition, routers and refitted tensors, so merging it with other weights than it was made from is wrong."""
    from dotmoe.guards import model_weight_files

    found = {}
    for f in model_weight_files(Path(model_dir)):
        found[f.name] = file_sha256(f)
    return found


def check_base_fingerprint(record: ConversionRecord, meta_file: Path) -> None:
    """The dense model's weights are still those the conversion was made from (records with a fingerprint)."""
    saved = record.base_fingerprint
    if not isinstance(saved, dict):
        return  # written before fingerprints existed
    try:
        now = base_fingerprint(record.base_model)
    except DotMoeError:
        return  # a missing or unreadable base model is reported by whoever needs its weights
    changed = sorted(set(saved) ^ set(now) | {f for f in saved if f in now and saved[f] != now[f]})
    if changed:
        raise DotMoeError(f"{meta_file}: the weights of its dense model {record.base_model} changed since the "
                          f"conversion ({', '.join(changed[:3])}); convert that model again")


def write_record(out: Path, record: ConversionRecord) -> None:
    """Write (or rewrite) dotmoe_meta.json atomically, with the dense model's fingerprint (`base_fingerprint`) and
    the digest of the trained weights beside it: the one writer of the record."""
    if record.base_fingerprint is None:
        record.base_fingerprint = base_fingerprint(record.base_model)
    trained = out / TRAINED_WEIGHTS_FILE  # written before the record: a later reader knows it must be there
    if trained.is_file():
        record.trained_weights_sha256 = file_sha256(trained)
    atomic_write(out / META_FILE, lambda tmp: tmp.write_text(json.dumps(record.to_dict(), indent=2)))


def mark_complete(out: Path) -> None:
    """The last write of a conversion: only a directory with this marker is a finished result."""
    atomic_write(out / COMPLETE, lambda tmp: tmp.write_text("dotmoe conversion finished\n"))
    drop_previous(out)  # an --overwrite run: only now does the result it replaces go


def save_trained_weights(out: Path, state: dict[str, torch.Tensor]) -> None:
    """Write the dense weights of a model whose FFN/other weights were trained (`trained_weights`' output)."""
    atomic_write(out / TRAINED_WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def trained_weights(model, keep: bool = True, only=None) -> dict[str, torch.Tensor]:
    """The dense weights of a model whose FFN/other weights were trained, MoeMLP wrappers and routers removed.

    Keys are the original checkpoint names; a tied output embedding is stored once (as the input one). Sharded
    (FSDP2) parameters are gathered whole, so under FSDP every process must call this; with `keep=False` (the
    processes that do not write) each gathered tensor is dropped at once and an empty dict is returned.
    `only(name)` keeps a subset (e.g. the refitted down projections).
    """
    from dotmoe.sharding import full_tensor

    state = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if ".router." in name or id(tensor) in seen or (only is not None and not only(name)):
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
    record: ConversionRecord

    @property
    def meta(self) -> dict:
        """The record in its JSON form."""
        return self.record.to_dict()


def read_record(path: str | Path, require_complete: bool = True) -> ConversionRecord:
    """The validated record (dotmoe_meta.json) of a conversion directory: the one reader. Refuses a directory that
    is not a conversion, an unfinished one (no COMPLETE marker, unless `require_complete` is off) and a record with
    missing fields or wrong types or values."""
    path = Path(path)
    meta_file = path / META_FILE
    if not path.is_dir():
        raise DotMoeError(f"{path} is not a complete dotmoe convert output (not a directory)")
    if not meta_file.exists() and not (path / CHECKPOINT).exists() and not (path / LAYERWISE_CHECKPOINT).exists():
        raise DotMoeError(f"{path} is not a complete dotmoe convert output (needs {ASSIGNMENT_FILE} and {META_FILE})")
    if require_complete and not (path / COMPLETE).is_file():
        raise DotMoeError(f"{path} is an unfinished conversion (no {COMPLETE} marker: interrupted, failed or still "
                          f"running); finish it with `dotmoe convert ... --out {path} --resume`")
    try:
        if not meta_file.is_file():
            raise ValueError("missing or not a regular file")
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DotMoeError(f"corrupt convert output: {meta_file}: {exc}") from exc
    if not isinstance(meta, dict):
        raise DotMoeError(f"corrupt convert output: {meta_file} is not a JSON object")
    try:
        return ConversionRecord.from_dict(meta)
    except RecordError as exc:
        raise DotMoeError(f"corrupt convert output: {meta_file}: {exc}") from exc


def load_conversion(path: str | Path, require_complete: bool = True) -> Conversion:
    """Read a `dotmoe convert` output directory: the one reader of its record and assignment tensors (export,
    eval, the sparse reference model, --init-from), with a one-line error naming the file and what is wrong."""
    path = Path(path)
    record = read_record(path, require_complete)
    if record.is_prune:
        raise DotMoeError(f"{path} is a pruned dense model (--method prune), not an MoE conversion; it is already "
                          f"exported in {path / 'model'}")
    file = path / ASSIGNMENT_FILE
    try:
        if not file.is_file():
            raise ValueError("missing or not a regular file")
        tensors = load_file(str(file))
    except Exception as exc:  # safetensors raises several types for truncated or foreign files
        raise DotMoeError(f"corrupt convert output: {file}: {exc}") from exc
    layers, neurons, experts = record.num_layers, record.intermediate_size, record.experts
    caps = record.capacities

    def bad(what: str):
        return DotMoeError(f"corrupt convert output: {file}: {what}")

    expected = {"partition"} | {f"router.{i}" for i in range(layers)}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise bad(f"{'missing ' + ', '.join(missing[:3]) if missing else ''}"
                  f"{'; ' if missing and extra else ''}{'unexpected ' + ', '.join(extra[:3]) if extra else ''} "
                  f"(meta says {layers} layers)")
    partition = tensors["partition"]
    if partition.dtype.is_floating_point or partition.dtype == torch.bool or partition.is_complex():
        raise bad(f"partition must hold integer expert ids, not {partition.dtype}")
    if tuple(partition.shape) != (layers, neurons):
        raise bad(f"partition has shape {list(partition.shape)}, expected [{layers}, {neurons}] (layers, neurons)")
    partition = partition.to(torch.int64)
    lo, hi = int(partition.min()), int(partition.max())
    if lo < 0 or hi >= len(caps):
        raise bad(f"partition holds expert id {hi if hi >= len(caps) else lo}, valid ids are 0..{len(caps) - 1} "
                  f"({experts} experts{' + the shared column' if record.shared else ''}"
                  f"{' + the dropped column' if record.drop else ''})")
    for layer, row in enumerate(partition):
        counts = torch.bincount(row, minlength=len(caps)).tolist()
        if counts != caps:
            e = next(i for i, (c, k) in enumerate(zip(counts, caps)) if c != k)
            raise bad(f"layer {layer}: expert {e} holds {counts[e]} neurons, its capacity is {caps[e]}")
    routers = [tensors[f"router.{i}"] for i in range(layers)]
    for i, r in enumerate(routers):
        if not r.dtype.is_floating_point or r.dim() != 2 or r.shape[0] != experts or r.shape != routers[0].shape:
            raise bad(f"router.{i} has shape {list(r.shape)} ({r.dtype}), expected [{experts}, hidden] floats")
        if not bool(torch.isfinite(r).all()):
            raise bad(f"router.{i} holds non-finite values (NaN/inf): the trained weights are broken")
    _check_base_model(record, routers[0].shape[1], meta_file=path / META_FILE)
    check_base_fingerprint(record, path / META_FILE)
    _check_trained_weights(path, record.trained_weights_sha256)
    return Conversion(partition, [r.float() for r in routers], record)


def _check_trained_weights(path: Path, digest) -> None:
    """The trained (e.g. refitted) weights a conversion recorded are there, unchanged: without them an export
    would silently merge the dense model's own FFNs with a partition and routers made for others."""
    if not isinstance(digest, str):
        return  # none were written (or a record from before this check)
    file = path / TRAINED_WEIGHTS_FILE
    if not file.is_file():
        raise DotMoeError(f"corrupt convert output: {file} is missing (the conversion wrote its trained weights "
                          "there); convert again")
    if file_sha256(file) != digest:
        raise DotMoeError(f"corrupt convert output: {file} is not the file this conversion wrote (its sha256 "
                          "differs); convert again")


def _check_base_model(record: ConversionRecord, hidden: int, meta_file: Path) -> None:
    """When the dense model's config.json is readable, its shapes are the conversion's."""
    config = Path(record.base_model) / "config.json"
    if not config.is_file():
        return  # a missing base model is reported by whoever needs its weights
    try:
        dense = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise DotMoeError(f"{meta_file}: its base model's {config} is unreadable: {exc}") from exc
    if not isinstance(dense, dict):
        raise DotMoeError(f"{meta_file}: its base model's {config} is not a JSON object")
    dense = dense.get("text_config", dense) if isinstance(dense.get("text_config"), dict) else dense
    mine = {"num_hidden_layers": record.num_layers, "intermediate_size": record.intermediate_size,
            "hidden_size": hidden}
    diff = [f"{k} {dense[k]} vs {v}" for k, v in mine.items() if is_int(dense.get(k)) and dense[k] != v]
    if diff:
        raise DotMoeError(f"corrupt convert output: {meta_file}: its base model {record.base_model} does not match "
                          f"the conversion ({', '.join(diff)}; model vs conversion)")
