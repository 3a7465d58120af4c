"""Training objectives: flow matching (path + coupling + time sampler) and DDPM.

Every objective splits into a model-free `prepare` (draw noise, pair it with the
data, draw times, build x_t and the target), which can run in DataLoader workers,
and `loss`, the per-sample MSE between the model's output and the target.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from latentflow.couplings import Coupling, IndependentCoupling, Pairing, make_coupling
from latentflow.errors import LatentflowError
from latentflow.paths import CFMPath, ProbabilityPath, RectifiedFlowPath, expand_time
from latentflow.time_samplers import make_time_sampler


@dataclass
class TrainingBatch:
    """One prepared training batch.

    Attributes:
        x_t: (B, ...) model input.
        t: (B,) times in [0, 1], t=0 noise, t=1 data.
        target: (B, ...) regression target (velocity x1 - x0, or the noise for ddpm).
        labels: (B,) class labels or None.
        x0: (B, ...) the noise used (None once dropped, e.g. before leaving a loader worker).
        x1: (B, ...) the data used (likewise).
        ot_cost: mean squared distance of the (x0, x1) pairs, or None.
    """

    x_t: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    labels: torch.Tensor | None
    x0: torch.Tensor | None
    x1: torch.Tensor | None
    ot_cost: float | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "TrainingBatch":
        """A copy with every tensor moved to `device` (`non_blocking` overlaps copies from pinned memory)."""
        return self._map(lambda tensor: tensor.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "TrainingBatch":
        """A copy in page-locked memory; the DataLoader calls this when made with ``pin_memory=True``."""
        return self._map(lambda tensor: tensor.pin_memory())

    def _map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> "TrainingBatch":
        mapped = {}
        for field in fields(self):
            value = getattr(self, field.name)
            mapped[field.name] = function(value) if isinstance(value, torch.Tensor) else value
        return TrainingBatch(**mapped)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample: (B, ...) x (B, ...) -> (B,)."""
    if prediction.shape != target.shape:
        raise LatentflowError(f"model output shape {tuple(prediction.shape)} != target shape {tuple(target.shape)}")
    return (prediction.float() - target.float()).square().flatten(1).mean(dim=1)


def draw_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x0 ~ N(0, I) with the shape, dtype and device of `like`."""
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)


class Objective(ABC):
    """A training objective; `prediction` says what the model outputs."""

    prediction: str = "velocity"

    @abstractmethod
    def prepare(
        self,
        x1: torch.Tensor,
        labels: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> TrainingBatch:
        """Build a training batch from data x1 (B, ...), model-free."""

    def loss(self, model_output: torch.Tensor, batch: TrainingBatch) -> torch.Tensor:
        """Per-sample loss (B,)."""
        return per_sample_mse(model_output, batch.target)


class FlowMatchingObjective(Objective):
    """Flow matching: regress v(x_t, t) onto u_t = x1 - x0 along a path.

    Args:
        path: the conditional probability path (rectified flow or CFM).
        coupling: how noise is paired with data (independent or minibatch OT).
        time_sampler: callable (batch_size, device, generator) -> (B,) times.
    """

    prediction = "velocity"

    def __init__(self, path: ProbabilityPath, coupling: Coupling, time_sampler):
        self.path, self.coupling, self.time_sampler = path, coupling, time_sampler

    def prepare(self, x1, labels=None, generator=None, noise=None) -> TrainingBatch:
        noise = draw_noise(x1, generator) if noise is None else noise
        return self.prepare_paired(self.coupling(noise, x1, labels, generator), generator)

    def prepare_paired(self, pairing: Pairing, generator: torch.Generator | None = None) -> TrainingBatch:
        """Build the batch from already paired noise and data (e.g. a global OT plan)."""
        t = self.time_sampler(pairing.x1.shape[0], pairing.x1.device, generator)
        point = self.path.sample(pairing.x0, pairing.x1, t, generator)
        ot_cost = None if isinstance(self.coupling, IndependentCoupling) else pairing.cost
        return TrainingBatch(point.x_t, t, point.u_t, pairing.labels, pairing.x0, pairing.x1, ot_cost)


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


class DDPMObjective(Objective):
    """DDPM noise prediction: k ~ U{1..T}, x_k = sqrt(a_k) x1 + sqrt(1 - a_k) x0, MSE to x0 (the noise).

    The model receives our continuous time t = 1 - k/T.
    """

    prediction = "noise"

    def __init__(self, schedule: DDPMSchedule | None = None):
        self.schedule = schedule or DDPMSchedule()
        self._alphas_cumprod = self.schedule.alphas_cumprod().float()

    def prepare(self, x1, labels=None, generator=None, noise=None) -> TrainingBatch:
        noise = draw_noise(x1, generator) if noise is None else noise
        steps = torch.randint(1, self.schedule.num_train_timesteps + 1, (x1.shape[0],), generator=generator)
        alpha_bar = expand_time(self._alphas_cumprod[steps].to(x1.device), x1)
        x_t = alpha_bar.sqrt() * x1 + (1 - alpha_bar).sqrt() * noise
        t = self.schedule.timestep_to_time(steps).to(x1.device)
        return TrainingBatch(x_t, t, noise, labels, noise, x1, None)


OBJECTIVES = ("rf", "cfm", "otcfm", "otcfm-sinkhorn", "ddpm")


def make_objective(
    name: str,
    sigma: float | None = None,
    reg: float = 0.05,
    class_aware: bool = False,
    time_sampler: str = "uniform",
    ot_solver: str = "assignment",
    **time_sampler_kwargs,
) -> Objective:
    """Build an objective by name.

    Args:
        name: 'rf' (straight path, independent pairs), 'cfm' (sigma path, independent pairs),
            'otcfm' (exact minibatch OT pairs), 'otcfm-sinkhorn' (entropic OT pairs), 'ddpm'.
        sigma: path noise; default 0 for rf, 0.01 otherwise (the lecture's value).
        reg: Sinkhorn regularisation, relative to the largest cost.
        class_aware: OT pairs only within the same label.
        time_sampler: 'uniform' or 'logit_normal' (kwargs mean, std).
        ot_solver: exact OT solver: 'assignment' (warm-started, the default), 'lsa' (plain scipy) or 'emd' (POT).
    """
    if name not in OBJECTIVES:
        raise LatentflowError(f"unknown objective {name!r}; choose one of {list(OBJECTIVES)}")
    if name == "ddpm":
        return DDPMObjective()
    times = make_time_sampler(time_sampler, **time_sampler_kwargs)
    if name == "rf":
        if sigma not in (None, 0, 0.0):
            raise LatentflowError(f"objective 'rf' has sigma 0; got sigma={sigma} (use 'cfm' for sigma > 0)")
        return FlowMatchingObjective(RectifiedFlowPath(), make_coupling("independent"), times)
    path = CFMPath(0.01 if sigma is None else sigma)
    if name == "cfm":
        coupling = make_coupling("independent")
    elif name == "otcfm":
        coupling = make_coupling("exact", class_aware=class_aware, solver=ot_solver)
    else:
        coupling = make_coupling("sinkhorn", reg=reg, class_aware=class_aware)
    return FlowMatchingObjective(path, coupling, times)
