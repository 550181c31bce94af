"""Log-domain Sinkhorn (`dotmoe.sinkhorn`): agreement with POT, marginals, batching, stability, gradients.

Tolerances (all measured on this implementation, then given a margin; see each test):
- POT agreement, same iteration count: max |plan_ours - plan_POT| <= 1e-5. Plan entries lie in [0, 1]
  (rows sum to 1), so this is relative to plan scale; measured ~2e-6 (float32 vs POT float64).
- POT agreement at convergence (POT's own update order): <= 1e-5; measured ~1.6e-6.
- Defaults (tau=0.1, iters=100) on A ~ randn (unit scale, N=1024, E=8): columns exact to 1e-5 relative
  (the loop ends on the column update; measured ~4e-7); rows within 1e-4 absolute (measured ~2e-6).
  30 iterations do NOT converge rows here (worst 1.5e-3 over 20 seeds); that is asserted below.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ot  # noqa: E402  (test dependency; a missing POT must fail, not skip)

from dotmoe.sinkhorn import capacities, sinkhorn_log  # noqa: E402

POT_SAME_ITERS_TOL = 1e-5
POT_CONVERGED_TOL = 1e-5
DEFAULT_ROW_TOL = 1e-4
COL_REL_TOL = 1e-5


def _affinity(n: int, e: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(n, e, generator=torch.Generator().manual_seed(seed))


def _caps(n: int, e: int) -> torch.Tensor:
    return torch.tensor(capacities(n, e), dtype=torch.float32)


def _row_col_err(plan: torch.Tensor, caps: torch.Tensor) -> tuple[float, float]:
    plan = plan.double()
    caps = caps.double()
    row = (plan.sum(-1) - 1).abs().max().item()
    col = ((plan.sum(-2) - caps) / caps).abs().max().item()
    return row, col


def _pot_sinkhorn(a: np.ndarray, b: np.ndarray, cost: np.ndarray, reg: float, iters: int) -> np.ndarray:
    # ot.sinkhorn_log is not exported at top level in POT 0.9.x; the solver lives in ot.bregman.
    return ot.bregman.sinkhorn_log(a, b, cost, reg, numItermax=iters, stopThr=0, warn=False)


# ---------------------------------------------------------------------------------------------------------
# Agreement with POT
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,e", [(96, 8), (100, 7)])
@pytest.mark.parametrize("tau,iters", [(0.1, 30), (1.0, 30), (0.1, 5), (0.1, 1)])
def test_matches_pot_same_iteration_count(n, e, tau, iters):
    """Same problem, same number of iterations, same update order -> same plan.

    POT's loop updates the column potential first and ends on the row update; ours updates rows first and
    ends on the column update. Solving the transposed problem in POT (a=caps, b=ones, M=-A^T) gives exactly
    our update sequence from the same zero initialisation, so the plans agree after *any* iteration count,
    not only at convergence.
    """
    A = _affinity(n, e, seed=1)
    caps = _caps(n, e)
    ours = sinkhorn_log(A, caps, tau=tau, iters=iters).plan.double().numpy()
    pot = _pot_sinkhorn(caps.double().numpy(), np.ones(n), -A.double().numpy().T, tau, iters).T
    assert np.abs(ours - pot).max() <= POT_SAME_ITERS_TOL


@pytest.mark.parametrize("n,e", [(96, 8), (100, 7)])
def test_matches_pot_at_convergence(n, e):
    """POT as documented (a=ones(N), b=caps, M=-A): its half-step-shifted order only agrees at convergence.

    With 30 iterations at tau=0.1 the two orders differ by ~4e-2 (different half-step), so this compares
    after 300 iterations, where both have converged (diff ~1.6e-6, float32 vs float64).
    """
    A = _affinity(n, e, seed=1)
    caps = _caps(n, e)
    ours = sinkhorn_log(A, caps, tau=0.1, iters=300).plan.double().numpy()
    pot = _pot_sinkhorn(np.ones(n), caps.double().numpy(), -A.double().numpy(), 0.1, 300)
    assert np.abs(ours - pot).max() <= POT_CONVERGED_TOL


# ---------------------------------------------------------------------------------------------------------
# Marginals at the defaults
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_marginals_at_defaults(seed):
    n, e = 1024, 8
    A = _affinity(n, e, seed)
    caps = _caps(n, e)
    res = sinkhorn_log(A, caps)  # defaults: tau=0.1, iters=100
    row, col = _row_col_err(res.plan, caps)
    assert col <= COL_REL_TOL
    assert row <= DEFAULT_ROW_TOL
    assert res.plan.dtype == torch.float32 and (res.plan >= 0).all()
    # The reported error is the worst of the two, as measured here (float32 sums -> small slack).
    assert res.marginal_error.item() == pytest.approx(max(row, col), abs=1e-5)


def test_default_iterations_converge_rows_where_30_do_not():
    """30 iterations leave a ~1e-3 row error at tau=0.1 on unit-scale A; the default 100 reach ~1e-6."""
    n, e = 1024, 8
    A, caps = _affinity(n, e, seed=0), _caps(n, e)
    row30, _ = _row_col_err(sinkhorn_log(A, caps, iters=30).plan, caps)
    row100, _ = _row_col_err(sinkhorn_log(A, caps, iters=100).plan, caps)
    assert row30 > 1e-4
    assert row100 <= 1e-5


def test_uneven_and_explicit_capacities_reached():
    n, e = 1000, 7
    A = _affinity(n, e, seed=3)
    for caps in (_caps(n, e), torch.tensor(capacities(n, e, [100, 200, 50, 150, 250, 130, 120]), dtype=torch.float32)):
        res = sinkhorn_log(A, caps, tau=0.1, iters=200)
        row, col = _row_col_err(res.plan, caps)
        assert col <= COL_REL_TOL
        assert row <= 1e-4


def test_integer_caps_accepted():
    A = _affinity(64, 4, seed=4)
    p_long = sinkhorn_log(A, torch.tensor(capacities(64, 4))).plan
    p_float = sinkhorn_log(A, _caps(64, 4)).plan
    assert torch.equal(p_long, p_float)


def test_invalid_tau_or_iters():
    A, caps = _affinity(8, 2, 0), _caps(8, 2)
    with pytest.raises(ValueError):
        sinkhorn_log(A, caps, tau=0.0)
    with pytest.raises(ValueError):
        sinkhorn_log(A, caps, tau=-1.0)
    with pytest.raises(ValueError):
        sinkhorn_log(A, caps, iters=0)


# ---------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,e", [(256, 8), (100, 7)])
def test_batched_equals_per_layer(n, e):
    L = 4
    A = torch.stack([_affinity(n, e, seed=10 + i) for i in range(L)])
    caps = _caps(n, e)
    batched = sinkhorn_log(A, caps, tau=0.1, iters=30)
    assert batched.plan.shape == (L, n, e)
    assert batched.marginal_error.shape == (L,)
    for i in range(L):
        single = sinkhorn_log(A[i], caps, tau=0.1, iters=30)
        torch.testing.assert_close(batched.plan[i], single.plan, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(batched.marginal_error[i], single.marginal_error, rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Extreme affinities
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,e", [(256, 8), (100, 7)])
def test_extreme_affinity_finite(dtype, n, e):
    """|A|/tau ~ 4e7: nothing overflows, columns are met, the plan is a valid non-negative matrix, and the
    reported marginal error is finite and honest (it equals what we measure)."""
    A = (_affinity(n, e, seed=5) * 1e4).to(dtype)
    caps = _caps(n, e)
    res = sinkhorn_log(A, caps, tau=1e-3, iters=30)
    assert res.plan.dtype == torch.float32
    assert torch.isfinite(res.plan).all()
    assert (res.plan >= 0).all()
    assert torch.isfinite(res.marginal_error).all()
    row, col = _row_col_err(res.plan, caps)
    assert col <= COL_REL_TOL
    assert res.marginal_error.item() == pytest.approx(max(row, col), rel=1e-3, abs=1e-5)


@pytest.mark.xfail(strict=True, reason=(
    "Known limitation: at |A|/tau ~ 4e7 the row marginals are far from 1 (measured worst row error "
    "0.2-1.7). Plain Sinkhorn needs O(range/tau) iterations at tiny tau (float64 is also still at "
    "~0.4-0.6 after 3000 iterations), and in float32 the potentials (~4e7, ulp 4) cannot resolve the plan "
    "at all. Needs epsilon-scaling / a tau floor; remove this marker once rows converge."))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_affinity_rows_sum_to_one(dtype):
    n, e = 256, 8
    A = (_affinity(n, e, seed=5) * 1e4).to(dtype)
    caps = _caps(n, e)
    row, _ = _row_col_err(sinkhorn_log(A, caps, tau=1e-3, iters=30).plan, caps)
    assert row <= 1e-2


# ---------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------

def test_gradient_finite_and_nonzero():
    n, e = 256, 8
    A = _affinity(n, e, seed=6).requires_grad_(True)
    W = _affinity(n, e, seed=7)
    plan = sinkhorn_log(A, _caps(n, e)).plan
    (plan * W).sum().backward()
    assert A.grad is not None
    assert torch.isfinite(A.grad).all()
    assert A.grad.abs().max() > 1e-6


def test_gradient_batched_bf16_input():
    A = _affinity(64, 4, seed=8).expand(2, 64, 4).to(torch.bfloat16).clone().requires_grad_(True)
    sinkhorn_log(A, _caps(64, 4)).plan[..., 0].sum().backward()
    assert A.grad.dtype == torch.bfloat16 and torch.isfinite(A.grad.float()).all()


def test_gradient_matches_finite_differences():
    """Central differences along random directions (the function computes in float32 whatever the input,
    so torch.autograd.gradcheck's float64 eps=1e-6 perturbations would be lost; use eps=1e-2 in float64
    *inputs* and a float32-level tolerance instead). tau=0.5 keeps the map smooth at this eps."""
    n, e = 12, 3
    caps = _caps(n, e)
    A = _affinity(n, e, seed=9).double()
    W = _affinity(n, e, seed=10).double()

    def loss(x: torch.Tensor) -> torch.Tensor:
        return (sinkhorn_log(x, caps, tau=0.5, iters=50).plan.double() * W).sum()

    Ag = A.clone().requires_grad_(True)
    loss(Ag).backward()
    grad = Ag.grad
    eps = 1e-2
    gen = torch.Generator().manual_seed(11)
    for _ in range(5):
        d = torch.randn(n, e, generator=gen, dtype=torch.float64)
        d /= d.norm()
        fd = (loss(A + eps * d) - loss(A - eps * d)).item() / (2 * eps)
        ad = (grad * d).sum().item()
        assert ad == pytest.approx(fd, rel=1e-2, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------
# capacities()
# ---------------------------------------------------------------------------------------------------------

def test_capacities_uniform_and_uneven():
    assert capacities(96, 8) == [12] * 8
    c = capacities(100, 7)
    assert sum(c) == 100 and max(c) - min(c) <= 1
    assert c == [15, 15, 14, 14, 14, 14, 14]  # first N mod E = 2 get +1
    assert capacities(11008, 64) == [172] * 64
    c = capacities(5, 5)
    assert c == [1] * 5


def test_capacities_explicit_sizes():
    assert capacities(10, 3, [2, 3, 5]) == [2, 3, 5]
    with pytest.raises(ValueError):
        capacities(10, 3, [2, 3, 4])  # wrong sum
    with pytest.raises(ValueError):
        capacities(10, 3, [5, 5])  # wrong length
    with pytest.raises(ValueError):
        capacities(10, 3, [0, 5, 5])  # zero size
    with pytest.raises(ValueError):
        capacities(10, 3, [-1, 6, 5])  # negative size


def test_capacities_impossible_split():
    with pytest.raises(ValueError):
        capacities(3, 4)
    with pytest.raises(ValueError):
        capacities(3, 0)
