"""The least-squares refit of the down projections (dotmoe.refit): the solver against numpy's lstsq, exactness when
nothing is sparse, sequential inputs, and what it does to a conversion (lower error, exported with parity)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from dotmoe.config import ConvertConfig
from dotmoe.refit import (RIDGE_GRID, LayerProblem, choose_ridge, fit_layer, least_squares_down, moe_problem,
                          refit_sequentially)


def test_least_squares_down_matches_numpy_lstsq():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(300, 24, generator=gen)
    y = z @ torch.randn(24, 10, generator=gen) + 0.1 * torch.randn(300, 10, generator=gen)
    reference = np.linalg.lstsq(z.double().numpy(), y.double().numpy(), rcond=None)[0].T
    np.testing.assert_allclose(least_squares_down(z, y, ridge=1e-12).numpy(), reference, rtol=1e-4, atol=1e-6)
    # the ridge chosen on held-out tokens, then refitted on all of them: what choose_ridge + least_squares_down give
    w, ridge = fit_layer(z, y)
    assert ridge == choose_ridge(z, y)
    torch.testing.assert_close(w, least_squares_down(z, y, ridge), rtol=1e-3, atol=1e-6)
    # the ridge shrinks the solution
    assert least_squares_down(z, y, ridge=10.0).norm() < 0.8 * torch.from_numpy(reference).norm()


def test_never_active_neurons_get_zero_weight():
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(200, 8, generator=gen)
    z[:, 3] = 0  # e.g. a dropped neuron: its gate is 0 on every token
    y = torch.randn(200, 5, generator=gen)
    w = least_squares_down(z, y, 1e-4)
    assert torch.all(w[:, 3] == 0)
    assert w[:, :3].abs().sum() > 0


def test_choose_ridge_follows_the_noise():
    """Many tokens of a clean linear map: the smallest ridge; few noisy tokens for many features: a large one."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(64, 8, generator=gen)
    z = torch.randn(4000, 64, generator=gen)
    assert choose_ridge(z, z @ w + 1e-3 * torch.randn(4000, 8, generator=gen)) == 1e-5
    z = torch.randn(80, 64, generator=gen)
    assert choose_ridge(z, z @ w + 5.0 * torch.randn(80, 8, generator=gen)) >= 1e-2


def _tiny_moe_model(tiny_llama_dir, partition_of, top_k=1):
    from dotmoe.architecture import load_causal_lm
    from dotmoe.moe_mlp import install_moe
    from dotmoe.rounding import one_hot_assignment

    model, _ = load_causal_lm(tiny_llama_dir)
    model.requires_grad_(False)
    n = model.config.intermediate_size
    moes = install_moe(model, 4, top_k, "mask", shared=True)
    for layer, moe in enumerate(moes):
        moe.assignment = one_hot_assignment(partition_of(layer, n), 5)
    return model, moes


def _ffn_inputs(model, ffns, ids) -> list[torch.Tensor]:
    """Each FFN's inputs [T, d] in one whole-model forward of `ids` (forward pre-hooks)."""
    store = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: store.append(a[0].reshape(-1, a[0].shape[-1]).clone()))
             for m in ffns]
    with torch.no_grad():
        model.get_decoder()(input_ids=ids)
    for h in hooks:
        h.remove()
    return store


def test_refit_is_exact_when_every_neuron_is_active(tiny_llama_dir):
    """All neurons in the always-on shared column: the MoE is the dense FFN, and the refit must return W_down."""
    model, moes = _tiny_moe_model(tiny_llama_dir, lambda layer, n: torch.full((n,), 4))
    before = [m.dense.down_proj.weight.clone() for m in moes]
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    errors, _ = refit_sequentially(model.get_decoder(), moes, [moe_problem(m) for m in moes], ids, ridge=1e-10)
    for m, w in zip(moes, before):
        torch.testing.assert_close(m.dense.down_proj.weight, w, rtol=1e-3, atol=1e-4)
    assert max(errors) < 1e-4


