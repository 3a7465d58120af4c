"""2D point distributions for the lab, sampled through an explicit torch.Generator.

`8gaussians` and `moons` follow torchcfm's definitions: eight Gaussians of
covariance sqrt(0.1) I on a circle of radius 5, and two half circles shifted
diagonally by U(0, 0.2), scaled by 3 and moved by -1.

Every built-in mixture draws its components in equal numbers (stratified: n // k each, the remainder to random
components, in random order) rather than one independent draw per point. The distribution is the same; what
changes is the spread of a finite sample: with independent draws, the component counts of 2,000 points are off by
a few percent, and moving that mass between components costs a W2 of 0.1 to 0.3 (moons, checkerboard), more than
the differences between objectives that the lab measures.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from latentflow.errors import LatentflowError

Sampler = Callable[[int, torch.Generator], torch.Tensor]


def balanced_components(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) component indices in 0..k-1, each n // k or n // k + 1 times, in random order."""
    extra = torch.randperm(k, generator=generator)[: n % k]
    which = torch.cat([torch.arange(k).repeat(n // k), extra])
    return which[torch.randperm(n, generator=generator)]


def gaussian(n: int, generator: torch.Generator) -> torch.Tensor:
    """Standard normal points (n, 2)."""
    return torch.randn(n, 2, generator=generator)


def eight_gaussians(n: int, generator: torch.Generator) -> torch.Tensor:
    """Eight Gaussians (std 0.1 ** 0.25) centred on a circle of radius 5, (n, 2)."""
    angles = torch.arange(8) * (math.pi / 4)
    centers = 5.0 * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    which = balanced_components(n, 8, generator)
    return centers[which] + 0.1**0.25 * torch.randn(n, 2, generator=generator)


def moons(n: int, generator: torch.Generator) -> torch.Tensor:
    """Two interleaved half circles, shifted diagonally by U(0, 0.2), scaled by 3, minus 1, (n, 2)."""
    angle = torch.rand(n, generator=generator) * math.pi
    inner = balanced_components(n, 2, generator) == 1
    x = torch.where(inner, 1 - torch.cos(angle), torch.cos(angle))
    y = torch.where(inner, 0.5 - torch.sin(angle), torch.sin(angle))
    points = torch.stack([x, y], dim=1) + 0.2 * torch.rand(n, 1, generator=generator)
    return points * 3 - 1


def circles(n: int, generator: torch.Generator) -> torch.Tensor:
    """Two concentric circles of radius 4 and 2 with Gaussian jitter 0.1, (n, 2)."""
    angle = torch.rand(n, generator=generator) * 2 * math.pi
    radius = torch.where(balanced_components(n, 2, generator) == 1, 4.0, 2.0)
    points = radius.unsqueeze(1) * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return points + 0.1 * torch.randn(n, 2, generator=generator)


def checkerboard(n: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform on the dark squares of a 4x4 checkerboard spanning [-4, 4]^2, (n, 2)."""
    square = balanced_components(n, 8, generator)  # 4 columns x 2 dark squares each
    column = square % 4
    row = (square // 4) * 2 + (column % 2)
    x = column * 2 - 4 + torch.rand(n, generator=generator) * 2
    y = row * 2 - 4 + torch.rand(n, generator=generator) * 2
    return torch.stack([x, y], dim=1)


def spirals(n: int, generator: torch.Generator) -> torch.Tensor:
    """Two interleaved spiral arms reaching radius ~4, with jitter 0.1, (n, 2)."""
    progress = torch.sqrt(torch.rand(n, generator=generator))
    angle = progress * 3 * math.pi
    arm = torch.where(balanced_components(n, 2, generator) == 1, math.pi, 0.0)
    radius = 4 * progress
    points = radius.unsqueeze(1) * torch.stack([torch.cos(angle + arm), torch.sin(angle + arm)], dim=1)
    return points + 0.1 * torch.randn(n, 2, generator=generator)


DISTRIBUTIONS: dict[str, Sampler] = {
    "gaussian": gaussian,
    "8gaussians": eight_gaussians,
    "moons": moons,
    "circles": circles,
    "checkerboard": checkerboard,
    "spirals": spirals,
}


class PointCloud:
    """Samples uniformly (with replacement) from the rows of a fixed (N, 2) array."""

    def __init__(self, points: np.ndarray, source: str):
        self.points, self.source = torch.from_numpy(points).float(), source

    def __call__(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return self.points[torch.randint(0, self.points.shape[0], (n,), generator=generator)]


def load_point_file(path: Path) -> PointCloud:
    """Load and validate a `.npy` file of shape (N, 2) with finite values."""
    if not path.is_file():
        raise LatentflowError(f"{path}: no such file; give a built-in name ({', '.join(DISTRIBUTIONS)}) or an "
                              f"existing .npy")
    try:
        points = np.load(path, allow_pickle=False)
    except ValueError as error:
        raise LatentflowError(f"{path}: not a readable .npy array ({error})") from None
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] < 1:
        raise LatentflowError(f"{path}: expected an array of shape (N, 2), got {points.shape}")
    if not np.issubdtype(points.dtype, np.number) or not np.isfinite(points).all():
        raise LatentflowError(f"{path}: every value must be a finite number (found NaN, inf or non-numbers)")
    return PointCloud(points.astype(np.float32), str(path))


def get_distribution(spec: str) -> Sampler:
    """A sampler (n, generator) -> (n, 2) for a built-in name or a `.npy` path."""
    if spec in DISTRIBUTIONS:
        return DISTRIBUTIONS[spec]
    if spec.endswith(".npy"):
        return load_point_file(Path(spec))
    raise LatentflowError(f"unknown distribution {spec!r}; choose one of {list(DISTRIBUTIONS)} or a .npy file "
                          f"of shape (N, 2)")
