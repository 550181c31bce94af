"""Rounding a soft plan to a hard balanced assignment (`dotmoe.rounding`)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dotmoe.rounding import (assignment_objective, exact_round, greedy_round, one_hot_assignment,
                             straight_through)
from dotmoe.sinkhorn import capacities, sinkhorn_log


def literal_greedy(plan: torch.Tensor, caps: list[int]) -> list[int]:
    """Reference: the sequential greedy, one entry at a time.

    Visit all N*E entries in descending value; ties are broken by row-major flat index (first wins), which is
    what a stable descending argsort over the flattened plan does. Python's sort is stable, so sorting the
    flat indices by -value gives exactly that order. Values are compared in float32, as in greedy_round.
    """
    n, e = plan.shape
    values = plan.detach().float().flatten().tolist()  # float32 values, exactly representable as Python floats
    order = sorted(range(n * e), key=lambda k: -values[k])
    room = list(caps)
    out = [-1] * n
    for k in order:
        i, j = divmod(k, e)
        if out[i] < 0 and room[j] > 0:
            out[i] = j
            room[j] -= 1
    return out


def _check_balanced(assign: torch.Tensor, caps: list[int]) -> None:
    n, e = len(assign), len(caps)
    assert assign.dtype == torch.long and assign.shape == (n,)
    assert int(assign.min()) >= 0 and int(assign.max()) < e
    assert torch.bincount(assign, minlength=e).tolist() == list(caps)


def _problems():
    """(name, plan, caps) covering several regimes; seeds fixed."""
    g = torch.Generator().manual_seed(0)
    out = []
    for n, e in [(64, 8), (100, 7), (37, 5), (16, 16), (9, 9), (50, 1), (128, 3)]:
        caps = capacities(n, e)
        out.append((f"uniform{n}x{e}", torch.rand(n, e, generator=g), caps))
        A = torch.randn(n, e, generator=g)
        out.append((f"sinkhorn{n}x{e}", sinkhorn_log(A, torch.tensor(caps), tau=0.1, iters=30).plan, caps))
    # Heavy ties: few distinct values, so the tie-break decides most of the result.
    out.append(("ties-int", torch.randint(0, 3, (60, 6), generator=g).float(), capacities(60, 6)))
    out.append(("ties-const", torch.full((24, 4), 0.25), capacities(24, 4)))
    out.append(("ties-rows", torch.rand(1, 5, generator=g).expand(40, 5).clone(), capacities(40, 5)))
    # Everybody prefers the same expert (forces refusals and many passes).
    skew = torch.rand(90, 6, generator=g)
    skew[:, 2] += 10
    out.append(("skewed", skew, capacities(90, 6)))
    # Uneven explicit capacities.
    out.append(("explicit", torch.rand(100, 4, generator=g), capacities(100, 4, [10, 60, 25, 5])))
    out.append(("explicit-1", torch.rand(20, 4, generator=g), capacities(20, 4, [1, 1, 1, 17])))
    return out


PROBLEMS = _problems()


@pytest.mark.parametrize("name,plan,caps", PROBLEMS, ids=[p[0] for p in PROBLEMS])
def test_greedy_equals_literal_sequential_greedy(name, plan, caps):
    got = greedy_round(plan, torch.tensor(caps))
    assert got.tolist() == literal_greedy(plan, caps)


@pytest.mark.parametrize("name,plan,caps", PROBLEMS, ids=[p[0] for p in PROBLEMS])
def test_greedy_is_exactly_balanced(name, plan, caps):
    _check_balanced(greedy_round(plan, torch.tensor(caps)), caps)


def test_greedy_larger_problem_balanced_and_matches_literal():
    n, e = 1000, 8
    caps = capacities(n, e)
    A = torch.randn(n, e, generator=torch.Generator().manual_seed(1))
    plan = sinkhorn_log(A, torch.tensor(caps)).plan
    got = greedy_round(plan, torch.tensor(caps))
    _check_balanced(got, caps)
    assert got.tolist() == literal_greedy(plan, caps)


def test_greedy_does_not_modify_inputs_and_ignores_grad():
    plan = torch.rand(30, 3, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    caps = torch.tensor(capacities(30, 3))
    before_plan, before_caps = plan.detach().clone(), caps.clone()
    greedy_round(plan, caps)
    assert torch.equal(plan.detach(), before_plan) and torch.equal(caps, before_caps)


@pytest.mark.parametrize("bad", [[10, 10, 9], [10, 10, 11], [30, 0, 1]])
def test_greedy_invalid_caps_raise(bad):
    plan = torch.rand(30, 3, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError):
        greedy_round(plan, torch.tensor(bad))


@pytest.mark.parametrize("bad", [[10, 20], [10, 10, 5, 5]])
def test_greedy_wrong_number_of_caps_raises(bad):
    # Sum is right, length is wrong. Not validated explicitly: it fails with IndexError / RuntimeError from
    # indexing rather than a ValueError with a clear message; this only checks that it does not pass silently.
    plan = torch.rand(30, 3, generator=torch.Generator().manual_seed(3))
    with pytest.raises((ValueError, IndexError, RuntimeError)):
        greedy_round(plan, torch.tensor(bad))


@pytest.mark.parametrize("bad", [[10, 10, 9], [10, 10, 11]])
def test_exact_invalid_caps_raise(bad):
    plan = torch.rand(30, 3, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError):
        exact_round(plan, torch.tensor(bad))


# ---------------------------------------------------------------------------------------------------------
# exact_round
# ---------------------------------------------------------------------------------------------------------

def _brute_force_best(plan: torch.Tensor, caps: list[int]) -> float:
    n, e = plan.shape
    p = plan.double().numpy()
    best = -np.inf
    for assign in itertools.product(range(e), repeat=n):
        if np.bincount(assign, minlength=e).tolist() == list(caps):
            best = max(best, float(p[np.arange(n), list(assign)].sum()))
    return best


@pytest.mark.parametrize("caps", [[2, 2, 2], [1, 2, 3], [4, 1, 1]])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_matches_brute_force(caps, seed):
    n, e = 6, 3
    plan = torch.rand(n, e, generator=torch.Generator().manual_seed(seed))
    got = exact_round(plan, torch.tensor(caps))
    _check_balanced(got, caps)
    assert assignment_objective(plan, got) == pytest.approx(_brute_force_best(plan, caps), abs=1e-5)


@pytest.mark.parametrize("name,plan,caps", PROBLEMS, ids=[p[0] for p in PROBLEMS])
def test_exact_at_least_greedy(name, plan, caps):
    caps_t = torch.tensor(caps)
    exact = exact_round(plan, caps_t)
    _check_balanced(exact, caps)
    greedy = greedy_round(plan, caps_t)
    assert assignment_objective(plan, exact) >= assignment_objective(plan, greedy) - 1e-4


def test_exact_strictly_better_somewhere():
    """Greedy is not optimal in general: a 2x2 case where taking the largest entry first is a mistake."""
    plan = torch.tensor([[0.9, 0.8], [0.85, 0.1]])
    caps = torch.tensor([1, 1])
    assert greedy_round(plan, caps).tolist() == [0, 1]
    assert exact_round(plan, caps).tolist() == [1, 0]
    assert assignment_objective(plan, exact_round(plan, caps)) > assignment_objective(plan, greedy_round(plan, caps))


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------

def test_assignment_objective_and_one_hot():
    plan = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    assign = torch.tensor([2, 0, 1, 2])
    assert assignment_objective(plan, assign) == 2 + 3 + 7 + 11
    oh = one_hot_assignment(assign, 3)
    assert oh.dtype == torch.float32 and oh.shape == (4, 3)
    assert torch.equal(oh.argmax(1), assign) and torch.equal(oh.sum(1), torch.ones(4))
    assert one_hot_assignment(assign, 3, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_straight_through_forward_hard_backward_soft():
    g = torch.Generator().manual_seed(4)
    n, e = 40, 5
    caps = torch.tensor(capacities(n, e))
    A = torch.randn(n, e, generator=g)
    W = torch.randn(n, e, generator=g)

    A1 = A.clone().requires_grad_(True)
    soft = sinkhorn_log(A1, caps).plan
    hard = one_hot_assignment(greedy_round(soft, caps), e)
    st = straight_through(hard, soft)
    assert torch.equal(st.detach(), hard)  # forward is exactly the hard matrix
    (st * W).sum().backward()

    A2 = A.clone().requires_grad_(True)
    (sinkhorn_log(A2, caps).plan * W).sum().backward()
    torch.testing.assert_close(A1.grad, A2.grad, rtol=0, atol=0)


def test_straight_through_gradient_wrt_soft_is_identity():
    soft = torch.rand(6, 3, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    hard = one_hot_assignment(torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    W = torch.randn(6, 3, generator=torch.Generator().manual_seed(6))
    (straight_through(hard, soft) * W).sum().backward()
    assert torch.equal(soft.grad, W)
