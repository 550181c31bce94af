"""Hostile input and interrupted runs: one line on stderr, exit code 2, and nothing written or destroyed.

The conversions here are tiny (a 2-layer random Llama, a few steps) and shared through module fixtures.
"""

import json
import os
import shutil
import signal

import pytest
import torch
from conftest import cli_error, save_tiny_llama, tiny_convert_argv, tree
from safetensors.torch import load_file, save_file
from test_export import fake_conversion

from dotmoe.artifacts import load_conversion
from dotmoe.cli import main
from dotmoe.train import MoeTrainingModule


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def reference(joint_reference):
    """(argv without --out, output dir) of an uninterrupted 20-step conversion, checkpoint every 5 steps."""
    return joint_reference


def _interrupt_at_call(monkeypatch, n: int, signum=signal.SIGINT) -> None:
    """The n-th training forward sends this process `signum` (as Ctrl-C or `kill` would)."""
    original, calls = MoeTrainingModule.forward, {"n": 0}

    def forward(self, input_ids, tau, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signum)
        return original(self, input_ids, tau, **kwargs)

    monkeypatch.setattr(MoeTrainingModule, "forward", forward)


@pytest.fixture(scope="module")
def interrupted(work, reference):
    """An output directory of the reference run interrupted (SIGINT, in process) after 5 steps."""
    argv, _ = reference
    out = work / "interrupted"
    with pytest.MonkeyPatch.context() as mp:
        _interrupt_at_call(mp, 5)
        assert main(argv + ["--out", str(out)]) == 130
    assert (out / "checkpoint.pt").is_file() and not (out / "COMPLETE").exists()
    return out


@pytest.fixture(scope="module")
def exported(work, tiny_llama_dir):
    """A finished (fake) conversion of the tiny model and its export."""
    conv = fake_conversion(tiny_llama_dir, work / "conv")
    assert main(["export", "--from", str(conv), "--out", str(work / "moe"), "--check-tokens", "0"]) == 0
    return conv, work / "moe"


def _copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


# ---- weights: only the model's own files --------------------------------------------------------------------------

def _add_stray_copy(model_dir):
    """What Mistral repos ship: consolidated.safetensors, the same weights again under other names."""
    tensors = load_file(str(model_dir / "model.safetensors"))
    save_file({"consolidated." + k: v.clone() for k, v in tensors.items()}, str(model_dir / "consolidated.safetensors"))


