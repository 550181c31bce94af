"""Baselines: activation (CMoE), hidden-kmeans-router (LLaMA-MoE-v2), prune; training-free conversions."""

import pytest
import torch
from torch import nn

from dotmoe.calibration_methods import (FIRE_FRACTION, activation_partition, hidden_kmeans_partition,
                                        neuron_activations, prune_keep)
from dotmoe.config import ConvertConfig
from dotmoe.convert import convert


class GatedMLP(nn.Module):
    def __init__(self, d=16, n=64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.gate_proj, self.up_proj = nn.Linear(d, n, bias=False), nn.Linear(d, n, bias=False)
        self.down_proj = nn.Linear(n, d, bias=False)
        self.act_fn = nn.SiLU()


def test_activation_partition_shares_the_most_frequent_neurons_and_balances_the_rest():
    mlp, x = GatedMLP(), torch.randn(500, 16, generator=torch.Generator().manual_seed(1))
    caps = torch.tensor([13, 13, 13, 13, 12])  # 4 routed experts + shared column of 12
    part, router = activation_partition(mlp, x, caps, shared=12, generator=torch.Generator().manual_seed(0))
    assert torch.bincount(part, minlength=5).tolist() == caps.tolist()
    h = neuron_activations(mlp, x).abs()
    k = int(FIRE_FRACTION * 64)
    rate = torch.zeros_like(h).scatter_(1, h.topk(k, dim=1).indices, 1.0).mean(0)
    assert set((part == 4).nonzero().flatten().tolist()) == set(rate.topk(12).indices.tolist())
    for e in range(4):  # each router row is the gate row of one of the expert's own neurons
        members = (part == e).nonzero().flatten()
        assert any(torch.equal(router[e], mlp.gate_proj.weight[n]) for n in members)


def test_hidden_kmeans_assignment_beats_random_on_its_own_importance():
    mlp, x = GatedMLP(seed=2), torch.randn(800, 16, generator=torch.Generator().manual_seed(3))
    caps = torch.tensor([16, 16, 16, 16])
    part, router = hidden_kmeans_partition(mlp, x, caps, shared=0, generator=torch.Generator().manual_seed(0))
    assert torch.bincount(part, minlength=4).tolist() == [16] * 4
    assert router.shape == (4, 16)
    # tokens routed by the centroid router use their expert's neurons more than a random expert's would
    h = neuron_activations(mlp, x).abs()
    chosen = (x @ router.t()).argmax(-1)
    own = torch.stack([h[i, part == chosen[i]].mean() for i in range(len(x))]).mean()
    g = torch.Generator().manual_seed(5)
    rand = part[torch.randperm(64, generator=g)]
    other = torch.stack([h[i, rand == chosen[i]].mean() for i in range(len(x))]).mean()
    assert own > other


def test_prune_keeps_the_most_important_neurons():
    mlp, x = GatedMLP(seed=4), torch.randn(300, 16, generator=torch.Generator().manual_seed(6))
    keep = prune_keep(mlp, x, 16)
    importance = neuron_activations(mlp, x).abs().mean(0) * mlp.down_proj.weight.norm(dim=0)
    assert keep.tolist() == sorted(importance.topk(16).indices.tolist())


def _cfg(model, data, out, **kw):
    base = dict(shared_fraction=0.0,  # these tests exercise the plain MoE
                model=str(model), data=[str(data)], eval_data=[str(data)], out=str(out), experts=4, top_k=2,
                tokens=0, seq_len=32, batch_size=4, eval_tokens=256, calib_tokens=256, seed=0,
                # fp32 whatever the CPU: on one with AMX `auto` computes a training-free run in bf16, a trained one
                # in fp32, and these tests compare the two (and the dense model) exactly
                precision="fp32")
    base.update(kw)
    return ConvertConfig(**base)


def test_pruned_model_equals_dense_with_dropped_neurons_zeroed(tiny_llama_dir, tiny_text, tmp_path):
    from transformers import AutoModelForCausalLM

    # plain slicing (the least-squares refit of the kept down projections is tested in test_refit.py)
    res = convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "p", method="prune", refit_down=False), progress=False)
    kept = res.partition  # [L, kept neurons]
    assert kept.shape == (2, 32) and res.summary["kept_neurons"] == 32  # 64 * 2/4
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "p" / "model", dtype=torch.float32).eval()
    assert pruned.config.intermediate_size == 32
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer, index in zip(dense.model.layers, kept):
            dropped = torch.ones(64, dtype=torch.bool)
            dropped[index] = False
            layer.mlp.down_proj.weight[:, dropped] = 0
        ids = torch.arange(30).unsqueeze(0)
        assert torch.allclose(pruned(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("method", ["random", "sequential", "weight-kmeans", "activation", "hidden-kmeans-router",
                                    "dotmoe"])
def test_training_free_and_trained_variants_share_the_partition_recipe(method, tiny_llama_dir, tiny_text, tmp_path):
    free = convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "free", method=method), progress=False)
    assert free.summary["train_tokens"] == 0 and free.summary["steps"] == 0
    trained = convert(_cfg(tiny_llama_dir, tiny_text, tmp_path / "tr", method=method, tokens=4 * 4 * 32),
                      progress=False)
    for part in (free.partition, trained.partition):
        assert all(torch.bincount(p, minlength=4).tolist() == [16] * 4 for p in part)
    if method != "dotmoe":  # baselines keep their partition; only the router trains
        assert torch.equal(free.partition, trained.partition)
    assert trained.summary["export"]["parity"]["max_abs_logit_diff"] < 1e-4