def test_refit_lowers_the_error_and_sees_the_converted_inputs(tiny_llama_dir):
    """Sparse MoE: each layer's refit error is below its error with the dense W_down on the same inputs, and the
    inputs a layer is refitted on are the converted model's (not the dense model's)."""
    n_shared = 8
    model, moes = _tiny_moe_model(tiny_llama_dir,
                                  lambda layer, n: torch.cat([torch.full((n_shared,), 4), torch.arange(n - n_shared) % 4]))
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    seen, before_errors = {}, {}
    problems = []
    for layer, moe in enumerate(moes):
        problem = moe_problem(moe)

        def spy(x, problem=problem, layer=layer, moe=moe):  # one call per chunk of sequences
            z, y = problem.build(x)
            seen.setdefault(layer, []).append(x.clone())
            before_errors.setdefault(layer, []).append((y - z @ moe.dense.down_proj.weight.t(), y))
            return z, y
        problems.append(LayerProblem(spy, problem.apply))
    # inputs of the MLPs in a forward of the unrefitted model: layer 0's must match, later ones must differ
    store = _ffn_inputs(model, moes, ids)
    errors, ridges = refit_sequentially(model.get_decoder(), moes, problems, ids, chunk=3)
    assert all(r in RIDGE_GRID for r in ridges)
    # errors are on the held-out last 1/8 of the tokens (16 of 128, in the second chunk)
    before = [float(torch.cat([r for r, _ in before_errors[i]])[-16:].norm() /
                    torch.cat([y for _, y in before_errors[i]])[-16:].norm()) for i in range(len(moes))]
    assert all(a < b for a, b in zip(errors, before)), (errors, before)
    assert [len(seen[i]) for i in range(len(moes))] == [2] * len(moes)  # 4 sequences in chunks of 3
    torch.testing.assert_close(torch.cat(seen[0]), store[0])
    assert not torch.allclose(torch.cat(seen[len(moes) - 1]), store[-1], atol=1e-4)


@pytest.mark.parametrize("method", ["dotmoe", "prune"])
def test_conversion_refit_improves_perplexity_and_exports_it(method, tmp_path):
    """Training-free on the bundled reference model: the refit lowers validation perplexity; for the MoE the
    refitted down projections are what the export carries (convert's own parity check compares the reloaded
    export with the sparse model)."""
    from dotmoe.paths import reference_data_file
    from dotmoe.convert import convert

    common = dict(method=method, experts=8, top_k=2, tokens=0, calib_tokens=4096, eval_tokens=4096,
                  eval_data=[str(reference_data_file("validation"))])
    off = convert(ConvertConfig(**common, refit_down=False, out=str(tmp_path / "off"),
                                export_format="none"), progress=False).summary
    on = convert(ConvertConfig(**common, out=str(tmp_path / "on")), progress=False).summary
    assert on["val_ppl"] < 0.95 * off["val_ppl"], (on["val_ppl"], off["val_ppl"])
    # the dense reference is the untouched model (measured before the refit changes the down projections)
    assert on["dense_val_ppl"] == pytest.approx(off["dense_val_ppl"], rel=1e-6)
    assert off["refit_errors"] is None and len(on["refit_errors"]) == on["num_layers"]
    if method == "dotmoe":
        from safetensors.torch import load_file

        saved = load_file(str(tmp_path / "on" / "trained_weights.safetensors"))
        assert saved and all(k.endswith("down_proj.weight") for k in saved)
        assert on["export"]["parity"]["max_abs_logit_diff"] < 1e-3, on["export"]["parity"]


