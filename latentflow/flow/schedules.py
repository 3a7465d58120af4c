"""Time schedules in our convention (t=0 noise, t=1 data): the DDPM noise schedule and the one conversion between
DDPM timesteps and our time, and the shift of a sampling grid towards the noise (SD3's, converted once here)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from latentflow.errors import LatentflowError


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Warp sampling times towards the noise: t' = t / (shift - (shift - 1) t); t = 0 and t = 1 stay.

    SD3's timestep shift (Esser et al. 2024, Sec. 5.3.2: sigma' = shift sigma / (1 + (shift - 1) sigma), sigma the
    noise level, sigma = 1 at the noise) written in our time t = 1 - sigma. shift > 1 spends more of a fixed step
    budget near the noise (shift 2 moves the middle of the grid from 0.5 to 1/3); shift 1 is the identity.
    """
    check_time_shift(shift)
    if shift == 1.0:
        return t
    return t / (shift - (shift - 1.0) * t)


def check_time_shift(shift: float) -> None:
    """Raise LatentflowError unless `shift` is a finite number > 0."""
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise LatentflowError(f"time shift must be a finite number > 0 (1: evenly spaced steps), got {shift!r}")


@dataclass(frozen=True)
class DDPMSchedule:
    """The DDPM noise schedule: linear betas from beta_start to beta_end over T steps.

    Timestep k in 1..T (k = T is nearly pure noise) has
    alpha_bar_k = prod_{s=1..k} (1 - beta_s), and x_k = sqrt(alpha_bar_k) x1 + sqrt(1 - alpha_bar_k) x0.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def betas(self) -> torch.Tensor:
        """(T,) float64 betas; entry k-1 belongs to timestep k."""
        return torch.linspace(self.beta_start, self.beta_end, self.num_train_timesteps, dtype=torch.float64)

    def alphas_cumprod(self) -> torch.Tensor:
        """(T + 1,) float64 alpha_bar; entry k belongs to timestep k, entry 0 is 1 (clean data)."""
        return torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - self.betas(), dim=0)])

    def timestep_to_time(self, k: torch.Tensor) -> torch.Tensor:
        """DDPM timestep k (0..T, T = noise) -> our time t = 1 - k/T (t = 0 noise)."""
        return 1.0 - k.to(torch.float32) / self.num_train_timesteps

    def time_to_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """Our time t in [0, 1] -> the nearest DDPM timestep k = round((1 - t) T), long."""
        return torch.round((1.0 - t.double()) * self.num_train_timesteps).long()
