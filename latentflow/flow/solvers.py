"""Sampling: ODE integration of a velocity field (torchdiffeq) and DDIM for noise models.

Both integrate from noise at t=0 to data at t=1 and count velocity (or noise)
evaluations exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torchdiffeq import odeint

from latentflow.errors import LatentflowError
from latentflow.flow.flow_maps import flow_map_step
from latentflow.flow.schedules import DDPMSchedule, check_time_shift, shift_times

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A model-like callable field(x (B, ...), t (B,)) -> (B, ...)."""

# ---- the solver table: every solver name the project accepts, and what a step costs --------------------------------

STAGES_PER_STEP = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4}
"""Velocity evaluations per step of the one-step fixed-grid methods (exact NFE = steps x stages; these also
support per-step callbacks in the pipeline)."""

NOISE_SOLVERS = ("ddim",)
"""Samplers of noise-prediction (ddpm) models; they take a step count."""

FLOW_MAP_SOLVERS = ("flowmap",)
"""Samplers of flow-map (average-velocity, meanflow) models: K jumps of x_r = x_t + (r - t) u(x_t, t, r), exactly
K evaluations. A flow map's diagonal u(x, t, t) is a velocity field, so the ODE methods sample it too."""

PREDICTIONS = ("velocity", "noise", "average_velocity")
"""What a model predicts: a velocity field (flow matching), the noise (ddpm), or a flow map's average velocity."""

_DOCUMENTED_METHODS = (  # torchdiffeq's README, for a release whose internals moved
    ("euler", "midpoint", "rk4", "explicit_adams", "implicit_adams", "fixed_adams", "heun2", "heun3"),
    ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun"),
)


