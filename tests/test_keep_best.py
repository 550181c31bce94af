"""A trained run ends with its best validation state: the start of training is evaluated, and a run that
training made worse on validation returns to its best point (the start included), exactly, also on --resume."""

import json

import pytest
import torch

from dotmoe.convert import convert
from test_convert import _cfg


def _run(tiny_llama_dir, tiny_text, out, **kw):
    # trainable full at a learning rate that wrecks the tiny model: validation PPL rises from the start. fp32
    # pinned: these tests compare two runs, and `mixed_precision: auto` is a timing probe that cores busy with other
    # work can flip between them (seen in a fresh-clone CI run beside two background jobs)
    base = dict(trainable="full", lr_weights=0.05, warmup_steps=0, tokens=8 * 4 * 32, eval_every=2,
                checkpoint_every=3, mixed_precision="no")
    base.update(kw)
    return convert(_cfg(tiny_llama_dir, tiny_text, out, **base), progress=False)


def test_start_is_evaluated_and_a_worse_run_returns_to_its_best(tiny_llama_dir, tiny_text, tmp_path):
    kept = _run(tiny_llama_dir, tiny_text, tmp_path / "kept").summary
    last = _run(tiny_llama_dir, tiny_text, tmp_path / "last", keep_best=False).summary
    assert kept["eval_steps"] == [0, 2, 4, 6, 8] == last["eval_steps"]
    assert kept["eval_curve"] == last["eval_curve"]  # keeping the best does not change the run itself
    curve = kept["eval_curve"]
    assert curve[-1] > 1.05 * min(curve), curve  # the scenario: training made validation worse
    best = curve.index(min(curve))
    assert kept["best_step"] == kept["eval_steps"][best]
    # trained weights: no refit after training, so the final evaluation is the best point's own perplexity
    assert kept["val_ppl"] == pytest.approx(min(curve), rel=1e-6)
    assert last["val_ppl"] == pytest.approx(curve[-1], rel=1e-6) and last["best_step"] is None
    assert not (tmp_path / "kept" / "best_state.pt").exists()  # removed with the checkpoint once complete
    log = [json.loads(x) for x in (tmp_path / "kept" / "train_log.jsonl").read_text().splitlines()]
    assert log[0] == {"step": 0, "tokens": 0, "tau": log[0]["tau"], "val_ppl": curve[0]}


def test_best_state_survives_a_resume(tiny_llama_dir, tiny_text, tmp_path, interrupt_training):
    full = _run(tiny_llama_dir, tiny_text, tmp_path / "full").summary
    interrupt_training(5)  # after the checkpoint at step 3, mid-way through step 5
    with pytest.raises(KeyboardInterrupt):
        _run(tiny_llama_dir, tiny_text, tmp_path / "cut")
    interrupt_training(None)
    assert (tmp_path / "cut" / "best_state.pt").is_file()
    resumed = _run(tiny_llama_dir, tiny_text, tmp_path / "cut", resume=True).summary
    assert resumed["eval_curve"] == full["eval_curve"] and resumed["best_step"] == full["best_step"]
    assert resumed["val_ppl"] == full["val_ppl"]


def test_router_assignment_run_that_does_not_improve_ends_at_its_training_free_start(tmp_path, refit_calls):
    """Frozen FFN weights (bundled reference model): a router learning rate far too high makes validation worse
    at every evaluation, so the run returns to its start, which is exactly the training-free conversion."""
    from dotmoe.config import ConvertConfig
    from dotmoe.paths import reference_data_file

    common = dict(experts=8, top_k=2, calib_tokens=512, eval_tokens=512, seq_len=64, batch_size=4, seed=0,
                  eval_data=[str(reference_data_file("validation"))], export_format="none",
                  trainable="router+assignment")
    free = convert(ConvertConfig(**common, tokens=0, out=str(tmp_path / "free")), progress=False).summary
    hurt = convert(ConvertConfig(**common, tokens=2 * 4 * 64, eval_every=1, warmup_steps=0, lr_router=1.0,
                                 lr_affinity=5.0, out=str(tmp_path / "hurt")), progress=False).summary
    assert min(hurt["eval_curve"][1:]) > 1.5 * hurt["eval_curve"][0], hurt["eval_curve"]
    assert hurt["best_step"] == 0
    assert hurt["eval_curve"][0] == pytest.approx(free["val_ppl"], rel=1e-5)  # the start is the training-free model
    assert hurt["val_ppl"] == pytest.approx(free["val_ppl"], rel=1e-5)
    assert len(refit_calls) == 2  # training-free: one; trained: the refit before training, none after by default
    # the same from --init-from the training-free conversion: its refitted down projections are the start (no refit
    # of its own before training), so the start is again exactly the training-free model
    refit_calls.clear()
    again = convert(ConvertConfig(**common, tokens=2 * 4 * 64, eval_every=1, warmup_steps=0, lr_router=1.0,
                                  lr_affinity=5.0, init_from=str(tmp_path / "free"), out=str(tmp_path / "again")),
                    progress=False).summary
    assert again["eval_curve"][0] == pytest.approx(free["val_ppl"], rel=1e-5)
    assert not refit_calls  # no refit before training (the start's), none after (the router trained for these FFNs)
    assert again["val_ppl"] == pytest.approx(free["val_ppl"], rel=1e-5)



def test_training_defaults_follow_what_trains():
    """--tokens N trains every weight with its own learning rates and evaluates five times; training-free and the
    layer-wise mode keep router+assignment (and its rates); explicit values win."""
    from dotmoe.config import ConvertConfig

    trained = ConvertConfig(tokens=16 * 8 * 256)
    assert (trained.trainable, trained.lr_router, trained.lr_affinity, trained.eval_every) == ("full", 1e-4, 1e-3, 4)
    default = ConvertConfig()  # no --tokens: DEFAULT_TRAIN_TOKENS (262,144: 128 steps of 8 x 256)
    assert (default.trainable, default.lr_router, default.lr_affinity, default.eval_every) == ("full", 1e-4, 1e-3, 32)
    free = ConvertConfig(tokens=0)
    assert (free.trainable, free.lr_router, free.lr_affinity, free.eval_every) == ("router+assignment", 3e-3, 0.05, 0)
    layerwise = ConvertConfig(mode="layerwise", tokens=4096)
    assert layerwise.trainable == "router+assignment" and layerwise.eval_every == 0
    mine = ConvertConfig(tokens=4096, trainable="router+assignment", lr_router=1e-3, eval_every=0)
    assert (mine.lr_router, mine.lr_affinity, mine.eval_every) == (1e-3, 0.05, 0)


def test_full_training_that_does_not_fit_in_memory_fails_before_it_starts(tiny_llama_dir):
    from dotmoe.architecture import load_causal_lm
    from dotmoe.config import ConvertConfig
    from dotmoe.errors import DotMoeError
    from dotmoe.training_memory import check_training_memory

    model, _ = load_causal_lm(tiny_llama_dir)
    params = sum(p.numel() for p in model.parameters())
    cfg = ConvertConfig(tokens=4096)
    check_training_memory(cfg, model, available=20 * params)  # 4 + 4 + 12 bytes per parameter: fits exactly
    with pytest.raises(DotMoeError, match="pass --trainable router\\+assignment"):
        check_training_memory(cfg, model, available=20 * params - 1)
    check_training_memory(ConvertConfig(tokens=4096, trainable="router+assignment"), model, available=0)
    check_training_memory(ConvertConfig(tokens=0), model, available=0)  # training-free
