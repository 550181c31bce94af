"""Loss terms against direct, unchunked formulas."""

import json

import pytest
import torch
import torch.nn.functional as F

from dotmoe.losses import (distill_and_lm_loss, expert_load_cv, hidden_state_loss, load_balancing_loss,
                           router_z_loss)
from dotmoe.router import TopKRouter


def test_chunked_kl_and_ce_match_direct():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hs, ht = torch.randn(2, 9, 16, requires_grad=True), torch.randn(2, 9, 16)
    labels = torch.randint(0, 50, (2, 9))
    for temperature in (1.0, 2.0):
        kl, ce = distill_and_lm_loss(hs, ht, labels, head, temperature=temperature, chunk_tokens=5)
        ls, lt = head(hs[:, :-1]).reshape(-1, 50), head(ht[:, :-1]).reshape(-1, 50)
        ref_kl = F.kl_div(F.log_softmax(ls / temperature, -1), F.log_softmax(lt / temperature, -1),
                          log_target=True, reduction="batchmean") * temperature**2
        ref_ce = F.cross_entropy(ls, labels[:, 1:].reshape(-1))
        torch.testing.assert_close(kl, ref_kl, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-6)
    (g_chunk,) = torch.autograd.grad(distill_and_lm_loss(hs, ht, labels, head, chunk_tokens=4)[0], hs)
    ls = head(hs[:, :-1]).reshape(-1, 50)
    ref = F.kl_div(F.log_softmax(ls, -1), F.log_softmax(head(ht[:, :-1]).reshape(-1, 50), -1), log_target=True,
                   reduction="batchmean")
    (g_ref,) = torch.autograd.grad(ref, hs)
    torch.testing.assert_close(g_chunk, g_ref, rtol=1e-4, atol=1e-6)


def test_router_losses_match_formulas():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, 1, "softmax")
    out = router(torch.randn(20, 8))
    z = torch.logsumexp(out.logits, -1).pow(2).mean()
    torch.testing.assert_close(router_z_loss([out]), z)
    counts = torch.bincount(out.probs.argmax(-1), minlength=4).float()
    lb = 4 * ((counts / 20) * out.probs.mean(0)).sum()
    torch.testing.assert_close(load_balancing_loss([out]), lb)
    assert abs(expert_load_cv([out]) - float(counts.std(unbiased=False) / counts.mean())) < 1e-6


def _reference_terms(hs, ht, labels, head, temperature):
    """The unchunked formulas through plain autograd: KL(teacher || student) per token (the teacher's logits a
    constant), CE per label."""
    v = head.weight.shape[0]
    ls = head(hs[:, :-1]).reshape(-1, v)
    lt = F.linear(ht[:, :-1], head.weight.detach(), head.bias.detach()).reshape(-1, v)  # a fixed target
    kl = F.kl_div(F.log_softmax(ls / temperature, -1), F.log_softmax(lt / temperature, -1), log_target=True,
                  reduction="batchmean") * temperature**2
    return kl, F.cross_entropy(ls, labels[:, 1:].reshape(-1), ignore_index=-100)


def test_fused_head_loss_gradients_match_autograd():
    """The gradients computed in the forward (hidden states, head weight and bias) equal autograd's through the
    direct formulas, for a weighted KL + CE with a temperature and ignored labels."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    hs, ht = torch.randn(2, 9, 16, requires_grad=True), torch.randn(2, 9, 16)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, 3] = labels[1, 7] = -100
    for temperature, ce_weight in ((1.0, 0.5), (2.0, 0.0), (1.0, 0.0), (2.0, 0.5)):
        kl, ce = distill_and_lm_loss(hs, ht, labels, head, temperature=temperature, chunk_tokens=5,
                                     ce_grad=ce_weight > 0)
        got = torch.autograd.grad(0.7 * kl + ce_weight * ce, (hs, head.weight, head.bias))
        ref_kl, ref_ce = _reference_terms(hs, ht, labels, head, temperature)
        torch.testing.assert_close(kl, ref_kl, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-6)
        want = torch.autograd.grad(0.7 * ref_kl + ce_weight * ref_ce, (hs, head.weight, head.bias))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    # with no teacher, the CE alone carries the gradient
    _, ce = distill_and_lm_loss(hs, None, labels, head, chunk_tokens=4)
    (g_h,) = torch.autograd.grad(ce, hs)
    ref = F.cross_entropy(head(hs[:, :-1]).reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(g_h, torch.autograd.grad(ref, hs)[0], rtol=1e-4, atol=1e-6)



def test_frozen_teacher_heads_autocast_copy_follows_its_weight():
    """Under autocast the frozen teacher head's bf16 copy is reused across calls, but never once the weight changes
    in place or another head is passed: each KL equals the one from an uncached (trainable) copy of that head."""
    torch.manual_seed(0)
    head, teacher = torch.nn.Linear(16, 50, bias=False), torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    hs, ht = torch.randn(2, 9, 16), torch.randn(2, 9, 16)
    labels = torch.randint(0, 50, (2, 9))

    def kl_of(teacher_head):
        with torch.autocast("cpu", torch.bfloat16):
            return distill_and_lm_loss(hs, ht, labels, head, chunk_tokens=5, teacher_head=teacher_head)[0]

    def uncached(weight):
        fresh = torch.nn.Linear(16, 50, bias=False)
        fresh.weight.data.copy_(weight)
        return kl_of(fresh)  # requires grad: cast at every call

    first = kl_of(teacher)
    assert first == uncached(teacher.weight) and kl_of(teacher) == first
    with torch.no_grad():
        teacher.weight.mul_(2.0)  # in place: the version counter moves
    second = kl_of(teacher)
    assert second == uncached(teacher.weight) and abs(float(second - first)) > 1e-3
    other = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    assert kl_of(other) == uncached(other.weight) != second


def test_hidden_state_loss_is_the_mean_relative_error_of_the_layers():
    torch.manual_seed(0)
    student = tuple(torch.randn(2, 5, 8) for _ in range(4))
    teacher = tuple(s + 0.1 * (i + 1) * torch.randn(2, 5, 8) for i, s in enumerate(student))
    want = sum(float(((s - t) ** 2).sum() / (t**2).sum()) for s, t in zip(student[1:], teacher[1:])) / 3
    assert abs(float(hidden_state_loss(student, teacher)) - want) < 1e-6
    assert float(hidden_state_loss(teacher, teacher)) == 0.0
    with pytest.raises(ValueError):
        hidden_state_loss(student, teacher[:3])


@pytest.mark.parametrize("method", ["dotmoe", "prune"])
def test_hidden_weight_enters_the_logged_loss(method, tiny_llama_dir, tiny_text, tmp_path):
    """A run with hidden_weight logs the layer term, and its loss is the weighted sum with it (joint and prune)."""
    from conftest import tiny_convert_argv
    from dotmoe.cli import main

    out = tmp_path / "out"
    argv = tiny_convert_argv(tmp_path, tiny_llama_dir, tiny_text, out, method=method, tokens=3 * 4 * 32,
                             trainable="full", hidden_weight=0.5, eval_every=0)
    assert main(argv) == 0
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines() if '"kl"' in x]
    assert len(rows) == 3
    for r in rows:
        assert r["hidden"] > 1e-4
        extra = 1e-3 * r["z"] + 1e-2 * r["lb"] if method == "dotmoe" else 0.0
        assert abs(r["loss"] - (r["kl"] + 0.5 * r["hidden"] + extra)) < 1e-5