def _torchdiffeq_methods() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(fixed-step, adaptive) method names of the installed torchdiffeq, sorted: the one place that reads its
    internals, guarded."""
    try:
        from torchdiffeq._impl.odeint import SOLVERS
        from torchdiffeq._impl.solvers import FixedGridODESolver
    except ImportError:
        return tuple(sorted(_DOCUMENTED_METHODS[0])), tuple(sorted(_DOCUMENTED_METHODS[1]))
    fixed = sorted(name for name, cls in SOLVERS.items() if issubclass(cls, FixedGridODESolver))
    adaptive = sorted(name for name, cls in SOLVERS.items()
                      if not issubclass(cls, FixedGridODESolver) and name != "scipy_solver")
    return tuple(fixed), tuple(adaptive)


FIXED_STEP_METHODS, ADAPTIVE_METHODS = _torchdiffeq_methods()
STEPPED_SOLVERS = (*FIXED_STEP_METHODS, *NOISE_SOLVERS, *FLOW_MAP_SOLVERS)
"""Every solver that takes a step count (the rest take tolerances)."""
SHIFTABLE_SOLVERS = (*FIXED_STEP_METHODS, *FLOW_MAP_SOLVERS)
"""The solvers whose step grid a time shift warps: fixed-step ODE methods and flow-map jumps."""


def check_solver(solver: str, prediction: str = "velocity") -> None:
    """Raise LatentflowError when a model predicting `prediction` (one of PREDICTIONS) cannot be sampled with
    `solver`, listing the valid ones."""
    if prediction not in PREDICTIONS:
        raise LatentflowError(f"prediction {prediction!r} is not one of {list(PREDICTIONS)}")
    if prediction == "noise":
        if solver not in NOISE_SOLVERS:
            raise LatentflowError(f"a noise-prediction (ddpm) model samples with solver='ddim', not {solver!r}")
        return
    ode_methods = sorted(FIXED_STEP_METHODS + ADAPTIVE_METHODS)
    if solver in FLOW_MAP_SOLVERS and prediction != "average_velocity":
        raise LatentflowError(f"solver {solver!r} needs a flow-map model (trained with objective 'meanflow'); this "
                              f"model is a plain velocity field: use an ODE solver, e.g. euler or dopri5")
    valid = ode_methods + (list(FLOW_MAP_SOLVERS) if prediction == "average_velocity" else [])
    if solver not in valid:
        raise LatentflowError(f"unknown solver {solver!r} for a {prediction.replace('_', '-')} model; choose one "
                              f"of {valid}")


def check_stepping(solver: str, steps: int | None, tolerance: float | None, steps_name: str = "num_inference_steps",
                   tolerance_name: str = "atol") -> None:
    """Refuse a step count given for a solver that picks its own steps (adaptive), and a tolerance given for one
    that takes a step count: either would be ignored. `steps_name` and `tolerance_name` are how the caller's user
    gave them (an argument, a CLI option); None means not given."""
    if steps is not None and solver not in STEPPED_SOLVERS:
        raise LatentflowError(f"{steps_name}={steps}: solver {solver!r} picks its own steps (its accuracy is "
                              f"{tolerance_name}), so the count would be ignored; leave {steps_name} out or pick a "
                              f"fixed-step solver (euler, midpoint, rk4, ...)")
    if tolerance is not None and solver in STEPPED_SOLVERS:
        raise LatentflowError(f"{tolerance_name}={tolerance:g}: solver {solver!r} takes a number of steps "
                              f"({steps_name}), not a tolerance, so it would be ignored; leave {tolerance_name} out "
                              f"or pick an adaptive solver (dopri5, bosh3, ...)")


def nfe_of(solver: str, steps: int) -> int | None:
    """Exact velocity evaluations of `steps` steps of `solver`, or None where it is not known in advance."""
    if solver in STAGES_PER_STEP:
        return steps * STAGES_PER_STEP[solver]
    return steps if solver in NOISE_SOLVERS + FLOW_MAP_SOLVERS else None


@dataclass
class SolverOutput:
    """The result of sampling.

    Attributes:
        x: (B, ...) the final state at t=1.
        nfe: the exact number of field evaluations (each over the whole batch).
        trajectory: (S, B, ...) states at `times`, or None.
        times: (S,) the times of the trajectory states, or None.
    """

    x: torch.Tensor
    nfe: int
    trajectory: torch.Tensor | None = None
    times: torch.Tensor | None = None


class CountingField:
    """Wraps a field for torchdiffeq (which calls f(t_scalar, x)) and counts evaluations."""

    def __init__(self, field: Field):
        self.field, self.calls = field, 0

    def __call__(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.field(x, t.to(x.dtype).expand(x.shape[0]))


def check_solver_time_shift(solver: str, shift: float) -> None:
    """Raise LatentflowError unless `shift` is valid and `solver` can take it (shift 1 suits every solver; another
    only the fixed-step ODE solvers and flow-map jumps, whose step grid it warps: `shift_times`)."""
    check_time_shift(shift)
    if shift != 1.0 and solver not in SHIFTABLE_SOLVERS:
        raise LatentflowError(f"a time shift ({shift}) warps the grid of a fixed-step ODE solver (euler, midpoint, "
                              f"heun2, heun3, rk4, ...) or of flow-map jumps; {solver!r} sets its own times: drop the "
                              "shift or pick one")


def step_grid(steps: int, device=None, dtype=torch.float32, time_shift: float = 1.0) -> torch.Tensor:
    """(steps + 1,) times from 0 (noise) to 1 (data): evenly spaced, then warped by `time_shift`."""
    return shift_times(torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=dtype), time_shift)


def _time_grid(method: str, steps: int | None, trajectory_points: int, device, dtype,
               time_shift: float = 1.0) -> torch.Tensor:
    check_solver_time_shift(method, time_shift)
    if method in FIXED_STEP_METHODS:
        if steps is None or steps < 1:
            raise LatentflowError(f"solver {method!r} takes a fixed number of steps >= 1, got {steps}")
        return step_grid(steps, device, dtype, time_shift)
    check_solver(method)
    return torch.linspace(0.0, 1.0, max(trajectory_points, 2), device=device, dtype=dtype)


def integrate(
    velocity: Field,
    x0: torch.Tensor,
    method: str = "euler",
    steps: int | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    return_trajectory: bool = False,
    trajectory_points: int = 11,
    time_shift: float = 1.0,
) -> SolverOutput:
    """Integrate dx/dt = velocity(x, t) from t=0 (x0, noise) to t=1 (data).

    Args:
        velocity: field(x (B, ...), t (B,)) -> dx/dt (B, ...).
        x0: (B, ...) initial state.
        method: any torchdiffeq method: fixed-step (euler, midpoint, rk4, heun2, heun3,
            explicit_adams, ...) or adaptive (dopri5, dopri8, bosh3, adaptive_heun, fehlberg2).
        steps: number of steps for fixed-step methods (ignored by adaptive ones).
        atol, rtol: tolerances of adaptive methods.
        return_trajectory: also return the states along the way: on the step grid for
            fixed-step methods, at `trajectory_points` evenly spaced times for adaptive ones.
        trajectory_points: see `return_trajectory`.
        time_shift: fixed-step methods: steps warped towards the noise by `shift_times` (1: evenly spaced).

    Returns:
        SolverOutput with the final state and the exact number of velocity evaluations.
    """
    grid = _time_grid(method, steps, trajectory_points if return_trajectory else 2, x0.device, x0.dtype,
                      time_shift)
    field = CountingField(velocity)
    options = {"atol": atol, "rtol": rtol} if method in ADAPTIVE_METHODS else {}
    with torch.no_grad():
        states = odeint(field, x0, grid, method=method, **options)
    return SolverOutput(
        x=states[-1],
        nfe=field.calls,
        trajectory=states if return_trajectory else None,
        times=grid if return_trajectory else None,
    )


def ddim_timesteps(schedule: DDPMSchedule, steps: int) -> torch.Tensor:
    """(steps + 1,) decreasing DDPM timesteps from T to 0, evenly spaced."""
    if not 1 <= steps <= schedule.num_train_timesteps:
        raise LatentflowError(f"DDIM steps must be in 1..{schedule.num_train_timesteps}, got {steps}")
    return torch.round(torch.linspace(schedule.num_train_timesteps, 0, steps + 1, dtype=torch.float64)).long()


def ddim_step(
    x: torch.Tensor,
    noise: torch.Tensor,
    alpha_bar: float,
    alpha_bar_prev: float,
    eta: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One DDIM update from timestep k (alpha_bar) to an earlier one (alpha_bar_prev).

    sigma = eta * sqrt((1 - a_prev) / (1 - a)) * sqrt(1 - a / a_prev) and
    x_prev = sqrt(a_prev) * x1_hat + sqrt(1 - a_prev - sigma^2) * noise + sigma * z.
    """
    data = (x - (1 - alpha_bar) ** 0.5 * noise) / alpha_bar**0.5
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)) ** 0.5 * (1 - alpha_bar / alpha_bar_prev) ** 0.5
    direction = max(1 - alpha_bar_prev - sigma**2, 0.0) ** 0.5
    x_prev = alpha_bar_prev**0.5 * data + direction * noise
    if sigma > 0:
        x_prev = x_prev + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x_prev


