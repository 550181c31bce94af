"""The conversion record: one typed writer/reader pair, older records load, bad ones are named; atomic writes."""

import json

import pytest

from dotmoe.atomic import atomic_write, staged_directory
from dotmoe.errors import DotMoeError
from dotmoe.record import ConversionRecord, RecordError
from dotmoe.written import WRITTEN, read_written, written_by_dotmoe

BASE = dict(method="dotmoe", base_model="/m", num_layers=2, intermediate_size=64, experts=4, top_k=2,
            mlp_modules=["model.layers.0.mlp", "model.layers.1.mlp"], gating="softmax", capacities=[16, 16, 16, 16])


def test_round_trip_keeps_every_field_and_unknown_keys():
    record = ConversionRecord(**BASE, val_ppl=3.5, layer_errors=None)
    data = json.loads(json.dumps(record.to_dict()))
    assert data["mode"] == "joint" and data["drop"] == 0 and data["refit_errors"] is None
    assert "layer_errors" not in data and "export" not in data  # one mode's fields are left out while None
    again = ConversionRecord.from_dict({**data, "from_a_newer_version": [1]})
    assert again.extra == {"from_a_newer_version": [1]} and again.to_dict()["from_a_newer_version"] == [1]
    assert {k: v for k, v in again.to_dict().items() if k != "from_a_newer_version"} == data


def test_an_older_record_loads_with_defaults():
    old = {**BASE, "shared": 0}  # no mode, no drop (written by earlier versions)
    assert ConversionRecord.from_dict(old).mode == "joint" and ConversionRecord.from_dict(old).drop == 0
    pruned = {**old, "method": "prune", "gating": None, "capacities": None}
    assert ConversionRecord.from_dict(pruned).mode == "prune"


@pytest.mark.parametrize("change, message", [
    ({"experts": 1}, "'experts' must be an integer >= 2, got 1"),
    ({"top_k": 4}, "top_k 4 must be smaller than experts 4"),
    ({"capacities": [16, 16, 16, 15]}, "capacities sum to 63, not intermediate_size 64"),
    ({"drop": 4, "capacities": [15, 15, 15, 15, 4]}, "drop=4 without a shared expert"),
    ({"mlp_modules": ["a"]}, "1 mlp_modules for 2 layers"),
    ({"mode": "other"}, "'mode' must be one of joint, layerwise, prune, got 'other'"),
    ({"gating": "hard"}, "'gating' must be one of"),
])
def test_a_bad_record_names_its_field(change, message):
    with pytest.raises(RecordError, match=message.replace("(", r"\(").replace("[", r"\[")):
        ConversionRecord(**{**BASE, **change})


def test_a_missing_field_is_named():
    with pytest.raises(RecordError, match="missing 'intermediate_size'"):
        ConversionRecord.from_dict({k: v for k, v in BASE.items() if k != "intermediate_size"})


def test_atomic_write_keeps_the_previous_file_on_failure(tmp_path):
    target = tmp_path / "f.json"
    atomic_write(target, lambda tmp: tmp.write_text("old"))

    def full_disk(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(DotMoeError, match="cannot write the file: No space left on device \\(kept\\)"):
        atomic_write(target, full_disk, what="the file", note="kept")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [WRITTEN, "f.json"]
    assert read_written(tmp_path)["f.json"][:2] == [3, target.stat().st_mtime_ns]  # the record: still the old file


def test_staged_directory_replaces_only_when_complete(tmp_path):
    target = tmp_path / "model"
    with staged_directory(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError):
        with staged_directory(target) as tmp:
            (tmp / "b").write_text("2")
            raise ValueError("stopped half-way")
    assert sorted(p.name for p in target.iterdir()) == [WRITTEN, "a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with staged_directory(target) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == [WRITTEN, "b"] and written_by_dotmoe(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