@pytest.mark.parametrize("top_k", [None, 2])
def test_lstsq_router_is_the_ridge_fit_of_its_target(tiny_llama_dir, top_k):
    """The analytic router: numpy's ridge least squares from x onto the standardised expert contribution norms
    (init lstsq) or onto the indicator of each token's top-k experts by those norms (init lstsq-topk)."""
    import numpy as np

    from dotmoe.architecture import find_gated_mlps, load_causal_lm
    from dotmoe.layer_setup import LSTSQ_ROUTER_SCALE, lstsq_router

    model, _ = load_causal_lm(tiny_llama_dir)
    mlp = find_gated_mlps(model)[0][1]
    x = torch.randn(400, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
    partition = torch.arange(mlp.gate_proj.out_features) % 4
    with torch.no_grad():
        h = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).abs() * mlp.down_proj.weight.norm(dim=0)
    norms = np.stack([h[:, partition.numpy() == e].norm(dim=-1).numpy() for e in range(4)], -1).astype(np.float64)
    target = norms
    if top_k:
        target = np.zeros_like(norms)
        np.put_along_axis(target, np.argsort(-norms, -1)[:, :top_k], 1.0, -1)
    target = LSTSQ_ROUTER_SCALE * (target - target.mean(-1, keepdims=True)) / target.std(-1, ddof=1, keepdims=True)
    xs = x.double().numpy()
    ridge = 1e-3 * (xs ** 2).mean() * len(xs)
    reference = np.linalg.solve(xs.T @ xs + ridge * np.eye(xs.shape[1]), xs.T @ target).T
    router = lstsq_router(mlp, x, partition, 4, top_k)
    np.testing.assert_allclose(router.numpy(), reference, rtol=1e-3, atol=1e-4)
    if top_k:  # the router's top-k choice agrees with the oracle's on most tokens of a linear-enough problem
        agree = (torch.from_numpy(x.numpy() @ router.numpy().T).topk(top_k, -1).indices.sort(-1).values ==
                 torch.from_numpy(np.argsort(-norms, -1)[:, :top_k].copy()).sort(-1).values).all(-1).float().mean()
        assert agree > 0.25, agree


