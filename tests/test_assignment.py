"""The warm-started assignment: always the optimum of linear_sum_assignment, on any problem."""

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from latentflow.errors import LatentflowError
from latentflow.flow.assignment import WARM_START_MIN_SIZE, reduced_cost, sinkhorn_potentials, solve_assignment
from latentflow.flow.couplings import squared_cost
from latentflow.toy.distributions import get_distribution


def optimum(cost: np.ndarray) -> float:
    rows, columns = linear_sum_assignment(cost)
    return float(cost[rows, columns].sum())


def assert_optimal(cost: np.ndarray, assigned: np.ndarray) -> None:
    size = cost.shape[0]
    assert sorted(assigned.tolist()) == list(range(size))  # a permutation
    total = float(cost[np.arange(size), assigned].sum())
    spread = float(cost.max() - cost.min()) if size else 0.0
    assert total == pytest.approx(optimum(cost), rel=1e-12, abs=1e-12 * size * (1 + spread))


def point_costs(kind: str, size: int, seed: int) -> np.ndarray:
    generator = torch.Generator().manual_seed(seed)
    if kind == "8gaussians->moons":
        x0, x1 = get_distribution("8gaussians")(size, generator), get_distribution("moons")(size, generator)
    elif kind == "latents":
        x0 = torch.randn(size, 4, 8, 8, generator=generator)
        x1 = 0.8 * torch.randn(size, 4, 8, 8, generator=generator) + 0.3
    elif kind == "duplicates":  # many repeated points: many optimal assignments
        x0 = torch.randint(0, 3, (size, 2), generator=generator).float()
        x1 = torch.randint(0, 3, (size, 2), generator=generator).float()
    else:
        x0, x1 = torch.randn(size, 2, generator=generator), torch.randn(size, 2, generator=generator)
    return squared_cost(x0, x1).double().numpy()


@pytest.mark.parametrize("kind", ["8gaussians->moons", "latents", "duplicates", "gaussians"])
@pytest.mark.parametrize("size", [2, 7, 40, WARM_START_MIN_SIZE, 256, 300])
def test_warm_start_reaches_the_assignment_optimum(kind, size):
    for seed in range(3):
        cost = point_costs(kind, size, seed)
        assert_optimal(cost, solve_assignment(cost, warm_start=True))
        assert_optimal(cost, solve_assignment(cost))


def test_matches_brute_force_on_small_problems_with_ties():
    rng = np.random.default_rng(0)
    for size in range(1, 7):
        for _ in range(20):
            cost = rng.integers(0, 3, (size, size)).astype(np.float64)  # integer costs: ties everywhere
            best = min(sum(cost[i, p[i]] for i in range(size)) for p in itertools.permutations(range(size)))
            assigned = solve_assignment(cost, warm_start=True)
            assert sorted(assigned.tolist()) == list(range(size))
            assert cost[np.arange(size), assigned].sum() == best


@pytest.mark.parametrize("cost", [
    np.zeros((50, 50)),                                    # every assignment optimal
    np.full((50, 50), 7.5),
    np.arange(2500, dtype=np.float64).reshape(50, 50),     # every assignment costs the same
    np.random.default_rng(1).random((150, 150)) * 1e-30,   # tiny range
    np.random.default_rng(2).random((150, 150)) * 1e30,    # huge range
    np.random.default_rng(3).random((150, 150)) * 1e300,   # beyond float32: no duals, still exact
    np.random.default_rng(4).integers(0, 2, (200, 200)).astype(np.float64),
])
def test_degenerate_and_extreme_costs(cost):
    assert_optimal(cost, solve_assignment(cost, warm_start=True))


def test_planted_permutation_is_recovered():
    generator = torch.Generator().manual_seed(5)
    x1 = 10 * torch.randn(300, 2, generator=generator)
    permutation = torch.randperm(300, generator=generator)
    x0 = x1[permutation] + 0.01 * torch.randn(300, 2, generator=generator)
    assigned = solve_assignment(squared_cost(x0, x1).double().numpy())
    # noise row i sits next to data row permutation[i]
    assert np.array_equal(assigned, permutation.numpy())


def test_potentials_are_finite_and_reduce_toward_zero_on_the_optimum():
    cost = point_costs("8gaussians->moons", 256, 9)
    row_potential, column_potential = sinkhorn_potentials(cost)
    assert np.isfinite(row_potential).all() and np.isfinite(column_potential).all()
    reduced = reduced_cost(cost)
    rows, columns = linear_sum_assignment(cost)
    # exact duals would make the optimal pairs' reduced costs 0; these come within 1% of the cost range
    assert np.abs(reduced[rows, columns]).mean() < 0.01 * (cost.max() - cost.min())
    assert np.abs(reduced[rows, columns]).mean() < 0.1 * np.abs(cost[rows, columns]).mean()


def test_bad_input_is_refused():
    with pytest.raises(LatentflowError, match="square"):
        solve_assignment(np.zeros((3, 4)))
    with pytest.raises(LatentflowError, match="NaN or infinite"):
        solve_assignment(np.array([[0.0, np.nan], [1.0, 2.0]]))
