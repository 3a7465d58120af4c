"""Exact linear assignment for square cost matrices, warm-started by approximate OT duals.

A permutation that is optimal for `cost[i, j] - u[i] - v[j]` is optimal for `cost`,
whatever the vectors u and v: every permutation's total changes by the same constant
sum(u) + sum(v). So subtracting good dual potentials changes nothing about the answer,
only how fast a shortest-augmenting-path solver (scipy's `linear_sum_assignment`) finds
it: with near-optimal duals most rows reach a free column of reduced cost near 0 at
once. The duals come from a c-transform and a few rounds of Sinkhorn with a shrinking
blur, in float32 (they only steer the search); non-finite ones are dropped. The answer
is exact either way; only the float64 rounding of the subtraction (about 1e-16 of the
cost's range per entry) separates it from the solver run on `cost` itself.

Below n = 128 the duals cost more than they save; the measured speed-ups are in the README (exact OT pairing)
and `benchmarks/results/`.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from latentflow.errors import LatentflowError

WARM_START_MIN_SIZE = 128


def sinkhorn_potentials(cost: np.ndarray, blurs: tuple[float, ...] = (0.02, 0.005, 0.0015),
                        iterations: int = 15) -> tuple[np.ndarray, np.ndarray]:
    """Approximate dual potentials (u, v), each (n,), of the assignment problem on `cost` (n, n).

    c-transform, then Sinkhorn with uniform weights in float32, one round of `iterations`
    per entropic blur (a fraction of the c-transformed cost's range), each round absorbed
    into the working cost before the next, smaller one. A round whose potentials come out
    non-finite is dropped with the rounds after it; costs beyond float32's range get zeros.
    """
    if iterations < 1:
        raise LatentflowError(f"sinkhorn_potentials needs at least 1 iteration per blur, got {iterations}")
    with np.errstate(over="ignore"):
        work = cost.astype(np.float32)
    if not np.isfinite(work).all():
        return np.zeros(cost.shape[0]), np.zeros(cost.shape[1])
    column_potential = work.min(axis=0)
    work -= column_potential
    row_potential = work.min(axis=1)
    work -= row_potential[:, None]
    scale = float(work.max())
    kernel = np.empty_like(work)
    with np.errstate(all="ignore"):  # under- and overflow end in non-finite steps, caught below
        for blur in blurs if scale > 0 else ():
            epsilon = np.float32(blur * scale)
            np.multiply(work, -1.0 / epsilon, out=kernel)
            np.exp(kernel, out=kernel)
            row_scaling, column_scaling = _sinkhorn_scalings(kernel, iterations)
            row_step, column_step = epsilon * np.log(row_scaling), epsilon * np.log(column_scaling)
            if not (np.isfinite(row_step).all() and np.isfinite(column_step).all()):
                break
            work -= row_step[:, None]
            work -= column_step[None, :]
            row_potential += row_step
            column_potential += column_step
    return row_potential.astype(np.float64), column_potential.astype(np.float64)


def _sinkhorn_scalings(kernel: np.ndarray, iterations: int) -> tuple[np.ndarray, np.ndarray]:
    """Sinkhorn's row and column scalings (n,) for a kernel (n, n) and uniform marginals."""
    column_scaling = np.ones(kernel.shape[1], dtype=kernel.dtype)
    for _ in range(iterations):
        row_scaling = np.reciprocal(kernel @ column_scaling)
        column_scaling = np.reciprocal(row_scaling @ kernel)
    return row_scaling, column_scaling


def reduced_cost(cost: np.ndarray) -> np.ndarray:
    """cost - u[:, None] - v[None, :] (n, n) float64 with (u, v) from `sinkhorn_potentials`:
    the same optimal assignments as `cost`."""
    row_potential, column_potential = sinkhorn_potentials(cost)
    reduced = cost - row_potential[:, None]
    reduced -= column_potential[None, :]
    return reduced


def solve_assignment(cost: np.ndarray, warm_start: bool | None = None) -> np.ndarray:
    """The optimal assignment of a square cost matrix.

    Args:
        cost: (n, n) finite costs.
        warm_start: subtract approximate duals first (same answer, faster for large n); None
            picks it from n >= WARM_START_MIN_SIZE, where it was measured to pay.

    Returns:
        (n,) int64 column assigned to each row: a permutation minimising sum_i cost[i, col[i]].
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise LatentflowError(f"assignment needs a square cost matrix, got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise LatentflowError("assignment cost matrix contains NaN or infinite entries")
    size = cost.shape[0]
    if warm_start is None:
        warm_start = size >= WARM_START_MIN_SIZE
    if warm_start and size > 1:
        cost = reduced_cost(cost)
    rows, columns = linear_sum_assignment(cost)
    assigned = np.empty(size, dtype=np.int64)
    assigned[rows] = columns
    return assigned
