"""Flow maps: the average velocity of a flow over a time interval (MeanFlow, Geng et al. 2025).

In our convention (t=0 noise, t=1 data) a sample x_t at time t is carried by the ODE dx/dt = v(x, t) to time
r >= t. The average velocity over [t, r] is

    u(x_t, t, r) = 1 / (r - t) * integral_t^r v(x_s, s) ds,   so that   x_r = x_t + (r - t) u(x_t, t, r),

and u(x_t, t, t) = v(x_t, t). Differentiating (r - t) u = integral_t^r v ds in t along the trajectory gives the
MeanFlow identity in our convention

    u(x_t, t, r) = v(x_t, t) + (r - t) d/dt u(x_t, t, r),   d/dt u = v . grad_x u + d_t u,

which a model learns by regressing onto the right-hand side with the total derivative taken by a
Jacobian-vector product in the direction (v, 1, 0) and the target detached.

MeanFlow's paper writes time the other way (t=0 data, t=1 noise, z_r = z_t - (t - r) u, r <= t), where the
identity reads u = v - (t - r) du/dt (Eq. 6). `from_meanflow_convention` is the one conversion.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from latentflow.errors import LatentflowError

AverageVelocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
"""model(x_t (B, ...), t (B,), r (B,), labels (B,) or None) -> u (B, ...): a flow-map model's average velocity."""

INTERVAL_TIME_SCALE = 1.0
"""The factor on r - t before a new flow map's sinusoidal interval embedding (`DiT` / `UNet`
`interval_time_scale`). MeanFlow's target v + (r - t) du/dt holds the model's own derivative in t, which reaches
the interval embedding through r - t; a sinusoid of r - t times s has a derivative up to s times its amplitude.
At t's own scale (1,000) a fine-tune of the shipped couplings recipe ran away: the mean square of the
correction (r - t) du/dt (median per 100 steps; v's is about 2) grew from 36 to 142 and then to 1,200-8,700,
while the model's output stayed of unit size, and the one-step samples collapsed to texture between steps 500 and
750 (FID 313.6). At 1 the same run's correction stayed at 26-71 (falling over the run) and it scored 124.4
(`benchmarks/results/cpu2_meanflow_interval_scale_s21.txt`). Flow maps made before (no `interval_time_scale` in
their config) keep `time_scale`."""

PAPER_TIME_MEAN = -0.4
PAPER_TIME_STD = 1.0
PAPER_DISTINCT_SHARE = 0.25
"""MeanFlow's defaults (Geng et al. 2025, Table 1): times from logit-normal(-0.4, 1.0) in the paper's
convention, and 25% of the pairs with r != t (the rest are plain flow matching)."""


@dataclass(frozen=True)
class TimePair:
    """Flow-map times in our convention: t (B,) the start, r (B,) the end, 0 <= t <= r <= 1."""

    t: torch.Tensor
    r: torch.Tensor


def from_meanflow_convention(t_paper: torch.Tensor, r_paper: torch.Tensor) -> TimePair:
    """MeanFlow's times (t=1 noise, r <= t) as ours (t=0 noise, t <= r): t = 1 - t_paper, r = 1 - r_paper.

    Velocities change sign with the direction of time: our v and u are minus the paper's; a logit-normal
    time distribution with mean m in the paper's convention is logit-normal with mean -m in ours.
    """
    return TimePair(t=1 - t_paper, r=1 - r_paper)


def check_time_pair(t: torch.Tensor, r: torch.Tensor) -> None:
    """Raise LatentflowError unless 0 <= t <= r <= 1 elementwise (shapes (B,))."""
    if t.shape != r.shape:
        raise LatentflowError(f"flow-map times t {tuple(t.shape)} and r {tuple(r.shape)} must have one shape")
    if bool((t < 0).any() or (r > 1).any()):
        raise LatentflowError(f"flow-map times must lie in [0, 1]; got t in [{float(t.min()):g}, "
                              f"{float(t.max()):g}], r in [{float(r.min()):g}, {float(r.max()):g}]")
    if bool((r < t).any()):
        raise LatentflowError("flow-map times must satisfy t <= r (t=0 noise, t=1 data: a step goes from t "
                              "forward to r)")


