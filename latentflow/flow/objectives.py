"""Training objectives: flow matching (path + coupling + time sampler) and DDPM.

Every objective splits into a model-free `prepare` (draw noise, pair it with the
data, draw times, build x_t and the target), which can run in DataLoader workers,
and `training_loss`, the per-sample loss given the models: for most objectives the MSE
between the model's output and the target; for a flow map (meanflow) the regression onto
the MeanFlow identity, whose target needs the model's own JVP (and a teacher, if used).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from latentflow.errors import LatentflowError
from latentflow.flow.couplings import Coupling, IndependentCoupling, Pairing, make_coupling
from latentflow.flow.flow_maps import (
    PAPER_DISTINCT_SHARE,
    PAPER_TIME_MEAN,
    PAPER_TIME_STD,
    AverageVelocity,
    FlowMapTimes,
    adaptive_weight,
    mean_flow_regression_target,
)
from latentflow.flow.guidance import guided_field
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
        r: (B,) the end times of a flow-map objective (t <= r), or None.
    """

    x_t: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    labels: torch.Tensor | None
    x0: torch.Tensor | None
    x1: torch.Tensor | None
    ot_cost: float | None = None
    r: torch.Tensor | None = None

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


@dataclass
class TrainingModels:
    """The models an objective's loss may call; all take (x (B, ...), t (B,), r (B,) or None, labels or None).

    Attributes:
        student: the model being trained (gradients flow through it).
        tangent: the same weights callable under `torch.func.jvp` (no DDP wrapper), for flow maps.
        teacher: a frozen velocity field whose (guided) velocity a flow map learns from, or None.
        null_class: the class id of "no class" (classifier-free guidance), or None when unconditional.
    """

    student: AverageVelocity
    tangent: AverageVelocity | None = None
    teacher: AverageVelocity | None = None
    null_class: int | None = None


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

    def training_loss(self, models: TrainingModels, batch: TrainingBatch) -> torch.Tensor:
        """Per-sample loss (B,) of the student on a prepared batch."""
        return self.loss(models.student(batch.x_t, batch.t, None, batch.labels), batch)

    def loss_and_error(self, models: TrainingModels, batch: TrainingBatch
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(per-sample loss (B,) to minimise, per-sample squared error (B,) where the loss weights it, else None):
        a weighted loss says little of the error's size, which the training log shows beside it."""
        return self.training_loss(models, batch), None


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


class MeanFlowObjective(FlowMatchingObjective):
    """A flow map learnt with the MeanFlow identity (Geng et al. 2025, Eq. 6 and 9, in our convention; see
    `latentflow.flow.flow_maps`): the model u(x_t, t, r) regresses onto sg(v + (r - t) du/dt).

    Args:
        coupling: how noise is paired with data (the path is the straight one of rectified flow).
        times: the (t, r) sampler.
        velocity: "data" (v = x1 - x0, the paper) or "teacher" (v = a frozen teacher's velocity field, e.g. the
            run the flow map is fine-tuned from: a lower-variance target).
        guidance: the guidance scale w the learnt velocity carries (1: none). With "data", MeanFlow's Eq. 13:
            v = w (x1 - x0) + (1 - w) u(x_t, t, t | null) for labelled samples; with "teacher", the teacher's
            classifier-free guided field. Sample the result with guidance_scale 1.
        weight_power: p of the adaptive loss weight 1 / (error + 1e-3)^p (Sec. 4.3; 0: plain MSE).
    """

    prediction = "average_velocity"

    def __init__(self, coupling: Coupling, times: FlowMapTimes, velocity: str = "data", guidance: float = 1.0,
                 weight_power: float = 1.0):
        if velocity not in FLOW_MAP_VELOCITIES:
            raise LatentflowError(f"meanflow velocity {velocity!r} unknown; choose one of {FLOW_MAP_VELOCITIES}")
        if guidance < 0 or weight_power < 0:
            raise LatentflowError(f"meanflow guidance ({guidance}) and weight_power ({weight_power}) must be >= 0")
        super().__init__(RectifiedFlowPath(), coupling, times)
        self.velocity, self.guidance, self.weight_power = velocity, float(guidance), float(weight_power)

    def prepare_paired(self, pairing: Pairing, generator: torch.Generator | None = None) -> TrainingBatch:
        times = self.time_sampler(pairing.x1.shape[0], pairing.x1.device, generator)
        point = self.path.sample(pairing.x0, pairing.x1, times.t, generator)
        ot_cost = None if isinstance(self.coupling, IndependentCoupling) else pairing.cost
        return TrainingBatch(point.x_t, times.t, point.u_t, pairing.labels, pairing.x0, pairing.x1, ot_cost,
                             r=times.r)

    def instantaneous_velocity(self, models: TrainingModels, batch: TrainingBatch) -> torch.Tensor:
        """v at (x_t, t) that the flow map's diagonal learns: (B, ...), detached."""
        labels, scale = batch.labels, self.guidance
        if scale != 1 and labels is None:
            raise LatentflowError(f"meanflow guidance {scale} needs a class-conditional model and cache; use 1.0")
        if self.velocity == "teacher":
            if models.teacher is None:
                raise LatentflowError("meanflow velocity 'teacher' needs a teacher: train with --init RUN_DIR")
            teacher = models.teacher
            field = guided_field(lambda x, t, c: teacher(x, t, None, c), labels, models.null_class, scale)
            with torch.no_grad():
                return field(batch.x_t, batch.t).detach()
        if scale == 1:
            return batch.target
        student = models.tangent or models.student
        null = torch.full_like(labels, models.null_class)
        with torch.no_grad():
            unconditional = student(batch.x_t, batch.t, batch.t, null)
        guided = scale * batch.target + (1 - scale) * unconditional.to(batch.target.dtype)
        labelled = (labels != models.null_class).reshape(-1, *([1] * (guided.ndim - 1)))  # (B, 1, ...)
        return torch.where(labelled, guided, batch.target)

    def training_loss(self, models: TrainingModels, batch: TrainingBatch) -> torch.Tensor:
        return self.loss_and_error(models, batch)[0]

    def loss_and_error(self, models: TrainingModels, batch: TrainingBatch
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The adaptively weighted loss (B,) and, when weighted (p > 0), the squared error (B,) it weights: the
        weighted loss stays near 1 whatever the error (p = 1), so only the error shows a target running away."""
        if batch.r is None:
            raise LatentflowError("a meanflow batch needs end times r; prepare it with MeanFlowObjective.prepare")
        v = self.instantaneous_velocity(models, batch)
        target = mean_flow_regression_target(models.tangent or models.student, batch.x_t, batch.t, batch.r, v,
                                             batch.labels)
        error = per_sample_mse(models.student(batch.x_t, batch.t, batch.r, batch.labels), target)
        return error * adaptive_weight(error, self.weight_power), (error.detach() if self.weight_power else None)


FLOW_MAP_VELOCITIES = ("data", "teacher")
FLOW_MAP_PAIRINGS = ("independent", "ot")
"""How meanflow pairs noise with data: independent draws (the paper) or exact minibatch OT (as otcfm)."""


@dataclass
class ObjectiveSettings:
    """Everything the registry's builders read (see `make_objective`)."""

    sigma: float | None = None
    reg: float = 0.05
    class_aware: bool = False
    ot_solver: str = "assignment"
    flow_map_share: float = PAPER_DISTINCT_SHARE
    flow_map_velocity: str = "data"
    flow_map_guidance: float = 1.0
    flow_map_weight_power: float = 1.0
    flow_map_pairing: str = "independent"


def _path_sigma(settings: ObjectiveSettings) -> float:
    return 0.01 if settings.sigma is None else settings.sigma


def _rectified_flow(settings: ObjectiveSettings, times) -> Objective:
    if settings.sigma not in (None, 0, 0.0):
        raise LatentflowError(f"objective 'rf' has sigma 0; got sigma={settings.sigma} (use 'cfm' for sigma > 0)")
    return FlowMatchingObjective(RectifiedFlowPath(), make_coupling("independent"), times)


def _cfm(settings: ObjectiveSettings, times) -> Objective:
    return FlowMatchingObjective(CFMPath(_path_sigma(settings)), make_coupling("independent"), times)


def _otcfm(settings: ObjectiveSettings, times) -> Objective:
    coupling = make_coupling("exact", class_aware=settings.class_aware, solver=settings.ot_solver)
    return FlowMatchingObjective(CFMPath(_path_sigma(settings)), coupling, times)


def _otcfm_sinkhorn(settings: ObjectiveSettings, times) -> Objective:
    coupling = make_coupling("sinkhorn", reg=settings.reg, class_aware=settings.class_aware)
    return FlowMatchingObjective(CFMPath(_path_sigma(settings)), coupling, times)


def _ddpm(settings: ObjectiveSettings, times) -> Objective:
    return DDPMObjective()


def _meanflow(settings: ObjectiveSettings, times) -> Objective:
    if settings.sigma not in (None, 0, 0.0):
        raise LatentflowError(f"objective 'meanflow' uses the straight path (sigma 0); got sigma={settings.sigma}")
    if settings.flow_map_pairing not in FLOW_MAP_PAIRINGS:
        raise LatentflowError(f"meanflow pairing {settings.flow_map_pairing!r} unknown; choose one of "
                              f"{FLOW_MAP_PAIRINGS}")
    coupling = (make_coupling("exact", class_aware=settings.class_aware, solver=settings.ot_solver)
                if settings.flow_map_pairing == "ot" else make_coupling("independent"))
    return MeanFlowObjective(coupling, FlowMapTimes(times, settings.flow_map_share), settings.flow_map_velocity,
                             settings.flow_map_guidance, settings.flow_map_weight_power)


OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "rf": _rectified_flow,
    "cfm": _cfm,
    "otcfm": _otcfm,
    "otcfm-sinkhorn": _otcfm_sinkhorn,
    "ddpm": _ddpm,
    "meanflow": _meanflow,
}
"""The objective registry: name -> builder(ObjectiveSettings, time_sampler)."""

OT_OBJECTIVES = ("otcfm", "otcfm-sinkhorn")
"""The objectives whose coupling is an OT plan (they may pair across processes: ot_scope 'global')."""

FLOW_MAP_OBJECTIVES = ("meanflow",)
"""The objectives whose model is a flow map u(x_t, t, r) (its second time input switched on)."""


def pairs_by_ot(name: str, flow_map_pairing: str = "independent") -> bool:
    """Whether objective `name` pairs each batch by an OT plan: the OT objectives, and a flow map with pairing 'ot'
    (so it may pair across processes, and it would re-pair stored couplings)."""
    return name in OT_OBJECTIVES or (name in FLOW_MAP_OBJECTIVES and flow_map_pairing == "ot")


DEFAULT_TIME_SAMPLERS = {"meanflow": ("logit_normal", {"mean": -PAPER_TIME_MEAN, "std": PAPER_TIME_STD})}
"""Objectives whose default time sampler is not uniform: meanflow's is the paper's logit-normal(-0.4, 1), which
is logit-normal(0.4, 1) in our convention (see `latentflow.flow.flow_maps.from_meanflow_convention`)."""


def default_time_sampler(objective: str) -> tuple[str, dict[str, float]]:
    """(name, settings) of the time sampler `objective` uses when the config names none."""
    return DEFAULT_TIME_SAMPLERS.get(objective, ("uniform", {}))


def make_objective(
    name: str,
    sigma: float | None = None,
    reg: float = 0.05,
    class_aware: bool = False,
    time_sampler: str | None = None,
    ot_solver: str = "assignment",
    flow_map_share: float = PAPER_DISTINCT_SHARE,
    flow_map_velocity: str = "data",
    flow_map_guidance: float = 1.0,
    flow_map_weight_power: float = 1.0,
    flow_map_pairing: str = "independent",
    **time_sampler_kwargs,
) -> Objective:
    """Build an objective by name.

    Args:
        name: 'rf' (straight path, independent pairs), 'cfm' (sigma path, independent pairs),
            'otcfm' (exact minibatch OT pairs), 'otcfm-sinkhorn' (entropic OT pairs), 'ddpm',
            'meanflow' (a flow map on the straight path, MeanFlow).
        sigma: path noise; default 0 for rf, 0.01 otherwise (the lecture's value).
        reg: Sinkhorn regularisation, relative to the largest cost.
        class_aware: OT pairs only within the same label.
        time_sampler: 'uniform' or 'logit_normal' (kwargs mean, std); None: the objective's default
            (`default_time_sampler`).
        ot_solver: exact OT solver: 'assignment' (warm-started, the default), 'lsa' (plain scipy) or 'emd' (POT).
        flow_map_share: meanflow: the share of (t, r) pairs with r != t.
        flow_map_velocity: meanflow: 'data' or 'teacher' (see MeanFlowObjective).
        flow_map_guidance: meanflow: the guidance scale the learnt velocity carries.
        flow_map_weight_power: meanflow: the adaptive loss weight's power p.
        flow_map_pairing: meanflow: 'independent' or 'ot' (exact minibatch OT with `ot_solver`, `class_aware`).
    """
    if name not in OBJECTIVES:
        raise LatentflowError(f"unknown objective {name!r}; choose one of {list(OBJECTIVES)}")
    if time_sampler is None:
        time_sampler, defaults = default_time_sampler(name)
        time_sampler_kwargs = {**defaults, **time_sampler_kwargs}
    times = make_time_sampler(time_sampler, **time_sampler_kwargs)
    settings = ObjectiveSettings(sigma, reg, class_aware, ot_solver, flow_map_share, flow_map_velocity,
                                 flow_map_guidance, flow_map_weight_power, flow_map_pairing)
    return OBJECTIVES[name](settings, times)