def ddim_sample(
    noise_prediction: Field,
    x_noise: torch.Tensor,
    schedule: DDPMSchedule | None = None,
    steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
) -> SolverOutput:
    """DDIM sampling of a noise-prediction model, from noise (t=0) to data (t=1).

    Args:
        noise_prediction: model(x (B, ...), t (B,)) -> predicted noise, t = 1 - k/T.
        x_noise: (B, ...) starting noise.
        schedule: the DDPM schedule the model was trained with.
        steps: number of model evaluations.
        eta: the lecture's sigma as a fraction of the DDPM posterior std: 0 gives
            deterministic DDIM, 1 ancestral DDPM sampling, in between stochastic.
        generator: randomness for eta > 0.
        return_trajectory: also return the states after every step.
    """
    if eta < 0:
        raise LatentflowError(f"DDIM eta must be >= 0, got {eta}")
    schedule = schedule or DDPMSchedule()
    alphas_cumprod = schedule.alphas_cumprod()
    timesteps = ddim_timesteps(schedule, steps)
    x, states = x_noise, [x_noise]
    with torch.no_grad():
        for k, k_prev in zip(timesteps[:-1].tolist(), timesteps[1:].tolist()):
            t = schedule.timestep_to_time(torch.full((x.shape[0],), k, device=x.device)).to(x.dtype)
            noise = noise_prediction(x, t)
            x = ddim_step(x, noise, float(alphas_cumprod[k]), float(alphas_cumprod[k_prev]), eta, generator)
            states.append(x)
    times = schedule.timestep_to_time(timesteps) if return_trajectory else None
    return SolverOutput(x=x, nfe=steps, trajectory=torch.stack(states) if return_trajectory else None, times=times)


def sample_flow_map(model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                    steps: int, return_trajectory: bool = False, time_shift: float = 1.0):
    """Generate with a flow map in `steps` jumps on the grid 0 = t_0 < ... < t_K = 1 (`step_grid`: uniform, then
    warped by `time_shift`): exactly K calls.

    Args:
        model: u(x (B, ...), t (B,), r (B,)) -> (B, ...), the average velocity (labels and guidance bound).
        x0: (B, ...) noise at t=0.
        steps: K >= 1.
        return_trajectory: also return the K + 1 states.
        time_shift: the grid warped towards the noise (`shift_times`; 1: evenly spaced).

    Returns:
        SolverOutput with x at t=1 and nfe = K.
    """
    if steps < 1:
        raise LatentflowError(f"a flow-map sampler takes steps >= 1, got {steps}")
    grid = step_grid(steps, x0.device, x0.dtype, time_shift)
    x, states = x0, [x0]
    with torch.no_grad():
        for start, end in zip(grid[:-1], grid[1:]):
            t, r = start.expand(x.shape[0]), end.expand(x.shape[0])
            x = flow_map_step(x, t, r, model(x, t, r))
            states.append(x)
    return SolverOutput(x=x, nfe=steps, trajectory=torch.stack(states) if return_trajectory else None,
                        times=grid if return_trajectory else None)
