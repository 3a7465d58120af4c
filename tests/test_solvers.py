import pytest
import torch

from latentflow.errors import LatentflowError
from latentflow.flow.schedules import DDPMSchedule, shift_times
from latentflow.flow.solvers import ADAPTIVE_METHODS, ddim_sample, ddim_timesteps, integrate


class CountedCubic:
    """dx/dt = 3 t^2, so x(1) = x(0) + 1 and x(t) = x(0) + t^3; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, t):
        self.calls += 1
        assert t.shape == (x.shape[0],)
        return 3 * t.reshape(-1, 1).to(x.dtype) ** 2 * torch.ones_like(x)


# exact NFE per step of each fixed-step method, and whether it integrates a quadratic exactly
FIXED = {"euler": (1, False), "midpoint": (2, False), "heun2": (2, False), "heun3": (3, True), "rk4": (4, True)}


@pytest.mark.parametrize("method", sorted(FIXED))
def test_fixed_step_solvers_count_nfe_exactly_and_converge(method):
    per_step, exact = FIXED[method]
    x0 = torch.zeros(5, 2, dtype=torch.float64)
    errors = []
    for steps in (4, 8):
        field = CountedCubic()
        out = integrate(field, x0, method=method, steps=steps)
        assert out.nfe == field.calls == per_step * steps
        errors.append(float((out.x - 1).abs().max()))
    if exact:
        assert errors[1] < 1e-12
    else:
        assert errors[1] < errors[0] < 0.5  # converges as the steps double


def test_euler_matches_its_closed_form_riemann_sum():
    out = integrate(CountedCubic(), torch.zeros(1, 1, dtype=torch.float64), method="euler", steps=4)
    expected = sum(3 * (k / 4) ** 2 / 4 for k in range(4))
    assert float(out.x) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "adaptive_heun"])
def test_adaptive_solvers_are_accurate_and_report_true_nfe(method):
    field = CountedCubic()
    out = integrate(field, torch.zeros(3, 2, dtype=torch.float64), method=method, atol=1e-9, rtol=1e-9)
    assert out.nfe == field.calls > 0
    torch.testing.assert_close(out.x, torch.ones(3, 2, dtype=torch.float64), atol=1e-5, rtol=0)


def test_trajectory_follows_the_closed_form():
    out = integrate(CountedCubic(), torch.zeros(2, 1, dtype=torch.float64), "rk4", steps=10, return_trajectory=True)
    assert out.trajectory.shape == (11, 2, 1)
    torch.testing.assert_close(out.trajectory[:, 0, 0], out.times**3, atol=1e-12, rtol=0)
    adaptive = integrate(CountedCubic(), torch.zeros(2, 1), "dopri5", return_trajectory=True, trajectory_points=5)
    assert adaptive.times.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_time_shift_is_sd3s_shift_written_in_our_time():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for shift in (0.5, 1.0, 2.0, 3.0):
        sigma = 1 - t  # SD3's noise level: 1 at the noise, where our t is 0
        sd3 = shift * sigma / (1 + (shift - 1) * sigma)  # Esser et al. 2024, Sec. 5.3.2
        torch.testing.assert_close(shift_times(t, shift), 1 - sd3, atol=1e-12, rtol=0)
        shifted = shift_times(t, shift)
        assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted.diff() > 0).all())
    assert float(shift_times(torch.tensor(0.5, dtype=torch.float64), 2.0)) == pytest.approx(1 / 3, abs=1e-12)
    assert torch.equal(shift_times(t, 1.0), t)


@pytest.mark.parametrize("shift", [1.0, 2.0, 3.0])
def test_euler_with_a_time_shift_steps_on_the_shifted_grid(shift):
    grid = shift_times(torch.linspace(0, 1, 5, dtype=torch.float64), shift).tolist()
    expected = sum(3 * grid[k] ** 2 * (grid[k + 1] - grid[k]) for k in range(4))  # Riemann sum on that grid
    out = integrate(CountedCubic(), torch.zeros(1, 1, dtype=torch.float64), "euler", steps=4, time_shift=shift)
    assert float(out.x) == pytest.approx(expected, abs=1e-12) and out.nfe == 4
    shifted = integrate(CountedCubic(), torch.zeros(1, 1, dtype=torch.float64), "rk4", steps=4, time_shift=shift,
                        return_trajectory=True)
    assert shifted.times.tolist() == pytest.approx(grid, abs=1e-12)  # rk4 is exact on t^3: the same end point
    assert float(shifted.x) == pytest.approx(1.0, abs=1e-12)


def test_bad_time_shifts_are_refused():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(LatentflowError, match="time shift must be a finite number > 0"):
            integrate(CountedCubic(), torch.zeros(1, 1), "euler", steps=2, time_shift=bad)
    with pytest.raises(LatentflowError, match="'dopri5' sets its own times"):
        integrate(CountedCubic(), torch.zeros(1, 1), "dopri5", time_shift=2.0)
    integrate(CountedCubic(), torch.zeros(1, 1), "dopri5", time_shift=1.0)  # no shift suits every solver


def test_bad_solver_settings_are_refused():
    with pytest.raises(LatentflowError, match="choose one of"):
        integrate(CountedCubic(), torch.zeros(1, 1), method="leapfrog", steps=2)
    with pytest.raises(LatentflowError, match="steps >= 1"):
        integrate(CountedCubic(), torch.zeros(1, 1), method="euler", steps=0)
    assert "dopri5" in ADAPTIVE_METHODS


def test_ddim_timesteps_run_from_noise_to_data():
    steps = ddim_timesteps(DDPMSchedule(), 10)
    assert steps[0] == 1000 and steps[-1] == 0 and len(steps) == 11
    assert bool((steps[1:] < steps[:-1]).all())


def oracle_noise_model(data_point: torch.Tensor, schedule: DDPMSchedule):
    """The exact noise prediction when the data distribution is a single point."""
    alphas = schedule.alphas_cumprod()

    def predict(x, t):
        alpha_bar = alphas[schedule.time_to_timestep(t)].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (x - alpha_bar.sqrt() * data_point) / (1 - alpha_bar).sqrt()

    return predict


def test_ddim_with_sigma_zero_is_deterministic_and_exact_for_an_oracle():
    schedule = DDPMSchedule()
    target = torch.tensor([[1.5, -2.0]], dtype=torch.float64)
    model = oracle_noise_model(target, schedule)
    noise = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first = ddim_sample(model, noise, schedule, steps=20, eta=0.0, generator=torch.Generator().manual_seed(1))
    second = ddim_sample(model, noise, schedule, steps=20, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first.x, second.x)
    assert first.nfe == 20
    torch.testing.assert_close(first.x, target.expand(8, 2), atol=1e-6, rtol=0)


def test_ddim_with_sigma_positive_is_stochastic():
    schedule = DDPMSchedule()
    model = oracle_noise_model(torch.zeros(1, 2, dtype=torch.float64), schedule)
    noise = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    first = ddim_sample(model, noise, schedule, steps=20, eta=1.0, generator=torch.Generator().manual_seed(1),
                        return_trajectory=True)
    second = ddim_sample(model, noise, schedule, steps=20, eta=1.0, generator=torch.Generator().manual_seed(2),
                         return_trajectory=True)
    assert not torch.equal(first.trajectory[10], second.trajectory[10])
    assert first.trajectory.shape == (21, 4, 2)