def test_teacher_keeps_the_dense_weights_and_a_second_refit_targets_it(tiny_llama_dir):
    """After a refit the MoE path uses the refitted down projections while the dense teacher (MoE off) still
    computes the original model exactly; refitting again on the same tokens gives the same weights (its target
    is the dense output, not the refitted one)."""
    from dotmoe.architecture import load_causal_lm
    from dotmoe.moe_mlp import moe_disabled
    from dotmoe.train import refit_moe_down

    dense, _ = load_causal_lm(tiny_llama_dir)
    torch.manual_seed(0)  # the routers' init draws from the global generator: not from whatever ran before
    model, moes = _tiny_moe_model(tiny_llama_dir, lambda layer, n: torch.arange(n) % 5)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = dense(input_ids=ids).logits
        sparse_before = model(input_ids=ids).logits
    refit_moe_down(model, moes, ids, progress=False)
    first = [m.dense.down_proj.weight.clone() for m in moes]
    with torch.no_grad(), moe_disabled(model):
        torch.testing.assert_close(model(input_ids=ids).logits, reference, rtol=0, atol=1e-5)
    with torch.no_grad():
        sparse_after = model(input_ids=ids).logits
    assert (sparse_after - reference).norm() < 0.9 * (sparse_before - reference).norm()
    refit_moe_down(model, moes, ids, progress=False)
    for m, w in zip(moes, first):
        torch.testing.assert_close(m.dense.down_proj.weight, w, rtol=1e-4, atol=1e-5)
    assert "teacher_down" not in " ".join(model.state_dict())


@pytest.mark.parametrize("trainable", ["router+assignment", "experts"])
def test_trained_conversion_refits_before_training_with_an_exact_teacher(trainable, tmp_path):
    """With tokens > 0 the router (and, trainable=experts, the FFN weights) trains from the refitted FFNs: the first
    step's KL is lower than without the early refit, and the dense reference perplexity is the same."""
    import json

    from dotmoe.paths import reference_data_file
    from dotmoe.convert import convert

    common = dict(method="dotmoe", experts=8, top_k=2, tokens=256, batch_size=2, seq_len=128, calib_tokens=2048,
                  eval_tokens=2048, eval_data=[str(reference_data_file("validation"))], export_format="none",
                  trainable=trainable)
    late = convert(ConvertConfig(**common, refit_before_training=False, out=str(tmp_path / "late")),
                   progress=False).summary
    early = convert(ConvertConfig(**common, out=str(tmp_path / "early")), progress=False).summary
    assert early["dense_val_ppl"] == pytest.approx(late["dense_val_ppl"], rel=1e-6)
    first_kl = [next(r["kl"] for r in map(json.loads, (tmp_path / run / "train_log.jsonl").read_text().splitlines())
                     if "kl" in r) for run in ("early", "late")]  # the first step's (the start's record has none)
    assert first_kl[0] < 0.9 * first_kl[1], first_kl
    if trainable == "router+assignment":  # the final refit (trained FFN weights have none)
        assert len(early["refit_errors"]) == early["num_layers"]


def _layer_outputs(decoder, ids) -> list[torch.Tensor]:
    """Each decoder layer's output [T, d] in one whole-model forward (forward hooks)."""
    outs = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: outs.append(out.reshape(-1, out.shape[-1]).clone()))
             for layer in decoder.layers]
    with torch.no_grad():
        decoder(input_ids=ids)
    for h in hooks:
        h.remove()
    return outs


