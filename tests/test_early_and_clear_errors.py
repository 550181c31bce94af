"""Everything the flags and files can tell is checked before any work, and each error says what is wrong (issue 28,
classes 3 and 4): exit code 2, one stderr line, nothing written."""

import os
import shutil

import pytest
import torch
from conftest import cli_error, tiny_convert_argv
from safetensors.torch import load_file, save_file

from dotmoe.artifacts import load_conversion
from dotmoe.cli import main


def test_valid_flags_never_produce_an_output_the_reader_rejects(tiny_llama_dir, tiny_text, tmp_path):
    out = tmp_path / "o"  # 64 neurons, 7 experts, no shared expert: the remainder is routed, not dropped
    assert main(tiny_convert_argv(tmp_path, tiny_llama_dir, tiny_text, out, experts=7, top_k=3, tokens=0,
                                  shared_fraction=0)) == 0
    conv = load_conversion(out)
    assert conv.meta["drop"] == 0 and conv.meta["shared"] == 0 and sum(conv.meta["capacities"]) == 64


@pytest.mark.parametrize("structure, fmt, shown", [
    ({"shared": 8}, "qwen3_moe", "with a shared expert exports to 'qwen2_moe', not 'qwen3_moe'"),
    ({"shared": 0}, "qwen2_moe", "exports to 'mixtral', not 'qwen2_moe'"),  # the format needs one: none asked for
    ({"shared_fraction": 0}, "qwen2_moe", "exports to 'mixtral', not 'qwen2_moe'"),
])
def test_a_structure_the_export_format_cannot_hold_fails_before_any_work(structure, fmt, shown, tiny_llama_dir,
                                                                         tiny_text, tmp_path, capsys):
    argv = tiny_convert_argv(tmp_path, tiny_llama_dir, tiny_text, tmp_path / "o", tokens=0, export_format=fmt,
                             **structure)
    assert shown in cli_error(argv, capsys) and not (tmp_path / "o").exists()


def test_a_full_disk_reached_through_a_library_is_one_line(joint_reference, tmp_path, monkeypatch, capsys):
    argv, _ = joint_reference

    def full_disk(obj, f, *a, **k):  # what torch's zip writer raises when the device is full
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4054: No space "
                           "left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    line = cli_error(argv + ["--out", str(tmp_path / "o")], capsys)
    assert "cannot write the checkpoint" in line and "no space left on the device" in line
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_out_below_a_symlink_loop_is_one_line(joint_reference, tmp_path, capsys):
    argv, _ = joint_reference
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert "cannot be resolved" in cli_error(argv + ["--out", str(tmp_path / "a" / "out")], capsys)


def test_a_wrong_shaped_trained_tensor_is_named(tiny_llama_dir, tiny_text, tmp_path, capsys):
    conv = tmp_path / "conv"
    assert main(tiny_convert_argv(tmp_path, tiny_llama_dir, tiny_text, conv, tokens=0)) == 0
    trained = conv / "trained_weights.safetensors"
    tensors = load_file(str(trained))
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, str(trained), metadata={"format": "pt"})
    meta = (conv / "dotmoe_meta.json").read_text()
    import json

    record = json.loads(meta)
    record.pop("trained_weights_sha256")  # past the digest check: the shape check itself
    (conv / "dotmoe_meta.json").write_text(json.dumps(record))
    line = cli_error(["export", "--from", str(conv), "--out", str(tmp_path / "moe")], capsys)
    assert f"tensor {name!r} has shape [3, 3], the dense model's" in line and not (tmp_path / "moe").exists()