class FlowMapTimes:
    """Draws flow-map time pairs: two times from `base`, t the smaller, r the larger; then r = t for a
    (1 - distinct_share) share of the pairs (MeanFlow's "ratio of r != t").

    Args:
        base: a time sampler (batch_size, device, generator) -> (B,) times in [0, 1].
        distinct_share: the share of pairs with r != t, in [0, 1].
    """

    def __init__(self, base: Callable[..., torch.Tensor], distinct_share: float = PAPER_DISTINCT_SHARE):
        if not 0 <= distinct_share <= 1:
            raise LatentflowError(f"flow-map distinct_share must be in [0, 1], got {distinct_share}")
        self.base, self.distinct_share = base, float(distinct_share)

    def __call__(self, batch_size: int, device=None, generator: torch.Generator | None = None) -> TimePair:
        first = self.base(batch_size, device, generator)
        second = self.base(batch_size, device, generator)
        t, r = torch.minimum(first, second), torch.maximum(first, second)
        same = torch.rand(batch_size, generator=generator, device=device) >= self.distinct_share
        return TimePair(t=t, r=torch.where(same, t, r))


def flow_map_step(x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """x_r = x_t + (r - t) u: one jump of a flow map; x_t, u (B, ...), t, r (B,)."""
    return x_t + (r - t).reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype) * u


def mean_flow_target(v: torch.Tensor, total_derivative: torch.Tensor, t: torch.Tensor,
                     r: torch.Tensor) -> torch.Tensor:
    """The MeanFlow identity's right-hand side in our convention: v + (r - t) du/dt, all (B, ...) but t, r (B,)."""
    return flow_map_step(v, t, r, total_derivative)


def total_derivative(model: AverageVelocity, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                     v: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """d/dt u(x_t, t, r) along the flow with velocity v: the JVP of u in the direction (v, 1, 0), detached.

    Returns:
        (B, ...) the tangent of u, computed without building a graph (it is part of a stop-gradient target).
    """
    def average_velocity(x: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        return model(x, start, end, labels)

    with torch.no_grad():
        _, tangent = torch.func.jvp(average_velocity, (x_t, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    return tangent


def mean_flow_regression_target(model: AverageVelocity, x_t: torch.Tensor, t: torch.Tensor, r: torch.Tensor,
                                v: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The detached target v + (r - t) du/dt, with the JVP evaluated only where r != t (elsewhere it is v).

    Args:
        model: the flow-map model (its JVP needs forward-mode AD through it).
        x_t: (B, ...) points on the path at t; v: (B, ...) the velocity there (conditional, or a teacher's).
        t, r: (B,) times with t <= r.
        labels: (B,) class labels or None.
    """
    target = v.detach().clone()
    distinct = (r > t).nonzero().flatten()
    # A batch without r != t still takes the JVP, of its first row (the result unused): under FSDP every process
    # must run the same forward passes, each gathering the sharded weights, and one that skipped it hung the others.
    rows = distinct if distinct.numel() else torch.zeros(1, dtype=torch.long, device=t.device)
    derivative = total_derivative(model, x_t[rows], t[rows], r[rows], v[rows], None if labels is None else labels[rows])
    if distinct.numel():
        target[distinct] = mean_flow_target(v[distinct], derivative.to(v.dtype), t[distinct], r[distinct])
    return target


def adaptive_weight(squared_error: torch.Tensor, power: float, offset: float = 1e-3) -> torch.Tensor:
    """MeanFlow's adaptive loss weight w = 1 / (error + c)^p, detached (Sec. 4.3; p = 1, c = 1e-3 there);
    p = 0 is the plain squared error. `squared_error` (B,) -> (B,)."""
    if power == 0:
        return torch.ones_like(squared_error)
    return 1.0 / (squared_error.detach() + offset) ** power

