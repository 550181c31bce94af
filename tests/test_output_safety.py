"""Outputs never destroy what dotmoe did not write (issue 28, class 1): `--overwrite` replaces only dotmoe's own
results, every output is checked against every input, one run at a time per output directory, and a replaced
result goes only once the new one is complete. Each refusal: exit code 2, one stderr line, nothing touched."""

import shutil
import subprocess
import sys
import time

from conftest import cli_error, tree
from test_export import fake_conversion

from dotmoe.cli import main


def _copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def test_overwrite_replaces_only_what_dotmoe_wrote(joint_reference, tiny_llama_dir, tmp_path, capsys):
    argv, finished = joint_reference
    stranger = tmp_path / "stranger"  # a user's directory: refused even with --overwrite
    (stranger / "sub").mkdir(parents=True)
    (stranger / "notes.txt").write_text("mine")
    (stranger / "sub" / "data.bin").write_bytes(b"\x00\x01")
    mixed = _copy(finished, tmp_path / "mixed")  # a finished conversion with a user's file beside it
    (mixed / "results.csv").write_text("a,b\n")
    inner = _copy(finished, tmp_path / "inner")  # ... or inside its exported model
    (inner / "model").mkdir(exist_ok=True)
    (inner / "model" / "my_weights.safetensors").write_bytes(b"x")
    for out, shown in ((stranger, "(notes.txt, sub/data.bin)"), (mixed, "(results.csv)"), (inner, "model/my_weights")):
        before = tree(out)
        line = cli_error(argv + ["--out", str(out), "--overwrite"], capsys)
        assert "holds files that dotmoe did not write" in line and shown in line and "even with --overwrite" in line
        assert tree(out) == before

    conv = fake_conversion(tiny_llama_dir, tmp_path / "conv")
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    (export_dir / "config.json").write_text("{}")  # not a dotmoe export
    before = tree(export_dir)
    line = cli_error(["export", "--from", str(conv), "--out", str(export_dir), "--overwrite"], capsys)
    assert "did not write or that changed since (config.json)" in line and tree(export_dir) == before
    shutil.rmtree(export_dir)
    assert main(["export", "--from", str(conv), "--out", str(export_dir), "--check-tokens", "0"]) == 0
    assert "holds an earlier export (pass --overwrite" in cli_error(
        ["export", "--from", str(conv), "--out", str(export_dir)], capsys)
    assert main(["export", "--from", str(conv), "--out", str(export_dir), "--check-tokens", "0", "--overwrite"]) == 0

    # dotmoe's records decide, not the file names: a user's file named like one dotmoe writes, or a file of the
    # result that somebody changed since, is never replaced
    (export_dir / "README.md").write_text("my notes on this model")
    user_named = tree(export_dir)
    line = cli_error(["export", "--from", str(conv), "--out", str(export_dir), "--overwrite"], capsys)
    assert "did not write or that changed since (README.md)" in line and tree(export_dir) == user_named
    edited = _copy(finished, tmp_path / "edited")
    with (edited / "train_log.jsonl").open("a") as fh:
        fh.write('{"my": "note"}\n')
    before = tree(edited)
    assert "(train_log.jsonl)" in cli_error(argv + ["--out", str(edited), "--overwrite"], capsys)
    assert tree(edited) == before


def test_single_file_outputs_replace_only_what_dotmoe_wrote(tiny_llama_dir, tmp_path, capsys):
    """sample-data and eval reports: --overwrite (or an eval's replacing) takes only an earlier file of
    dotmoe's, never a file of the same name somebody else wrote."""
    model = tiny_llama_dir
    mine = tmp_path / "mine.txt"
    mine.write_text("my own corpus")
    line = cli_error(["sample-data", "--model", str(model), "--out", str(mine), "--tokens", "16", "--overwrite"],
                     capsys)
    assert "dotmoe did not write it" in line and mine.read_text() == "my own corpus"
    report = tmp_path / "r.json"
    (tmp_path / "r_recon.png").write_bytes(b"\x89PNG\r\n\x1a\nmine")  # a user's plot, named as eval names its own
    line = cli_error(["eval", "--model", str(model), "--tokens", "128", "--out", str(report)], capsys)
    assert "r_recon.png" in line and "dotmoe did not write it" in line and not report.exists()
    (tmp_path / "r_recon.png").unlink()
    assert main(["eval", "--model", str(model), "--tokens", "256", "--recon-tokens", "256",
                 "--out", str(report)]) == 0
    assert main(["eval", "--model", str(model), "--tokens", "256", "--recon-tokens", "256",
                 "--out", str(report)]) == 0  # its own earlier report is replaced
    before = report.read_bytes()  # ... but no other kind of output, though dotmoe wrote it
    line = cli_error(["sample-data", "--model", str(model), "--out", str(report), "--tokens", "16", "--overwrite"],
                     capsys)
    assert "is not an earlier dotmoe sampled text" in line and report.read_bytes() == before


def test_demo_refuses_results_it_did_not_write_before_any_work(tmp_path, capsys):
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "thesis.tex").write_text("years of work")
    before = tree(tmp_path)
    started = time.time()
    line = cli_error(["demo", "--out", str(tmp_path), "--overwrite"], capsys)
    assert "holds files that dotmoe did not write or that changed since (thesis.tex)" in line
    assert tree(tmp_path) == before and not (tmp_path / "dotmoe").exists() and time.time() - started < 60


