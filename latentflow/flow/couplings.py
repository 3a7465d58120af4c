"""Couplings: how a batch of noise x0 is paired with a batch of data x1.

Couplings are independent of objectives: an objective takes any coupling. Each
coupling sees flattened tensors, so (B, 2) points and (B, C, H, W) latents are
treated alike, with the squared Euclidean cost.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import ot
import torch
from scipy.optimize import linear_sum_assignment

from latentflow.errors import LatentflowError
from latentflow.flow.assignment import solve_assignment


@dataclass
class Pairing:
    """Paired batches, aligned row by row.

    Attributes:
        x0: (B, ...) noise, x0[i] paired with x1[i].
        x1: (B, ...) data.
        labels: (B,) labels of x1, or None.
        x0_index: (B,) long, rows of the input x0 used.
        x1_index: (B,) long, rows of the input x1 used.
        cost: mean squared Euclidean distance ||x0_i - x1_i||^2 over the pairs.
    """

    x0: torch.Tensor
    x1: torch.Tensor
    labels: torch.Tensor | None
    x0_index: torch.Tensor
    x1_index: torch.Tensor
    cost: float


def squared_cost(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances (B0, B1) between flattened rows, in float32."""
    a = x0.reshape(x0.shape[0], -1).float()
    b = x1.reshape(x1.shape[0], -1).float()
    return torch.cdist(a, b, compute_mode="use_mm_for_euclid_dist").square()


def _check_batches(x0: torch.Tensor, x1: torch.Tensor, labels: torch.Tensor | None) -> None:
    if x0.shape[1:] != x1.shape[1:]:
        raise LatentflowError(f"noise and data must have the same sample shape, got {tuple(x0.shape)} and "
                              f"{tuple(x1.shape)}")
    if x0.shape[0] != x1.shape[0]:
        raise LatentflowError(f"noise batch {x0.shape[0]} and data batch {x1.shape[0]} must be the same size")
    if labels is not None and labels.shape != (x1.shape[0],):
        raise LatentflowError(f"labels must have shape ({x1.shape[0]},), got {tuple(labels.shape)}")


