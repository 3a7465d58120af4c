"""Distances between sample sets and the straightness of generated paths."""

from __future__ import annotations

import numpy as np
import ot
import torch

from latentflow.errors import LatentflowError
from latentflow.flow.solvers import Field


def _as_points(samples: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    points = np.asarray(samples.detach().cpu() if isinstance(samples, torch.Tensor) else samples, dtype=np.float64)
    points = points.reshape(points.shape[0], -1)
    if points.shape[0] == 0 or not np.isfinite(points).all():
        raise LatentflowError(f"{name} must be a non-empty set of finite points, got shape {points.shape}")
    return points


def wasserstein2(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Exact 2-Wasserstein distance between two empirical distributions (POT emd).

    Args:
        a: (N, ...) samples; flattened per sample.
        b: (M, ...) samples with the same per-sample size.
    """
    a_points, b_points = _as_points(a, "a"), _as_points(b, "b")
    if a_points.shape[1] != b_points.shape[1]:
        raise LatentflowError(f"sample sizes differ: {a_points.shape[1]} vs {b_points.shape[1]}")
    cost = ot.dist(a_points, b_points, metric="sqeuclidean")
    weights_a = np.full(a_points.shape[0], 1.0 / a_points.shape[0])
    weights_b = np.full(b_points.shape[0], 1.0 / b_points.shape[0])
    return float(np.sqrt(max(ot.emd2(weights_a, weights_b, cost, numItermax=10_000_000), 0.0)))


def sliced_wasserstein2(
    a: torch.Tensor,
    b: torch.Tensor,
    num_projections: int = 256,
    generator: torch.Generator | None = None,
    quantiles: int = 512,
) -> float:
    """Sliced 2-Wasserstein distance for high-dimensional samples.

    Projects both sets on random unit directions, compares the 1D quantile functions
    on a common grid, and returns sqrt(mean over directions of W2^2).

    Args:
        a: (N, ...) samples; b: (M, ...) samples of the same per-sample size.
    """
    a_flat, b_flat = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    if a_flat.shape[1] != b_flat.shape[1]:
        raise LatentflowError(f"sample sizes differ: {a_flat.shape[1]} vs {b_flat.shape[1]}")
    directions = torch.randn(a_flat.shape[1], num_projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    levels = (torch.arange(quantiles, dtype=torch.float64) + 0.5) / quantiles
    a_quantiles = torch.quantile(a_flat.cpu() @ directions, levels, dim=0)
    b_quantiles = torch.quantile(b_flat.cpu() @ directions, levels, dim=0)
    return float((a_quantiles - b_quantiles).square().mean().sqrt())


def path_straightness(velocity: Field, trajectory: torch.Tensor, times: torch.Tensor) -> float:
    """Straightness of generated paths (rectified-flow paper): mean over t of E||v(x_t, t) - (x_1 - x_0)||^2.

    Zero for perfectly straight paths travelled at constant speed.

    Args:
        velocity: field(x (B, ...), t (B,)).
        trajectory: (S, B, ...) states along each path, from t=0 to t=1.
        times: (S,) the times of those states.
    """
    displacement = trajectory[-1] - trajectory[0]
    deviations = []
    with torch.no_grad():
        for state, t in zip(trajectory[:-1], times[:-1]):
            v = velocity(state, t.expand(state.shape[0]).to(state.dtype))
            deviations.append((v - displacement).flatten(1).square().sum(dim=1).mean())
    return float(torch.stack(deviations).mean())