def test_stray_weight_file_beside_the_model_is_never_read(work, tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from dotmoe.export import TensorSource
    from dotmoe.guards import model_weight_files
    from dotmoe.speed import weight_bytes

    mistral_like = _copy(tiny_llama_dir, tmp_path / "dense")
    _add_stray_copy(mistral_like)
    assert model_weight_files(mistral_like) == [mistral_like / "model.safetensors"]
    assert sorted(TensorSource(mistral_like, None).names()) == sorted(TensorSource(tiny_llama_dir, None).names())
    assert weight_bytes(mistral_like) == weight_bytes(tiny_llama_dir)
    for name, dense in (("clean", tiny_llama_dir), ("stray", mistral_like)):
        conv = fake_conversion(dense, tmp_path / f"conv-{name}")
        assert main(["export", "--from", str(conv), "--out", str(tmp_path / name), "--check-tokens", "8"]) == 0
    clean, stray = (json.loads((tmp_path / n / "config.json").read_text())["dotmoe"] for n in ("clean", "stray"))
    assert stray["total_params"] == clean["total_params"]
    assert tree(tmp_path / "stray")["model.safetensors"] == tree(tmp_path / "clean")["model.safetensors"]

    sharded = tmp_path / "sharded"  # the same with an index: only the shards it names
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(sharded, max_shard_size="200KB")
    save_file({"x." + k: v for k, v in load_file(str(tiny_llama_dir / "model.safetensors")).items()},
              str(sharded / "consolidated.safetensors"))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert {f.name for f in model_weight_files(sharded)} == set(index["weight_map"].values())
    assert len(set(index["weight_map"].values())) > 1


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "model.safetensors.index.json").write_text("{not json"), "not a valid safetensors index"),
    (lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": "../../x.safetensors"}}'),
     "outside"),
    (lambda d: next(d.glob("model-0000*.safetensors")).unlink(), "is missing"),
    (lambda d: (d / "model.safetensors.index.json").unlink(), "has no model.safetensors"),
])
def test_bad_weight_index_is_one_line(damage, message, work, tiny_llama_dir, tiny_text, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = tmp_path / "m"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(model, max_shard_size="200KB")
    shutil.copy(tiny_llama_dir / "tokenizer.json", model)
    shutil.copy(tiny_llama_dir / "tokenizer_config.json", model)
    damage(model)
    assert message in cli_error(tiny_convert_argv(work, model, tiny_text, tmp_path / "o"), capsys)
    assert not (tmp_path / "o").exists()


# ---- outputs never overlap inputs, never replace a result silently ------------------------------------------------

def test_output_that_is_contains_or_lies_inside_an_input_is_refused(work, reference, exported, tiny_llama_dir,
                                                                    tiny_text, tmp_path, capsys):
    conv, moe = exported
    before = tree(conv), tree(tiny_llama_dir)
    for out, relation in [(conv, "is the conversion"), (conv.parent, "contains the conversion"),
                          (conv / "layerwise", "lies inside the conversion"),
                          (tiny_llama_dir / "moe", "lies inside the dense model")]:
        line = cli_error(["export", "--from", str(conv), "--out", str(out), "--overwrite"], capsys)
        assert relation in line
    argv, _ = reference
    for out, relation in [(tiny_llama_dir, "is the model"), (tiny_llama_dir / "out", "lies inside the model"),
                          (tiny_text.parent, "contains the data file")]:
        assert relation in cli_error(argv + ["--out", str(out), "--overwrite"], capsys)
    assert "is not an earlier dotmoe eval report" in cli_error(
        ["eval", "--model", str(moe), "--out", str(moe / "config.json")], capsys)
    (tmp_path / "link").symlink_to(conv, target_is_directory=True)
    assert "symbolic link" in cli_error(["export", "--from", str(conv), "--out", str(tmp_path / "link"),
                                         "--overwrite"], capsys)
    assert (tree(conv), tree(tiny_llama_dir)) == before


def test_convert_never_replaces_a_finished_result_or_an_interrupted_run(work, reference, interrupted, tmp_path,
                                                                        capsys):
    argv, finished = reference
    for source, message in [(finished, "holds a finished conversion"),
                            (interrupted, "holds an interrupted run's checkpoint (pass --resume")]:
        out = _copy(source, tmp_path / source.name)
        before = tree(out)
        assert message in cli_error(argv + ["--out", str(out)], capsys)
        assert tree(out) == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert "did not write or that changed since (notes.txt)" in cli_error(argv + ["--out", str(tmp_path / "mine")],
                                                                              capsys)
    assert "pass only one" in cli_error(argv + ["--out", str(tmp_path / "new"), "--resume", "--overwrite"], capsys)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and not (tmp_path / "new").exists()

    out = tmp_path / finished.name  # --overwrite replaces it: a new, complete result
    assert main(argv + ["--out", str(out), "--overwrite", "--seed", "6"]) == 0
    assert (out / "COMPLETE").is_file() and not (out / ".dotmoe-previous").exists()
    assert load_conversion(out).meta["config"]["seed"] == 6


def test_resume_needs_a_checkpoint(work, reference, tmp_path, capsys):
    argv, finished = reference
    (tmp_path / "empty").mkdir()
    for out, why in [(tmp_path / "new", "does not exist"), (tmp_path / "empty", "holds no checkpoint"),
                     (_copy(finished, tmp_path / "done"), "holds a finished conversion")]:
        line = cli_error(argv + ["--out", str(out), "--resume"], capsys)
        assert "nothing to resume" in line and why in line
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "checkpoint.pt").write_bytes(b"\0" * 100)
    assert "cannot read the checkpoint" in cli_error(argv + ["--out", str(tmp_path / "garbage"), "--resume"], capsys)
    assert not (tmp_path / "new").exists() and not any((tmp_path / "empty").iterdir())