def test_demo_passes_its_token_options_on(tmp_path, capsys, monkeypatch):
    import dotmoe.convert
    from dotmoe.errors import DotMoeError

    seen = []

    def stop(cfg, **kwargs):
        seen.append(cfg)
        raise DotMoeError("stopped by the test")

    monkeypatch.setattr(dotmoe.convert, "convert", stop)
    assert "stopped by the test" in cli_error(["demo", "--out", str(tmp_path / "d"), "--tokens", "4096",
                                               "--eval-tokens", "2048", "--calib-tokens", "1024"], capsys)
    assert (seen[0].tokens, seen[0].eval_tokens, seen[0].calib_tokens, seen[0].method) == (4096, 2048, 1024, "dotmoe")
    seen.clear()
    cli_error(["demo", "--out", str(tmp_path / "e")], capsys)  # unset: the conversion's own defaults
    assert (seen[0].eval_tokens, seen[0].calib_tokens) == (32768, None)


def test_every_output_is_checked_against_every_input(joint_reference, tiny_llama_dir, tmp_path, capsys):
    model = _copy(tiny_llama_dir, tmp_path / "model")
    before = tree(model)
    line = cli_error(["sample-data", "--model", str(model), "--out", str(model / "tokenizer.json"), "--overwrite"],
                     capsys)
    assert "lies inside the model" in line and tree(model) == before

    argv, finished = joint_reference
    out = _copy(finished, tmp_path / "out")
    config = out / "convert.yaml"  # the run's own --config inside the --out it replaces
    config.write_text(next(iter((finished.parent).glob("convert-*.yaml"))).read_text())
    before = tree(out)
    at = argv.index("--config")
    line = cli_error(argv[:at + 1] + [str(config)] + argv[at + 2:] + ["--out", str(out), "--overwrite"], capsys)
    assert "contains the --config file" in line and tree(out) == before


def test_a_second_run_on_the_same_out_is_refused_naming_the_holder(joint_reference, tmp_path, capsys):
    argv, _ = joint_reference
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom dotmoe.run_dir import output_lock\n"
                               f"with output_lock({str(out)!r}):\n    print('held', flush=True)\n    sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = cli_error(argv + ["--out", str(out)], capsys)
        assert f"is being written by process {holder.pid}" in line
        assert [p.name for p in out.iterdir()] == [".dotmoe.lock"]  # nothing of this run
    finally:
        holder.communicate("")
    assert not out.exists()  # the holder wrote nothing: no trace left
    assert main(argv + ["--out", str(out)]) == 0 and (out / "COMPLETE").is_file()


def test_a_second_export_eval_or_sample_to_the_same_out_is_refused_naming_the_holder(tiny_llama_dir, tmp_path,
                                                                                       capsys):
    conv = fake_conversion(tiny_llama_dir, tmp_path / "conv")
    outs = {"export": tmp_path / "moe", "eval": tmp_path / "r.json", "sample": tmp_path / "s.txt"}
    argvs = {"export": ["export", "--from", str(conv), "--out", str(outs["export"]), "--check-tokens", "0"],
             "eval": ["eval", "--model", str(tiny_llama_dir), "--tokens", "256", "--out", str(outs["eval"])],
             "sample": ["sample-data", "--model", str(tiny_llama_dir), "--out", str(outs["sample"]), "--tokens", "8"]}
    for name, out in outs.items():
        holder = subprocess.Popen([sys.executable, "-c", "import sys\nfrom dotmoe.run_dir import destination_lock\n"
                                   f"with destination_lock({str(out)!r}):\n    print('held', flush=True)\n"
                                   "    sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            assert f"is being written by process {holder.pid}" in cli_error(argvs[name], capsys), name
            assert not out.exists()
        finally:
            holder.communicate("")
        assert not any(p.name.endswith(".dotmoe.lock") for p in tmp_path.iterdir())  # no trace left
    assert main(argvs["export"]) == 0 and (outs["export"] / "config.json").is_file()


def test_overwrite_keeps_the_previous_result_until_the_new_one_is_complete(joint_reference, tmp_path, capsys,
                                                                           interrupt_training):
    argv, finished = joint_reference
    out = _copy(finished, tmp_path / "out")
    before = tree(out)
    interrupt_training(1)  # stopped in its first step, long after calibration, before any checkpoint
    assert main(argv + ["--out", str(out), "--overwrite", "--seed", "3"]) == 130
    assert "holds its previous result again" in capsys.readouterr().err
    assert tree(out) == before and sorted(p.name for p in out.iterdir()) == sorted(p.name for p in finished.iterdir())

    interrupt_training(7)  # past the checkpoint at step 5: that run can be resumed, the previous result waits
    assert main(argv + ["--out", str(out), "--overwrite", "--seed", "3"]) == 130
    assert (out / "checkpoint.pt").is_file() and (out / ".dotmoe-previous" / "COMPLETE").is_file()
    interrupt_training(None)
    assert main(argv + ["--out", str(out), "--resume", "--seed", "3"]) == 0
    assert (out / "COMPLETE").is_file() and not (out / ".dotmoe-previous").exists()
