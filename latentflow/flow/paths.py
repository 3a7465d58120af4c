"""Probability paths between noise (t=0) and data (t=1).

Convention, used everywhere in latentflow: x0 ~ N(0, I) is noise at t=0, x1 is data
at t=1, and the conditional velocity target is u_t = x1 - x0.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from latentflow.errors import LatentflowError


def expand_time(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample times (B,) to broadcast against `like` (B, ...)."""
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise LatentflowError(f"t must have shape ({like.shape[0]},), got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


@dataclass
class PathSample:
    """A point on a conditional path and its target velocity.

    Attributes:
        x_t: (B, ...) the sample at time t.
        u_t: (B, ...) the conditional velocity d x_t / dt = x1 - x0.
    """

    x_t: torch.Tensor
    u_t: torch.Tensor


class ProbabilityPath(ABC):
    """A conditional path x_t between a noise sample x0 and a data sample x1."""

    @abstractmethod
    def sample(
        self,
        x0: torch.Tensor,
        x1: torch.Tensor,
        t: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> PathSample:
        """Sample x_t and u_t for pairs (x0, x1) (B, ...) at times t (B,)."""


class CFMPath(ProbabilityPath):
    """Conditional flow matching: x_t ~ N(t * x1 + (1 - t) * x0, sigma^2 I), u_t = x1 - x0.

    With sigma = 0 this is rectified flow.
    """

    def __init__(self, sigma: float = 0.01):
        if not (math.isfinite(sigma) and sigma >= 0):
            raise LatentflowError(f"path sigma must be >= 0 and finite, got {sigma}")
        self.sigma = float(sigma)

    def mean(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The path's mean t * x1 + (1 - t) * x0, shape (B, ...)."""
        t = expand_time(t, x1)
        return t * x1 + (1 - t) * x0

    def sample(self, x0, x1, t, generator=None) -> PathSample:
        x_t = self.mean(x0, x1, t)
        if self.sigma > 0:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
            x_t = x_t + self.sigma * noise
        return PathSample(x_t=x_t, u_t=x1 - x0)


class RectifiedFlowPath(CFMPath):
    """Rectified flow: the straight line x_t = t * x1 + (1 - t) * x0 (CFM with sigma = 0)."""

    def __init__(self):
        super().__init__(sigma=0.0)