def test_stream_refit_fits_the_dense_layer_output(tiny_llama_dir):
    """--refit-stream 1: a layer's down projection is the least-squares map (numpy's lstsq) from its features to
    the dense layer output minus the residual stream before the FFN; layer 1, whose input has drifted, lands closer
    to the dense model than with the plain target; weight 0 is the plain refit."""
    from dotmoe.moe_mlp import moe_disabled
    from dotmoe.refit import stream_target

    part = lambda layer, n: torch.cat([torch.full((8,), 4), torch.arange(n - 8) % 4])  # noqa: E731
    ids = torch.randint(0, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    results = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)  # the same routers in both runs
        model, moes = _tiny_moe_model(tiny_llama_dir, part)
        decoder = model.get_decoder()
        with moe_disabled(model):
            dense_out = _layer_outputs(decoder, ids)
        stream = stream_target(decoder, len(moes), weight, lambda: moe_disabled(model))
        seen = {}
        hooks = [decoder.layers[0].post_attention_layernorm.register_forward_pre_hook(
                     lambda mod, args: seen.setdefault("r", []).append(args[0].reshape(-1, args[0].shape[-1]).clone())),
                 moes[0].register_forward_pre_hook(
                     lambda mod, args: seen.setdefault("z", []).append(
                         moe_problem(moes[0]).build(args[0].reshape(-1, args[0].shape[-1]))[0]))]
        refit_sequentially(decoder, moes, [moe_problem(m) for m in moes], ids, ridge=1e-12, stream=stream, chunk=3)
        for h in hooks:
            h.remove()
        results[weight] = (moes[0].dense.down_proj.weight.clone(), _layer_outputs(decoder, ids),
                           dense_out, seen, moes[1].dense.down_proj.weight.clone())
    w0, out0, dense0, _, _ = results[0.0]
    w1, out1, dense1, seen, _ = results[1.0]
    torch.testing.assert_close(dense1, dense0)
    # the first two calls (the dense stream's, whose layer-0 inputs are the converted ones: nothing drifted yet)
    r, z = torch.cat(seen["r"][:2]), torch.cat(seen["z"][:2])
    target = (dense0[0] - r).double().numpy()
    reference = np.linalg.lstsq(z.double().numpy(), target, rcond=None)[0].T
    np.testing.assert_allclose(w1.double().numpy(), reference, rtol=1e-3, atol=1e-4)
    # layer 0 sees no drift yet (both targets agree there); layer 1 is pulled back onto the dense stream
    torch.testing.assert_close(w1, w0, rtol=1e-3, atol=1e-4)
    assert (out1[1] - dense0[1]).norm() < 0.9 * (out0[1] - dense0[1]).norm()
    torch.manual_seed(0)
    model, moes = _tiny_moe_model(tiny_llama_dir, part)
    refit_sequentially(model.get_decoder(), moes, [moe_problem(m) for m in moes], ids, ridge=1e-12)
    torch.testing.assert_close(moes[0].dense.down_proj.weight, w0)
    torch.testing.assert_close(moes[1].dense.down_proj.weight, results[0.0][4])


def test_stream_refit_refuses_layers_it_cannot_invert(tiny_gemma3_dir):
    from dotmoe.architecture import load_causal_lm
    from dotmoe.errors import DotMoeError
    from dotmoe.refit import stream_target

    model, _ = load_causal_lm(tiny_gemma3_dir)
    with pytest.raises(DotMoeError, match="Llama-shaped"):
        stream_target(model.get_decoder(), model.config.num_hidden_layers, 1.0, contextlib.nullcontext)
    with pytest.raises(DotMoeError, match="refit_stream"):
        ConvertConfig(refit_stream=1.5)