def mean_squared_distance(x0: torch.Tensor, x1: torch.Tensor) -> float:
    """Mean over rows of ||x0_i - x1_i||^2 (0 for empty batches)."""
    if x0.shape[0] == 0:
        return 0.0
    return float((x0 - x1).reshape(x0.shape[0], -1).float().square().sum(dim=1).mean())


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index], without the copy when index is 0, 1, ..., B-1 (exact OT keeps the data's order)."""
    if index.shape[0] == x.shape[0] and torch.equal(index, torch.arange(x.shape[0], device=index.device)):
        return x
    return x[index]


def _make_pairing(x0, x1, labels, x0_index: torch.Tensor, x1_index: torch.Tensor) -> Pairing:
    x0_paired, x1_paired = _take(x0, x0_index), _take(x1, x1_index)
    return Pairing(
        x0=x0_paired,
        x1=x1_paired,
        labels=None if labels is None else _take(labels, x1_index),
        x0_index=x0_index,
        x1_index=x1_index,
        cost=mean_squared_distance(x0_paired, x1_paired),
    )


EXACT_SOLVERS = ("assignment", "lsa", "emd")
"""Exact OT solvers of `ExactOTCoupling` (see its docstring)."""


class Coupling(ABC):
    """Pairs a noise batch x0 with a data batch x1 (and the data's labels)."""

    def __call__(
        self,
        x0: torch.Tensor,
        x1: torch.Tensor,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Pairing:
        """Pair x0 (B, ...) with x1 (B, ...); labels (B,) belong to x1."""
        _check_batches(x0, x1, labels)
        x0_index, x1_index = self.indices(x0, x1, labels, generator)
        return _make_pairing(x0, x1, labels, x0_index.to(x0.device), x1_index.to(x1.device))

    @abstractmethod
    def indices(self, x0, x1, labels, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (x0_index, x1_index), each (B,) long, describing the pairs."""


class IndependentCoupling(Coupling):
    """Pairs x0[i] with x1[i]: the independent coupling q(x0) q(x1)."""

    def __call__(self, x0, x1, labels=None, generator=None) -> Pairing:
        # the batches are already paired row by row: no gathers on this hot path
        _check_batches(x0, x1, labels)
        index = torch.arange(x1.shape[0], device=x1.device)
        return Pairing(x0=x0, x1=x1, labels=labels, x0_index=index, x1_index=index, cost=mean_squared_distance(x0, x1))

    def indices(self, x0, x1, labels, generator):
        index = torch.arange(x1.shape[0])
        return index, index


def _group_by_label(labels: torch.Tensor | None, batch_size: int) -> list[torch.Tensor]:
    """Data rows grouped by label (one group of all rows when unlabelled)."""
    if labels is None:
        return [torch.arange(batch_size)]
    labels = labels.cpu()
    return [torch.nonzero(labels == value).flatten() for value in torch.unique(labels)]


class _BlockwiseCoupling(Coupling):
    """Solves one OT problem per label group; unlabelled batches form a single group.

    For class-aware pairing the noise rows (i.i.d., so any split is a fair one) are
    split in order into groups the sizes of the label groups.
    """

    def __init__(self, class_aware: bool = False):
        self.class_aware = class_aware

    def indices(self, x0, x1, labels, generator):
        groups = _group_by_label(labels if self.class_aware else None, x1.shape[0])
        x0_parts, x1_parts, start = [], [], 0
        for data_rows in groups:
            noise_rows = torch.arange(start, start + data_rows.numel())
            start += data_rows.numel()
            cost = squared_cost(_take(x0, noise_rows.to(x0.device)), _take(x1, data_rows.to(x1.device)))
            local_noise, local_data = self.solve(cost.cpu().double().numpy(), generator)
            x0_parts.append(noise_rows[local_noise])
            x1_parts.append(data_rows[local_data])
        x0_index, x1_index = torch.cat(x0_parts), torch.cat(x1_parts)
        order = torch.argsort(x1_index, stable=True)  # keep the data's own order where possible
        return x0_index[order], x1_index[order]

    @abstractmethod
    def solve(self, cost: np.ndarray, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs (noise_index, data_index) for a square cost matrix (n, n)."""


class ExactOTCoupling(_BlockwiseCoupling):
    """Minibatch exact optimal transport with squared Euclidean cost.

    For equal uniform batches the optimal plan is a permutation (Birkhoff), so the
    assignment itself is used: every x1 keeps its row and receives exactly one x0;
    no pair is duplicated or dropped.

    Args:
        class_aware: pair only within the same label.
        solver: 'assignment' (scipy's linear_sum_assignment warm-started by approximate
            duals, see latentflow.flow.assignment: the same optimum, the fastest exact solver
            here), 'lsa' (scipy's linear_sum_assignment on the raw cost) or 'emd' (POT's
            network simplex; its plan is read as a permutation).
    """

    SOLVERS = EXACT_SOLVERS

    def __init__(self, class_aware: bool = False, solver: str = "assignment"):
        super().__init__(class_aware)
        if solver not in self.SOLVERS:
            raise LatentflowError(f"unknown exact OT solver {solver!r}; choose one of {list(self.SOLVERS)}")
        self.solver = solver

    def solve(self, cost, generator):
        if self.solver == "emd":
            weights = np.full(cost.shape[0], 1.0 / cost.shape[0])
            plan = ot.emd(weights, weights, cost, numItermax=10_000_000)
            noise_index, data_index = np.arange(cost.shape[0]), plan.argmax(axis=1)
        elif self.solver == "lsa":
            noise_index, data_index = linear_sum_assignment(cost)
        else:
            noise_index, data_index = np.arange(cost.shape[0]), solve_assignment(cost)
        order = np.argsort(data_index)
        return torch.from_numpy(noise_index[order]).long(), torch.from_numpy(data_index[order]).long()


class SinkhornOTCoupling(_BlockwiseCoupling):
    """Entropic OT (POT Sinkhorn); B pairs are drawn from the plan.

    Args:
        reg: entropic regularisation, relative to the largest entry of the cost matrix.
        class_aware: pair only within the same label.
    """

    def __init__(self, reg: float = 0.05, class_aware: bool = False):
        super().__init__(class_aware)
        if not (math.isfinite(reg) and reg > 0):
            raise LatentflowError(f"sinkhorn reg must be > 0 and finite, got {reg}")
        self.reg = float(reg)

    def plan(self, cost: np.ndarray) -> np.ndarray:
        """The entropic plan (n, n) for a cost matrix, falling back to log-domain when unstable."""
        n = cost.shape[0]
        weights = np.full(n, 1.0 / n)
        scaled = cost / max(float(cost.max()), 1e-12)
        plan = ot.sinkhorn(weights, weights, scaled, self.reg, numItermax=2000)
        if not np.isfinite(plan).all() or plan.sum() < 0.5:
            plan = ot.sinkhorn(weights, weights, scaled, self.reg, method="sinkhorn_log", numItermax=2000)
        return plan

    def solve(self, cost, generator):
        n = cost.shape[0]
        probabilities = torch.from_numpy(self.plan(cost)).flatten().clamp_min(0)
        if not torch.isfinite(probabilities).all() or probabilities.sum() <= 0:
            raise LatentflowError(f"sinkhorn plan is degenerate with reg={self.reg}; use a larger reg")
        flat = torch.multinomial(probabilities, n, replacement=True, generator=generator)
        return flat // n, flat % n


COUPLINGS = {
    "independent": IndependentCoupling,
    "exact": ExactOTCoupling,
    "sinkhorn": SinkhornOTCoupling,
}


def make_coupling(name: str, **kwargs) -> Coupling:
    """Build a coupling by name: 'independent', 'exact' or 'sinkhorn'."""
    if name not in COUPLINGS:
        raise LatentflowError(f"unknown coupling {name!r}; choose one of {sorted(COUPLINGS)}")
    return COUPLINGS[name](**kwargs)
