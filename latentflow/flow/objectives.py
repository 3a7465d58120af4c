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

from latentflow.errors import LatentflowError
from latentflow.flow.couplings import Coupling, IndependentCoupling, Pairing, make_coupling
from latentflow.flow.paths import CFMPath, ProbabilityPath, RectifiedFlowPath, expand_time
from latentflow.flow.schedules import DDPMSchedule
from latentflow.flow.time_samplers import make_time_sampler


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


def _rectified_flow(sigma, reg, class_aware, ot_solver, times) -> Objective:
    if sigma not in (None, 0, 0.0):
        raise LatentflowError(f"objective 'rf' has sigma 0; got sigma={sigma} (use 'cfm' for sigma > 0)")
    return FlowMatchingObjective(RectifiedFlowPath(), make_coupling("independent"), times)


def _cfm(sigma, reg, class_aware, ot_solver, times) -> Objective:
    return FlowMatchingObjective(CFMPath(0.01 if sigma is None else sigma), make_coupling("independent"), times)


def _otcfm(sigma, reg, class_aware, ot_solver, times) -> Objective:
    coupling = make_coupling("exact", class_aware=class_aware, solver=ot_solver)
    return FlowMatchingObjective(CFMPath(0.01 if sigma is None else sigma), coupling, times)


def _otcfm_sinkhorn(sigma, reg, class_aware, ot_solver, times) -> Objective:
    coupling = make_coupling("sinkhorn", reg=reg, class_aware=class_aware)
    return FlowMatchingObjective(CFMPath(0.01 if sigma is None else sigma), coupling, times)


def _ddpm(sigma, reg, class_aware, ot_solver, times) -> Objective:
    return DDPMObjective()


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "rf": _rectified_flow,
    "cfm": _cfm,
    "otcfm": _otcfm,
    "otcfm-sinkhorn": _otcfm_sinkhorn,
    "ddpm": _ddpm,
}
"""The objective registry: name -> builder(sigma, reg, class_aware, ot_solver, time_sampler)."""

OT_OBJECTIVES = ("otcfm", "otcfm-sinkhorn")
"""The objectives whose coupling is an OT plan (they may pair across processes: ot_scope 'global')."""


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
    times = make_time_sampler(time_sampler, **time_sampler_kwargs)
    return OBJECTIVES[name](sigma, reg, class_aware, ot_solver, times)
