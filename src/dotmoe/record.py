"""The conversion record (`dotmoe_meta.json`): one typed dataclass, validated at construction, one writer
(`artifacts.write_record`) and one reader (`artifacts.read_record`).

Every mode writes the same record: the MoE's structure (`method`, `mode`, shapes, experts, capacities, the dense
model it came from), the run's outcome (tokens, perplexities, curves) and its resources. Fields one mode has and
another lacks are None (a mode's own fields are then left out of the JSON); a record written before a field existed loads with its default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

RECORD_VERSION = 1
MODES = ("joint", "layerwise", "prune")


class RecordError(ValueError):
    """A record field is missing or has a wrong type or value (the message names it)."""


def is_int(v) -> bool:
    """An int that is not a bool (JSON true/false load as bools)."""
    return isinstance(v, int) and not isinstance(v, bool)


# (field, check, what it must be): the fields every record needs, in the order they are checked
_REQUIRED = (
    ("method", lambda v: isinstance(v, str), "a string"),
    ("base_model", lambda v: isinstance(v, str) and v, "a path"),
    ("num_layers", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    ("intermediate_size", lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    ("experts", lambda v: is_int(v) and v >= 2, "an integer >= 2"),
    ("top_k", lambda v: is_int(v) and 1 <= v, "an integer >= 1"),
    ("shared", lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    ("drop", lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    ("mlp_modules", lambda v: isinstance(v, list) and all(isinstance(m, str) for m in v), "a list of module names"),
)


# one mode's fields, and provenance filled in by the writer: not written while None
_LEFT_OUT_WHEN_NONE = frozenset(("layer_errors", "calibration_tokens", "kept_neurons", "export", "base_fingerprint",
                                 "trained_weights_sha256"))


@dataclass
class ConversionRecord:
    """What a conversion made and how it went. `mode`: joint (the whole model trained or training-free),
    layerwise, or prune (a dense model with fewer neurons: no gating, no capacities)."""

    # structure (checked at construction)
    method: str
    base_model: str
    num_layers: int
    intermediate_size: int
    experts: int
    top_k: int
    mlp_modules: list[str]
    shared: int = 0
    drop: int = 0
    gating: str | None = None
    capacities: list[int] | None = None
    mode: str = "joint"
    config: dict = field(default_factory=dict)
    # outcome
    train_tokens: int = 0
    steps: int = 0
    processes: int = 1
    wall_seconds: float | None = None
    val_ppl: float | None = None
    dense_val_ppl: float | None = None
    ppl_ratio: float | None = None
    final_terms: dict = field(default_factory=dict)
    eval_curve: list | None = None
    best_step: int | None = None
    eval_steps: list | None = None
    refit_errors: list | None = None
    refit_ridges: list | None = None
    layer_errors: list | None = None  # layerwise: each layer's FFN error on the calibration tokens
    calibration_tokens: int | None = None  # the number used: whole seq_len sequences, at least one
    kept_neurons: int | None = None  # prune: neurons kept per layer
    # resources and provenance
    peak_rss_mb: dict | None = None  # a StagePeaks while the run goes on
    stage_seconds: dict | None = None
    precision: str | None = None
    precision_reason: str | None = None
    export: dict | None = None  # the export beside the conversion (export.Exported.summary())
    base_fingerprint: dict | None = None  # sha256 per dense weight file (filled by write_record)
    trained_weights_sha256: str | None = None  # filled by write_record when trained weights were written
    format_version: int = RECORD_VERSION
    extra: dict = field(default_factory=dict)  # keys of a newer record this version does not know, kept as read

    def __post_init__(self) -> None:
        for key, ok, kind in _REQUIRED:
            if not ok(getattr(self, key)):
                raise RecordError(f"{key!r} must be {kind}, got {getattr(self, key)!r}")
        if len(self.mlp_modules) != self.num_layers:
            raise RecordError(f"{len(self.mlp_modules)} mlp_modules for {self.num_layers} layers")
        if self.mode not in MODES:
            raise RecordError(f"'mode' must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.is_prune:
            return
        from dotmoe.router import GATING_MODES

        experts, shared, drop, caps = self.experts, self.shared, self.drop, self.capacities
        if not self.top_k < experts:
            raise RecordError(f"top_k {self.top_k} must be smaller than experts {experts}")
        if self.gating not in GATING_MODES:
            raise RecordError(f"'gating' must be one of {', '.join(GATING_MODES)}, got {self.gating!r}")
        if drop and not shared:
            raise RecordError(f"drop={drop} without a shared expert")
        columns = experts + (1 if shared else 0) + (1 if drop else 0)
        if not isinstance(caps, list) or len(caps) != columns or not all(is_int(c) and c >= 1 for c in caps):
            raise RecordError(f"'capacities' must be {columns} integers >= 1, got {caps!r}")
        if shared and caps[experts] != shared:
            raise RecordError(f"the shared capacity {caps[experts]} is not shared={shared}")
        if drop and caps[-1] != drop:
            raise RecordError(f"the dropped capacity {caps[-1]} is not drop={drop}")
        if sum(caps) != self.intermediate_size:
            raise RecordError(f"capacities sum to {sum(caps)}, not intermediate_size {self.intermediate_size}")

    @property
    def is_prune(self) -> bool:
        return self.method == "prune"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConversionRecord:
        """A record from its JSON form; a missing required key is named, unknown keys are kept in `extra`."""
        data = dict(data)
        data.setdefault("drop", 0)  # written before dropped neurons existed
        if "mode" not in data:  # written before every mode recorded itself
            data["mode"] = "prune" if data.get("method") == "prune" else "joint"
        for key, _, _ in _REQUIRED:
            if key not in data:
                raise RecordError(f"missing {key!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**{k: v for k, v in data.items() if k in known}, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: every field (those of one mode only, and provenance not yet filled, left out when None),
        then `extra`."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and (value is not None or f.name not in _LEFT_OUT_WHEN_NONE):
                out[f.name] = value
        return {**out, **self.extra}