@pytest.mark.parametrize("change, named", [
    (["--seed", "8"], "seed 7 -> 8"), (["--gating", "mask"], "gating 'softmax' -> 'mask'"),
    (["--tokens", "2048"], "tokens 2560 -> 2048"), (["--experts", "8"], "experts 4 -> 8"),
    (["--mode", "layerwise"], "mode 'joint' -> 'layerwise'"),
])
def test_resume_with_other_settings_is_refused_naming_them(change, named, reference, interrupted, tmp_path, capsys):
    argv, _ = reference
    out = _copy(interrupted, tmp_path / "run")
    before = tree(out)
    line = cli_error(argv + ["--out", str(out), "--resume", *change], capsys)
    assert "written with other settings" in line and named in line
    assert tree(out) == before


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint_and_resumes(reference, tmp_path, monkeypatch,
                                                                                capsys):
    import errno

    argv, finished = reference
    out = tmp_path / "full"
    real_save, calls = torch.save, {"n": 0}

    def filling_save(obj, f, *a, **k):
        calls["n"] += str(f).endswith("checkpoint.pt.tmp")  # not the best validation state's writes
        if calls["n"] == 2:  # the second checkpoint: the disk fills half-way through the write
            open(f, "wb").write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", filling_save)
    line = cli_error(argv + ["--out", str(out)], capsys)
    assert "No space left on device" in line and "the previous checkpoint is intact" in line
    monkeypatch.setattr(torch, "save", real_save)
    assert not (out / "checkpoint.pt.tmp").exists() and not (out / "COMPLETE").exists()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 5
    assert main(argv + ["--out", str(out), "--resume"]) == 0
    resumed, full = load_conversion(out), load_conversion(finished)
    assert torch.equal(resumed.partition, full.partition)
    assert resumed.meta["final_terms"]["loss"] == full.meta["final_terms"]["loss"]


# ---- a conversion is complete only at the very end; one validated reader ------------------------------------------

def test_unfinished_conversion_is_never_taken_for_a_result(work, reference, interrupted, tmp_path, capsys,
                                                           monkeypatch):
    argv, finished = reference
    line = cli_error(["export", "--from", str(interrupted), "--out", str(tmp_path / "x")], capsys)
    assert "unfinished conversion" in line and "--resume" in line
    assert "unfinished" in cli_error(argv + ["--out", str(tmp_path / "y"), "--init-from", str(interrupted)], capsys)

    def die(out):  # the process dies after everything else is written, just before the marker
        raise KeyboardInterrupt

    monkeypatch.setattr("dotmoe.artifacts.mark_complete", die)
    out = tmp_path / "crashed"
    free = ["--tokens", "0", "--export-format", "auto"]  # training-free: its refit is checkpointed
    assert main(argv + ["--out", str(out), *free]) == 130
    assert "resume with: dotmoe convert" in capsys.readouterr().err
    assert (out / "model" / "config.json").is_file() and (out / "dotmoe_meta.json").is_file()
    assert "unfinished" in cli_error(["eval", "--model", str(out / "model"), "--tokens", "256"], capsys)
    assert "unfinished" in cli_error(["export", "--from", str(out), "--out", str(tmp_path / "z")], capsys)
    assert "holds an interrupted run's checkpoint" in cli_error(argv + ["--out", str(out), *free], capsys)
    assert not any((tmp_path / n).exists() for n in "xyz") and not (out / "model" / "eval.json").exists()
    monkeypatch.undo()
    assert main(argv + ["--out", str(out), *free, "--resume"]) == 0
    assert (out / "COMPLETE").is_file() and load_conversion(out).meta["steps"] == 0
    assert main(argv + ["--out", str(out), *free, "--overwrite"]) == 0 and (out / "COMPLETE").is_file()


def _edit_assignment(conv, edit):
    tensors = load_file(str(conv / "assignment.safetensors"))
    edit(tensors)
    save_file(tensors, str(conv / "assignment.safetensors"))


