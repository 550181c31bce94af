"""Evaluation: reconstruction error, router statistics and the lm-eval integration against direct computations."""

import json
import math

import pytest
import torch
from test_export import fake_conversion, save_tiny

from dotmoe.errors import DotMoeError
from dotmoe.evaluate import EvalConfig, evaluate, reconstruction_errors, router_statistics, run_tasks
from dotmoe.export import export
from dotmoe.moe_mlp import moe_layers
from dotmoe.paths import reference_model_dir, tasks_dir
from dotmoe.sparse_model import load_sparse_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    dense = save_tiny("llama", root / "dense")
    conv = fake_conversion(dense, root / "conv", experts=4, top_k=2)
    export(conv, root / "moe", check_tokens=0, progress=False)
    return dense, conv, root / "moe"


def _dense_mlp_inputs(model, ids):
    from dotmoe.architecture import find_gated_mlps

    store = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: store.append(args[0])) for _, m in find_gated_mlps(model)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return store


def test_reconstruction_error_matches_training_time_moe_on_dense_inputs(exported):
    from transformers import AutoModelForCausalLM

    dense_dir, conv, moe_dir = exported
    dense = AutoModelForCausalLM.from_pretrained(dense_dir).eval()
    moe = AutoModelForCausalLM.from_pretrained(moe_dir).eval()
    ids = torch.randint(0, 8000, (2, 32), generator=torch.Generator().manual_seed(0))
    got = reconstruction_errors(dense, moe, ids)
    sparse, _, _ = load_sparse_model(conv)
    expected = []
    with torch.no_grad():
        for x, layer in zip(_dense_mlp_inputs(dense, ids), moe_layers(sparse)):
            y = layer.dense.down_proj(layer.dense.act_fn(layer.dense.gate_proj(x)) * layer.dense.up_proj(x))
            expected.append(float((layer(x) - y).pow(2).sum() / y.pow(2).sum()))
    assert got == pytest.approx(expected, rel=1e-4)
    assert all(0.05 < e < 2 for e in got)  # a 2-of-4 MoE is a real approximation
    assert reconstruction_errors(dense, dense, ids) == [0.0, 0.0]


def test_router_statistics_count_the_top_k_of_the_router(exported):
    from transformers import AutoModelForCausalLM

    dense_dir, conv, moe_dir = exported
    moe = AutoModelForCausalLM.from_pretrained(moe_dir).eval()
    ids = torch.randint(0, 8000, (2, 32), generator=torch.Generator().manual_seed(1))
    stats = router_statistics(moe, ids)
    sparse, _, _ = load_sparse_model(conv)
    inputs = _dense_mlp_inputs(sparse, ids)  # MoeMLP hooks see the MoE model's own layer inputs
    for layer, (x, m) in enumerate(zip(inputs, moe_layers(sparse))):
        top = (x.reshape(-1, x.shape[-1]) @ m.router.weight.t()).topk(2, dim=-1).indices
        load = torch.bincount(top.flatten(), minlength=4).double() / top.numel()
        assert stats["load"][layer] == pytest.approx(load.tolist(), abs=1e-9)
        p = (x.reshape(-1, x.shape[-1]) @ m.router.weight.t()).softmax(-1)
        entropy = float((-(p * p.log()).sum(-1) / math.log(4)).mean())
        assert stats["routing_entropy"][layer] == pytest.approx(entropy, rel=1e-4)
    assert stats["dead_experts"] == sum(v == 0 for row in stats["load"] for v in row)
    assert router_statistics(AutoModelForCausalLM.from_pretrained(dense_dir), ids) is None


def test_evaluate_report_and_custom_code_flag(exported, tmp_path):
    dense_dir, conv, moe_dir = exported
    text = tmp_path / "held_out.txt"
    text.write_text("The tutorial explains lists and dictionaries with small examples. " * 200)
    report = evaluate(EvalConfig(model=str(moe_dir), dense=str(dense_dir), data=[str(text)], tokens=1024,
                                 recon_tokens=256, out=str(tmp_path / "r.json")), progress=False)
    assert report["ppl_ratio"] == pytest.approx(report["ppl"] / report["dense_ppl"])
    assert report["active_params"] < report["params"]
    assert json.loads((tmp_path / "r.json").read_text())["ppl"] == report["ppl"]
    same = evaluate(EvalConfig(model=str(dense_dir), dense=str(dense_dir), data=[str(text)], tokens=1024,
                               recon_tokens=256), progress=False)
    assert same["retention"] == 1.0 and same["mean_recon_error"] == 0.0 and "router" not in same

    custom_conv = fake_conversion(dense_dir, tmp_path / "conv_mask", gating="mask")
    export(custom_conv, tmp_path / "custom", check_tokens=0, progress=False)
    with pytest.raises(DotMoeError, match="--trust-remote-code"):
        evaluate(EvalConfig(model=str(tmp_path / "custom"), data=[str(text)], tokens=512), progress=False)


def test_lm_eval_integration_scores_the_bundled_task_like_a_direct_computation():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(reference_model_dir(), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(reference_model_dir())
    limit = 24
    scores = run_tasks(model, tok, ["pydoc_cloze"], limit=limit)["pydoc_cloze"]
    items = [json.loads(line) for line in (tasks_dir() / "pydoc_cloze.jsonl").read_text().splitlines()[:limit]]
    correct = 0
    with torch.no_grad():
        for item in items:
            ctx = tok(item["context"]).input_ids
            lls = []
            for choice in item["choices"]:
                whole = tok(item["context"] + choice).input_ids
                logp = model(input_ids=torch.tensor([whole])).logits[0, :-1].log_softmax(-1)
                cont = range(len(ctx), len(whole))
                lls.append(sum(float(logp[i - 1, whole[i]]) for i in cont))
            correct += int(max(range(4), key=lambda i: lls[i]) == item["label"])
    assert scores["acc"] == pytest.approx(correct / limit)
    with pytest.raises(DotMoeError, match="unknown task"):
        run_tasks(model, tok, ["hellaswag"], limit=1)