@pytest.mark.parametrize("content, shown", [
    (b"good text " * 50 + b"caf\xe9 " + b"more " * 50, "is not UTF-8 text: byte 0xe9 at offset 503"),
    (b"text " * 20 + b"\x00" * 64, "holds a NUL byte at offset 100"),
])
def test_data_that_is_not_utf8_text_says_where(content, shown, tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    line = cli_error(tiny_convert_argv(tmp_path, tiny_llama_dir, data, tmp_path / "o", tokens=0), capsys)
    assert f"data file {data} {shown}" in line and not (tmp_path / "o").exists()


def test_things_that_exist_are_never_reported_as_not_found(tiny_llama_dir, tiny_text, tmp_path, capsys):
    argv = tiny_convert_argv(tmp_path, tiny_llama_dir, tiny_text, tmp_path / "o", tokens=0)
    at = argv.index("--config")
    (tmp_path / "cfgdir").mkdir()
    assert "--config" in (line := cli_error(argv[:at + 1] + [str(tmp_path / "cfgdir")] + argv[at + 2:], capsys)) \
        and "is a directory" in line
    gguf_named_bin = tmp_path / "model.bin"
    gguf_named_bin.write_bytes(b"GGUF" + b"\0" * 60)
    at = argv.index("--model")
    line = cli_error(argv[:at + 1] + [str(gguf_named_bin)] + argv[at + 2:], capsys)
    assert "is a file, not a model directory; it is a GGUF file: name it *.gguf" in line
    fifo_model = shutil.copytree(tiny_llama_dir, tmp_path / "fifo_model")
    (fifo_model / "config.json").unlink()
    os.mkfifo(fifo_model / "config.json")
    line = cli_error(argv[:at + 1] + [str(fifo_model)] + argv[at + 2:], capsys)
    assert "config.json is not a regular file" in line and not (tmp_path / "o").exists()


def test_task_dir_problems_are_named_before_the_evaluation(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from dotmoe.paths import reference_model_dir

    base = ["eval", "--model", str(reference_model_dir()), "--out", str(tmp_path / "r.json"), "--tasks"]
    assert "--task-dir" in (line := cli_error(base + ["mine", "--task-dir", str(tmp_path / "nowhere")], capsys)) \
        and "does not exist" in line
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "bad.yaml").write_text("task: mine\n  dataset_path: [unclosed\n")
    assert "task YAML" in (line := cli_error(base + ["mine", "--task-dir", str(tasks)], capsys)) and \
        "is malformed" in line
    (tasks / "bad.yaml").write_text("task: pydoc_cloze\ndataset_path: json\n")
    line = cli_error(base + ["pydoc_cloze", "--task-dir", str(tasks)], capsys)
    assert "is both a bundled task and defined in --task-dir" in line
    line = cli_error(base + ["other", "--task-dir", str(tasks)], capsys)
    assert f"--task-dir {tasks} defines ['pydoc_cloze']" in line and not (tmp_path / "r.json").exists()


def test_bench_speed_says_which_model_is_not_what_it_needs(tmp_path, capsys):
    """--moe a dense model, --dense an MoE, a custom-class export without --trust-remote-code: one line each,
    before any model loads."""
    from test_export import fake_conversion, save_tiny

    from dotmoe.export import export

    dense = save_tiny("llama", tmp_path / "dense")
    conv = fake_conversion(dense, tmp_path / "conv", experts=4, top_k=1)
    export(conv, tmp_path / "moe", check_tokens=0, progress=False)
    custom = fake_conversion(dense, tmp_path / "conv2", experts=4, top_k=2, gating="mask")
    assert export(custom, tmp_path / "custom", check_tokens=0, progress=False).plan.custom

    def bench(d, m):
        return cli_error(["bench", "speed", "--dense", str(d), "--moe", str(m), "--batch", "1", "--prompt", "8",
                          "--new-tokens", "2", "--runs", "1"], capsys)

    assert f"--moe {dense} has no experts in its config.json (a dense or pruned model)" in bench(dense, dense)
    assert f"--dense {tmp_path / 'moe'} is an MoE (4 experts)" in bench(tmp_path / "moe", tmp_path / "moe")
    assert "custom-class export" in bench(dense, tmp_path / "custom") and "--trust-remote-code" in bench(
        dense, tmp_path / "custom")


def test_a_task_whose_label_exceeds_its_choices_is_one_line(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    import json

    from dotmoe.paths import reference_model_dir

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text("task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                     f"    test: {tasks / 'mine.jsonl'}\noutput_type: multiple_choice\n"
                                     "test_split: test\ndoc_to_text: '{{context}}'\ndoc_to_target: label\n"
                                     "doc_to_choice: choices\nmetric_list:\n  - metric: acc\n")
    docs = [{"context": "The cat sat on the", "choices": [" mat", " moon"], "label": 5}] * 2
    (tasks / "mine.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    line = cli_error(["eval", "--model", str(reference_model_dir()), "--out", str(tmp_path / "r.json"), "--tasks",
                      "mine", "--task-dir", str(tasks)], capsys)
    assert "lm-eval could not score task(s) mine" in line and "doc_to_target" in line
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("argv, shown", [
    (["convert", "--tokens", "1e5"], "argument --tokens: invalid int value: '1e5'"),
    (["convert", "--model", ""], "argument --model: an empty path"),
    (["export", "--from", "", "--out", "x"], "argument --from: an empty path"),
    (["convert", "--data", "a.txt", ""], "argument --data: an empty path"),
])
def test_a_bad_flag_is_one_line_not_the_usage_block(argv, shown, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and shown in err and "usage:" not in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("content, shown", [
    ('{"text": "unterminated\n', "could not read data file {f}: "),
    ('{"body": "no text column"}\n', "data file {f} has no 'text' column (columns: body)"),
])
def test_a_damaged_jsonl_file_is_one_line_naming_it(content, shown, tiny_llama_dir, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    assert shown.format(f=data) in cli_error(tiny_convert_argv(tmp_path, tiny_llama_dir, data, tmp_path / "o",
                                                               tokens=0), capsys)


def test_the_record_holds_the_calibration_tokens_used(tiny_llama_dir, tiny_text, tmp_path):
    out = tmp_path / "o"  # 100 requested, whole 32-token sequences: 3 of them
    assert main(tiny_convert_argv(tmp_path, tiny_llama_dir, tiny_text, out, tokens=0, calib_tokens=100)) == 0
    assert load_conversion(out).meta["calibration_tokens"] == 96