def test_prepare_sees_each_layer_inputs_from_the_converted_layers_below(tiny_llama_dir):
    """`prepare(i, x)` gets layer i's FFN inputs as the final converted model computes them (layers below refitted
    and set up by their own `prepare`), and what it sets up (here: the routers) is what the layer is refitted with."""
    torch.manual_seed(0)
    model, moes = _tiny_moe_model(tiny_llama_dir, lambda layer, n: torch.arange(n) % 5)
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(4))
    for m in moes:  # the refit's target stays the original FFN (as refit_moe_down does), so a second refit can agree
        m.keep_teacher_down()
    seen = {}

    def prepare(i, x):
        seen[i] = x.clone()
        moes[i].router.weight.normal_(generator=torch.Generator().manual_seed(10 + i))

    refit_sequentially(model.get_decoder(), moes, [moe_problem(m) for m in moes], ids, prepare=prepare, chunk=3)
    final = _ffn_inputs(model, moes, ids)
    assert sorted(seen) == list(range(len(moes)))
    for i, x in enumerate(final):
        torch.testing.assert_close(seen[i], x, rtol=1e-5, atol=1e-5)
    # the refit of the last layer used the router prepare set: refitting again (same router) changes nothing
    before = moes[-1].dense.down_proj.weight.clone()
    refit_sequentially(model.get_decoder(), moes, [moe_problem(m) for m in moes], ids, chunk=3)
    torch.testing.assert_close(moes[-1].dense.down_proj.weight, before, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", ["dotmoe", "prune"])
def test_calibrate_on_converted_inputs(method, tiny_llama_dir, tiny_text, tmp_path):
    """--calibrate-on converted: layer 0 (same inputs either way) gets the dense-calibrated choice; the conversion
    exports with parity; settings it cannot honour are refused."""
    from dotmoe.errors import DotMoeError
    from dotmoe.convert import convert

    common = dict(model=str(tiny_llama_dir), data=[str(tiny_text)], eval_data=[str(tiny_text)], method=method,
                  experts=4, top_k=2, tokens=0, seq_len=32, calib_tokens=512, eval_tokens=256)
    runs = {on: convert(ConvertConfig(**common, calibrate_on=on, out=str(tmp_path / on)), progress=False)
            for on in ("dense", "converted")}
    torch.testing.assert_close(runs["converted"].partition[0], runs["dense"].partition[0], rtol=0, atol=0)
    if method == "dotmoe":
        assert runs["converted"].summary["export"]["parity"]["max_abs_logit_diff"] < 1e-3
    for bad in (dict(tokens=256), dict(refit_down=False), dict(mode="layerwise")):
        with pytest.raises(DotMoeError, match="calibrate_on converted"):
            ConvertConfig(**{**common, **bad, "method": "dotmoe"}, calibrate_on="converted")


def test_lstsq_topk_router_is_fitted_even_when_the_partition_needs_no_activations(tiny_llama_dir, tiny_text,
                                                                                   tmp_path):
    """weight-kmeans partition, no dropped neurons: only the router needs calibration inputs, and --init-router
    lstsq-topk must still get them (it used to fall back to the random init)."""
    from dotmoe.artifacts import load_conversion
    from dotmoe.convert import convert

    common = dict(model=str(tiny_llama_dir), data=[str(tiny_text)], eval_data=[str(tiny_text)], experts=4, top_k=2,
                  tokens=0, seq_len=32, calib_tokens=512, eval_tokens=256, init_affinity="weight-kmeans", shared=0,
                  refit_down=False, export_format="none")

    for r in ("random", "lstsq", "lstsq-topk"):
        convert(ConvertConfig(**common, init_router=r, out=str(tmp_path / r)), progress=False)
    got = {r: load_conversion(tmp_path / r).routers for r in ("random", "lstsq", "lstsq-topk")}
    for fitted in ("lstsq", "lstsq-topk"):
        assert not torch.allclose(got[fitted][0], got["random"][0])


def test_refit_after_training_is_an_option(tmp_path, refit_calls):
    """Frozen FFN weights, refit before training: no second refit after it unless refit_after_training."""
    from dotmoe.convert import convert
    from dotmoe.paths import reference_data_file

    calls = refit_calls
    common = dict(trainable="router+assignment", experts=8, top_k=2, tokens=3 * 256, warmup_steps=0, batch_size=2, seq_len=128, calib_tokens=512,
                  eval_tokens=512,
                  eval_data=[str(reference_data_file("validation"))], export_format="none",
                  precision="fp32")  # the bf16 mode (`auto` on an AMX CPU) is not what this test is about
    once = convert(ConvertConfig(**common, out=str(tmp_path / "once")), progress=False).summary
    assert calls == [True]  # before training, keeping the dense teacher's down projections
    twice = convert(ConvertConfig(**common, refit_after_training=True, out=str(tmp_path / "twice")),
                    progress=False).summary
    assert calls == [True, True, False]
    assert once["val_ppl"] != twice["val_ppl"]


def test_a_refit_without_one_ffn_per_layer_is_a_clear_error(tiny_llama_dir):
    from dotmoe.errors import DotMoeError

    torch.manual_seed(0)
    model, moes = _tiny_moe_model(tiny_llama_dir, lambda layer, n: torch.arange(n) % 4)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    before = [m.dense.down_proj.weight.clone() for m in moes]
    with pytest.raises(DotMoeError, match="1 FFN modules for 2 decoder layers"):
        refit_sequentially(model.get_decoder(), moes[:1], [moe_problem(m) for m in moes[:1]], ids)
    assert all(torch.equal(m.dense.down_proj.weight, b) for m, b in zip(moes, before))