def test_pruning_plus_distillation_starts_at_the_pruned_model_and_distills_against_the_dense_one(tmp_path):
    """--method prune --tokens N: the training-free pruned model, then every weight distilled from the dense model
    on the joint training's batches; the first step's KL equals F.kl_div of the two models' own logits on that batch,
    training lowers it, and the run ends at its best validation point."""
    import json

    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from dotmoe.data import batch_order
    from dotmoe.paths import default_data_file, reference_model_dir
    from dotmoe.prepare import prepare

    model = reference_model_dir()  # a trained model on its own text: the KL is far from 0 and measurable
    data = dict(data=[str(default_data_file("train", str(model)))],
                eval_data=[str(default_data_file("validation", str(model)))])

    def cfg(out, **kw):
        return _cfg(model, data["data"][0], tmp_path / out, method="prune", eval_data=data["eval_data"], **kw)

    free = convert(cfg("free"), progress=False).summary
    # fp32 (not bf16 autocast where the CPU has it): the step's loss is checked against an fp32 reference below
    run = cfg("tr", tokens=3 * 4 * 32, eval_every=1, warmup_steps=0, lr_weights=1e-4, mixed_precision="no")
    trained = convert(run, progress=False).summary
    assert trained["steps"] == 3 and trained["train_tokens"] == 384 and run.trainable == "full"
    curve = trained["eval_curve"]  # measured 18.648 -> 18.606 -> 18.579 -> 18.566
    assert curve[0] == pytest.approx(free["val_ppl"], rel=1e-5)  # it starts at the pruned model
    assert curve[-1] < curve[0] and trained["best_step"] == 3, curve
    log = [json.loads(x) for x in (tmp_path / "tr" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3]

    seqs = prepare(cfg("x", tokens=384)).seqs
    batch = seqs[batch_order(run, len(seqs))[:4]]
    dense = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.no_grad():
        teacher, student, after = (
            m(input_ids=batch).logits[:, :-1].reshape(-1, dense.config.vocab_size) for m in
            (dense, *(AutoModelForCausalLM.from_pretrained(tmp_path / d / "model").eval() for d in ("free", "tr"))))

    def kl(s):
        return float(F.kl_div(F.log_softmax(s, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean"))

    assert log[1]["kl"] == pytest.approx(kl(student), abs=1e-6)  # step 1's loss (logged to 6 decimals)
    assert kl(after) < 0.98 * kl(student), (kl(after), kl(student))  # three steps later: closer to the teacher
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "tr" / "model")
    assert pruned.config.intermediate_size == free["kept_neurons"]


def test_distillation_that_does_not_improve_ends_with_the_weights_it_started_from(tiny_llama_dir):
    """keep_best: a distillation whose validation perplexity only rises (a random student at a high rate) returns to
    its starting weights, bit for bit."""
    from dotmoe.distill_dense import distill_dense
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    start = {k: v.clone() for k, v in student.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    seqs, eval_ids = torch.randint(0, 500, (16, 32), generator=g), torch.randint(0, 500, (256,), generator=g)
    cfg = ConvertConfig(method="prune", tokens=3 * 4 * 32, seq_len=32, batch_size=4, eval_every=1, warmup_steps=0,
                        lr_weights=0.1, eval_tokens=256)
    result = distill_dense(student, teacher, seqs, eval_ids, cfg, progress=False)
    assert len(result.eval_curve) == 4 and min(result.eval_curve[1:]) > result.eval_curve[0], result.eval_curve
    assert result.best_step == 0
    assert all(torch.equal(v, start[k]) for k, v in student.state_dict().items())
    assert [r["step"] for r in result.history] == [0, 1, 2, 3]


@pytest.mark.parametrize("settings, message", [({"trainable": "router+assignment"}, "does not apply"),
                                               ({"resume": True}, "does not checkpoint")])
def test_pruning_plus_distillation_refuses_what_it_cannot_do(settings, message, tmp_path):
    from dotmoe.errors import DotMoeError

    with pytest.raises(DotMoeError, match=message):
        ConvertConfig(method="prune", tokens=1024, out=str(tmp_path), **settings)
