"""Loss terms against direct, unchunked formulas."""

import torch
import torch.nn.functional as F

from dotmoe.losses import distill_and_lm_loss, expert_load_cv, load_balancing_loss, router_z_loss
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