def _edit_meta(conv, edit):
    meta = json.loads((conv / "dotmoe_meta.json").read_text())
    edit(meta)
    (conv / "dotmoe_meta.json").write_text(json.dumps(meta))


EDITS = {  # name: (edit of a finished conversion, what the one line must say)
    "short partition": (lambda c: _edit_assignment(c, lambda t: t.update(
        partition=t["partition"][:, :-1].contiguous())),
                        "partition has shape [2, 63], expected [2, 64]"),
    "over capacity": (lambda c: _edit_assignment(c, lambda t: t["partition"][0].__setitem__(
        t["partition"][0] == 1, 0)), "layer 0: expert 0 holds 32 neurons, its capacity is 16"),
    "expert id >= E": (lambda c: _edit_assignment(c, lambda t: t["partition"][1].__setitem__(3, 4)),
                       "partition holds expert id 4, valid ids are 0..3"),
    "float partition": (lambda c: _edit_assignment(c, lambda t: t.update(partition=t["partition"].float())),
                        "partition must hold integer expert ids"),
    "NaN router": (lambda c: _edit_assignment(c, lambda t: t["router.1"].__setitem__((0, 0), float("nan"))),
                   "router.1 holds non-finite values"),
    "router shape": (lambda c: _edit_assignment(c, lambda t: t.update({"router.0": t["router.0"][:3].contiguous()})),
                     "router.0 has shape [3, 32]"),
    "extra layer": (lambda c: _edit_assignment(c, lambda t: t.update({"router.2": t["router.0"].clone()})),
                    "unexpected router.2"),
    "empty assignment": (lambda c: (c / "assignment.safetensors").write_bytes(b""), "assignment.safetensors"),
    "assignment is a device": (lambda c: ((c / "assignment.safetensors").unlink(),
                                          (c / "assignment.safetensors").symlink_to("/dev/zero")),
                               "missing or not a regular file"),
    "meta type": (lambda c: _edit_meta(c, lambda m: m.update(experts="4")), "'experts' must be an integer >= 2"),
    "meta bool": (lambda c: _edit_meta(c, lambda m: m.update(top_k=True)), "'top_k' must be an integer >= 1"),
    "meta missing key": (lambda c: _edit_meta(c, lambda m: m.pop("capacities")), "'capacities' must be 4 integers"),
    "meta capacities": (lambda c: _edit_meta(c, lambda m: m.update(capacities=[16, 16, 16, 8])),
                        "capacities sum to 56, not intermediate_size 64"),
    "meta not an object": (lambda c: (c / "dotmoe_meta.json").write_text("[1, 2]"), "is not a JSON object"),
    "meta empty": (lambda c: (c / "dotmoe_meta.json").write_text(""), "dotmoe_meta.json"),
    "meta wrong model": (lambda c: _edit_meta(c, lambda m: m.update(num_layers=3,
                                                                     mlp_modules=m["mlp_modules"] + ["x"])),
                         "missing router.2"),
    "no COMPLETE": (lambda c: (c / "COMPLETE").unlink(), "unfinished conversion"),
    "base config garbage": (lambda c: ((c.parent / "base").mkdir(), (c.parent / "base" / "config.json").write_text("{"),
                                       _edit_meta(c, lambda m: m.update(base_model=str(c.parent / "base")))),
                            "config.json is unreadable"),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_edited_conversion_is_refused_on_read(name, exported, tmp_path, capsys):
    conv = _copy(exported[0], tmp_path / "conv")
    edit, message = EDITS[name]
    edit(conv)
    line = cli_error(["export", "--from", str(conv), "--out", str(tmp_path / "out")], capsys)
    assert message in line, line
    assert str(conv) in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_every_conversion_reader_uses_the_validating_loader(exported, reference, tmp_path, capsys):
    """--init-from, the sparse reference model and eval read a conversion through the same validation as export."""
    from dotmoe.errors import DotMoeError
    from dotmoe.sparse_model import load_sparse_model

    conv = _copy(exported[0], tmp_path / "conv")
    EDITS["NaN router"][0](conv)
    argv, _ = reference
    assert "router.1 holds non-finite" in cli_error(argv + ["--out", str(tmp_path / "o"), "--init-from", str(conv),
                                                            "--tokens", "0"], capsys)
    with pytest.raises(DotMoeError, match="router.1 holds non-finite"):
        load_sparse_model(conv)
    assert "is a dotmoe convert output, not a model" in cli_error(["eval", "--model", str(conv)], capsys)
    shutil.copytree(exported[1], conv / "model")
    _edit_meta(conv, lambda m: m.update(base_model=7))
    assert "'base_model' must be a path" in cli_error(["eval", "--model", str(conv / "model")], capsys)
    assert not (tmp_path / "o").exists() and not (conv / "model" / "eval.json").exists()


def test_init_from_a_conversion_of_another_model_is_refused(reference, tiny_llama_dir, tmp_path, capsys):
    twin = _copy(tiny_llama_dir, tmp_path / "twin")  # the same shapes, another model
    conv = fake_conversion(twin, tmp_path / "conv")
    argv, _ = reference
    line = cli_error(argv + ["--out", str(tmp_path / "o"), "--init-from", str(conv)], capsys)
    assert f"is a conversion of {twin}" in line and not (tmp_path / "o").exists()


# ---- outputs that are files, inputs that cannot be right ---------------------------------------------------------

def test_file_where_a_directory_belongs(exported, tmp_path, capsys):
    conv, moe = exported
    (tmp_path / "a_file").write_text("keep")
    (tmp_path / "d.json").mkdir()
    assert "exists and is not a directory" in cli_error(["export", "--from", str(conv), "--out",
                                                         str(tmp_path / "a_file"), "--overwrite"], capsys)
    line = cli_error(["eval", "--model", str(moe), "--out", str(tmp_path / "a_file" / "r.json")], capsys)
    assert "is a file, not a directory" in line
    assert "is a directory" in cli_error(["eval", "--model", str(moe), "--out", str(tmp_path / "d.json")], capsys)
    assert (tmp_path / "a_file").read_text() == "keep" and not list((tmp_path / "d.json").iterdir())


@pytest.mark.parametrize("mode", ["joint", "layerwise"])
def test_non_finite_input_weights_are_refused_naming_the_tensor(mode, work, tiny_llama_dir, tiny_text, tmp_path,
                                                               capsys):
    bad = _copy(tiny_llama_dir, tmp_path / "bad")
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("inf")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    line = cli_error(tiny_convert_argv(work, bad, tiny_text, tmp_path / "o", mode=mode), capsys)
    assert "non-finite weights" in line and "model.layers.1.mlp.up_proj.weight" in line
    assert not (tmp_path / "o").exists()


def test_too_little_evaluation_data_is_refused(work, reference, exported, tmp_path, capsys):
    argv, _ = reference
    (tmp_path / "few.txt").write_text("just a few words")
    argv = argv[:]
    argv[argv.index("--eval-data") + 1] = str(tmp_path / "few.txt")
    line = cli_error(argv + ["--out", str(tmp_path / "o")], capsys)
    assert "at least 128 are needed" in line and "few.txt" in line
    line = cli_error(["eval", "--model", str(exported[1]), "--data", str(tmp_path / "few.txt")], capsys)
    assert "at least 128 are needed" in line
    assert "tokens must be >= 128" in cli_error(["eval", "--model", str(exported[1]), "--tokens", "4"], capsys)
    assert not (tmp_path / "o").exists() and not (exported[1] / "eval.json").exists()


@pytest.mark.parametrize("line, message", [
    ("lr_router: -0.001", "lr_router must be > 0"), ("lr_affinity: -1", "lr_affinity must be >= 0"),
    ("lr_weights: .nan", "lr_weights must be a finite number"), ("tau_start: -1", "must be > 0"),
    ("init_scale: 0", "init_scale must be > 0"), ("kl_weight: -1", "loss weights must be >= 0"),
    ("warmup_steps: -5", "warmup_steps must be >= 0"), ("seed: -1", "seed must be >= 0"),
    ("eval_every: -1", "eval_every must be >= 0"), ("eval_tokens: 4", "eval_tokens must be >= 128"),
    ("tau_end: .inf", "tau_end must be a finite number"), ("out: ''", "out must be a directory path"),
])
def test_config_numbers_are_range_checked(line, message, tiny_llama_dir, tiny_text, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (the default --out is relative)
    (tmp_path / "c.yaml").write_text(line + "\n")
    small = ["--model", str(tiny_llama_dir), "--data", str(tiny_text), "--experts", "4", "--seq-len", "32",
             "--tokens", "0", "--export-format", "none"]  # were a check missing, this would finish at once with 0
    assert message in cli_error(["convert", "--config", "c.yaml", *small], capsys)
    assert os.listdir(tmp_path) == ["c.yaml"]


@pytest.mark.parametrize("mode", ["joint", "layerwise"])
def test_sequence_longer_than_the_model_is_refused(mode, work, tiny_llama_dir, tiny_text, tmp_path, capsys):
    line = cli_error(tiny_convert_argv(work, tiny_llama_dir, tiny_text, tmp_path / "o", seq_len=256, mode=mode),
                     capsys)
    assert "--seq-len is 256 tokens, above the model's max_position_embeddings 128" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("rows", [[1, 2], [None], [["a", "list"]]], ids=["numbers", "nulls", "lists"])
def test_jsonl_text_column_of_other_types_is_one_line_naming_the_file(rows, work, tiny_llama_dir, tiny_text,
                                                                     tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps({"text": r}) + "\n" for r in [*rows]))
    line = cli_error(tiny_convert_argv(work, tiny_llama_dir, data, tmp_path / "o"), capsys)
    assert str(data) in line and "must hold strings" in line
    assert not (tmp_path / "o").exists()


def test_bench_speed_refuses_a_moe_converted_from_another_model(exported, tmp_path, capsys):
    other = save_tiny_llama(tmp_path / "other", layers=3)
    line = cli_error(["bench", "speed", "--dense", str(other), "--moe", str(exported[1]), "--batch", "1",
                      "--prompt", "8", "--new-tokens", "2"], capsys)
    assert "was not converted from --dense" in line and "num_hidden_layers 3 vs 2" in line
    line = cli_error(["bench", "speed", "--dense", str(exported[0]), "--moe", str(exported[1])], capsys)
    assert "no config.json" in line
    line = cli_error(["bench", "speed", "--dense", str(other), "--moe", str(exported[1]), "--prompt", "100",
                      "--new-tokens", "100"], capsys)
    assert "--prompt + --new-tokens is 200 tokens, above the model's max_position_embeddings 128" in line


@pytest.mark.parametrize("batch", ["0", "-1", "1.5", "a", "", "1,,8"])
def test_bench_speed_batch_must_be_positive_integers(batch, exported, tiny_llama_dir, capsys):
    line = cli_error(["bench", "speed", "--dense", str(tiny_llama_dir), "--moe", str(exported[1]), "--batch", batch],
                     capsys)
    assert "--batch takes comma-separated integers >= 1" in line


def test_resume_of_a_checkpoint_from_before_a_new_setting(tmp_path):
    """A checkpoint written before a setting existed resumes when the run leaves that setting at its default (the
    old run behaved so); set otherwise, the resume is refused naming it."""
    from dotmoe.config import ConvertConfig
    from dotmoe.errors import DotMoeError
    from dotmoe.resume_guards import check_resume_settings, settings_key

    mine = settings_key(ConvertConfig(out=str(tmp_path)).to_dict())
    older = {k: v for k, v in mine.items() if k != "hidden_weight"}
    check_resume_settings(tmp_path / "checkpoint.pt", older, mine)  # no error
    with pytest.raises(DotMoeError, match=r"other settings \(hidden_weight None -> 0.5\)"):
        check_resume_settings(tmp_path / "checkpoint.pt", older, {**mine, "hidden_weight": 0.5})
    with pytest.raises(DotMoeError, match=r"other settings \(seed 0 -> 1\)"):
        check_resume_settings(tmp_path / "checkpoint.pt", older, {**mine, "seed": 1})
