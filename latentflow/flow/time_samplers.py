"""Distributions over training times t in [0, 1]."""

from __future__ import annotations

from typing import Callable

import torch

from latentflow.errors import LatentflowError


class UniformTime:
    """t ~ U(0, 1)."""

    def __call__(self, batch_size: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return (batch_size,) float32 times."""
        return torch.rand(batch_size, generator=generator, device=device)


class LogitNormalTime:
    """t = sigmoid(m + s * n), n ~ N(0, 1): concentrates training on middle times (SD3)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        if std <= 0:
            raise LatentflowError(f"logit-normal std must be > 0, got {std}")
        self.mean, self.std = float(mean), float(std)

    def __call__(self, batch_size: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return (batch_size,) float32 times in (0, 1)."""
        normal = torch.randn(batch_size, generator=generator, device=device)
        return torch.sigmoid(self.mean + self.std * normal)


TIME_SAMPLERS: dict[str, Callable[..., object]] = {
    "uniform": UniformTime,
    "logit_normal": LogitNormalTime,
}


def make_time_sampler(name: str, **kwargs) -> UniformTime | LogitNormalTime:
    """Build a time sampler by name ('uniform' or 'logit_normal')."""
    if name not in TIME_SAMPLERS:
        raise LatentflowError(f"unknown time sampler {name!r}; choose one of {sorted(TIME_SAMPLERS)}")
    return TIME_SAMPLERS[name](**kwargs)
