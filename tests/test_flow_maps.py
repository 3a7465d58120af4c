"""Flow maps (MeanFlow): known answers on problems whose average velocity has a closed form."""

from __future__ import annotations

import math

import pytest
import torch

from latentflow.errors import LatentflowError
from latentflow.flow.flow_maps import (
    FlowMapTimes,
    adaptive_weight,
    check_time_pair,
    from_meanflow_convention,
    mean_flow_regression_target,
    total_derivative,
)
from latentflow.flow.objectives import MeanFlowObjective, TrainingModels, make_objective
from latentflow.flow.solvers import check_solver, check_solver_time_shift, nfe_of, sample_flow_map
from latentflow.flow.time_samplers import UniformTime

MU, SCALE = 1.5, 0.4  # the data N(MU, SCALE^2 I); noise N(0, I)


def _column(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, 1)


def gaussian_sigma(t: torch.Tensor) -> torch.Tensor:
    """Std of x_t = t x1 + (1 - t) x0 for independent x0 ~ N(0, 1), x1 ~ N(MU, SCALE^2)."""
    return ((1 - t) ** 2 + (t * SCALE) ** 2).sqrt()


def gaussian_velocity(x, t, r=None, labels=None):
    """The marginal velocity E[x1 - x0 | x_t] = MU + (t s^2 - (1 - t)) / sigma_t^2 (x - t MU)."""
    slope = (t * SCALE**2 - (1 - t)) / gaussian_sigma(t) ** 2
    return MU + _column(slope) * (x - _column(t) * MU)


def gaussian_average_velocity(x, t, r, labels=None):
    """Exact flow map x_r = r MU + sigma_r / sigma_t (x - t MU) as an average velocity (x_r - x) / (r - t);
    at r = t the velocity."""
    same = r == t
    gap = torch.where(same, torch.ones_like(r), r - t)
    x_r = _column(r) * MU + _column(gaussian_sigma(r) / gaussian_sigma(t)) * (x - _column(t) * MU)
    return torch.where(_column(same), gaussian_velocity(x, t), (x_r - x) / _column(gap))


def _pairs(count: int = 64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.rand(count, generator=generator, dtype=torch.float64), torch.rand(count, generator=generator,
                                                                                    dtype=torch.float64)
    t, r = torch.minimum(a, b) * 0.9, torch.maximum(a, b) * 0.9 + 0.1
    x = torch.randn(count, 3, generator=generator, dtype=torch.float64)
    return x, t, r


def test_the_exact_average_velocity_satisfies_the_identity():
    x, t, r = _pairs()
    v = gaussian_velocity(x, t)
    target = mean_flow_regression_target(gaussian_average_velocity, x, t, r, v, None)
    torch.testing.assert_close(target, gaussian_average_velocity(x, t, r), rtol=1e-9, atol=1e-9)


def test_the_identity_on_a_linear_ode():
    """dx/dt = a x: x_r = exp(a (r - t)) x, so u = (exp(a (r - t)) - 1) / (r - t) x."""
    a = -0.7

    def average(x, t, r, labels=None):
        gap = _column(r - t)
        return (torch.exp(a * gap) - 1) / gap * x

    x, t, r = _pairs(seed=1)
    target = mean_flow_regression_target(average, x, t, r, a * x, None)
    torch.testing.assert_close(target, average(x, t, r), rtol=1e-9, atol=1e-9)


def test_a_batch_without_distinct_times_still_takes_one_jvp_and_keeps_v():
    """Under FSDP each forward gathers sharded weights, so every process must run the JVP's forward: a batch whose
    pairs all have r = t takes it on one row (unused); its target is v. With r != t somewhere, only those rows."""
    calls = []

    def average(x, t, r, labels=None):
        calls.append(x.shape[0])
        return 2.0 * x + _column(r - t) * x

    x, v = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    target = mean_flow_regression_target(average, x, t, t.clone(), v, None)
    assert calls == [1] and torch.equal(target, v)
    calls.clear()
    r = torch.tensor([0.1, 0.7, 0.3, 0.9], dtype=torch.float64)
    target = mean_flow_regression_target(average, x, t, r, v, None)
    assert calls == [2] and torch.equal(target[[0, 2]], v[[0, 2]])
    # d/dt u along (v, 1, 0) = 2 v + (r - t) v - x for u = 2 x + (r - t) x
    rows = [1, 3]
    expected = v[rows] + _column(r[rows] - t[rows]) * (2 * v[rows] + _column(r[rows] - t[rows]) * v[rows] - x[rows])
    torch.testing.assert_close(target[rows], expected)


def test_the_loss_is_zero_for_the_exact_flow_map_taught_by_the_exact_field():
    objective = make_objective("meanflow", flow_map_velocity="teacher", flow_map_weight_power=0.0,
                               flow_map_share=0.5)
    generator = torch.Generator().manual_seed(2)
    x1 = MU + SCALE * torch.randn(256, 3, generator=generator, dtype=torch.float64)
    batch = objective.prepare(x1, generator=generator, noise=torch.randn(256, 3, generator=generator,
                                                                         dtype=torch.float64))
    batch.t, batch.r = batch.t.double(), batch.r.double()
    assert bool((batch.r > batch.t).any()) and bool((batch.r == batch.t).any())
    models = TrainingModels(student=gaussian_average_velocity, teacher=gaussian_velocity)
    loss = objective.training_loss(models, batch)
    assert loss.shape == (256,)
    assert float(loss.max()) < 1e-18
    wrong = TrainingModels(student=lambda x, t, r, labels: gaussian_average_velocity(x, t, r) + 0.1,
                           teacher=gaussian_velocity)
    assert float(objective.training_loss(wrong, batch).min()) > 1e-3
    # the squared error the log shows beside a weighted loss: an offset of 0.1 in every coordinate is 0.01
    plain, no_error = objective.loss_and_error(wrong, batch)
    assert no_error is None and torch.allclose(plain, torch.full_like(plain, 0.01))  # p = 0: the loss is the error
    weighted = make_objective("meanflow", flow_map_velocity="teacher", flow_map_share=0.5)
    loss, error = weighted.loss_and_error(wrong, batch)
    torch.testing.assert_close(error, torch.full_like(error, 0.01))
    torch.testing.assert_close(loss, error / (error + 1e-3))  # near 1 whatever the error: 0.909 here


def test_one_step_of_the_exact_flow_map_is_exact():
    x0 = torch.randn(1000, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = sample_flow_map(gaussian_average_velocity, x0, steps=1)
    torch.testing.assert_close(out.x, MU + SCALE * x0)
    assert out.nfe == 1
    four = sample_flow_map(gaussian_average_velocity, x0, steps=4, return_trajectory=True)
    torch.testing.assert_close(four.x, MU + SCALE * x0)
    assert four.nfe == 4 and four.trajectory.shape == (5, 1000, 3)


def test_flow_map_jumps_take_a_time_shift():
    x0 = torch.randn(100, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    calls = []

    def recording(x, t, r):
        calls.append((float(t[0]), float(r[0])))
        return gaussian_average_velocity(x, t, r)

    out = sample_flow_map(recording, x0, steps=2, time_shift=2.0, return_trajectory=True)
    assert [value for call in calls for value in call] == pytest.approx([0.0, 1 / 3, 1 / 3, 1.0])  # middle at 1/3
    torch.testing.assert_close(out.times, torch.tensor([0.0, 1 / 3, 1.0], dtype=torch.float64))
    torch.testing.assert_close(out.x, MU + SCALE * x0)  # the exact map is exact on any grid
    check_solver_time_shift("flowmap", 2.0)
    with pytest.raises(LatentflowError, match="'dopri5' sets its own times"):
        check_solver_time_shift("dopri5", 2.0)


def test_the_paper_convention_converts_to_ours():
    """MeanFlow's time runs from data (0) to noise (1): z = (1 - tp) x + tp e, u_p over [rp, tp] with rp <= tp,
    z_rp = z_tp - (tp - rp) u_p, and its identity u_p = v_p - (tp - rp) du_p/dtp (Eq. 6)."""
    def paper_average(z, t_paper, r_paper, labels=None):
        ours = from_meanflow_convention(t_paper, r_paper)
        return -gaussian_average_velocity(z, ours.t, ours.r)

    x, t, r = _pairs(seed=4)
    t_paper, r_paper = 1 - t, 1 - r  # tp >= rp
    v_paper = -gaussian_velocity(x, t)
    # the paper's identity with its own total derivative (tangent (v_p, 1, 0) in its time)
    _, derivative = torch.func.jvp(lambda z, tp, rp: paper_average(z, tp, rp), (x, t_paper, r_paper),
                                   (v_paper, torch.ones_like(t_paper), torch.zeros_like(r_paper)))
    paper_target = v_paper - _column(t_paper - r_paper) * derivative
    torch.testing.assert_close(paper_target, paper_average(x, t_paper, r_paper), rtol=1e-9, atol=1e-9)
    converted = from_meanflow_convention(t_paper, r_paper)
    torch.testing.assert_close(converted.t, t)
    torch.testing.assert_close(converted.r, r)


def test_total_derivative_matches_finite_differences_along_the_flow():
    x, t, r = _pairs(seed=5)
    v = gaussian_velocity(x, t)
    step = 1e-6
    ahead = gaussian_average_velocity(x + step * v, t + step, r)
    behind = gaussian_average_velocity(x - step * v, t - step, r)
    torch.testing.assert_close(total_derivative(gaussian_average_velocity, x, t, r, v, None),
                               (ahead - behind) / (2 * step), rtol=1e-5, atol=1e-6)


def test_time_pairs_are_ordered_in_range_with_the_paper_share():
    times = FlowMapTimes(UniformTime(), distinct_share=0.25)
    pair = times(20000, generator=torch.Generator().manual_seed(6))
    assert bool((pair.t <= pair.r).all()) and float(pair.t.min()) >= 0 and float(pair.r.max()) <= 1
    assert abs(float((pair.r > pair.t).float().mean()) - 0.25) < 0.02
    check_time_pair(pair.t, pair.r)
    none = FlowMapTimes(UniformTime(), 0.0)(100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(none.t, none.r)


def test_meanflow_defaults_are_the_papers_logit_normal_in_our_convention():
    objective = make_objective("meanflow")
    assert isinstance(objective, MeanFlowObjective)
    base = objective.time_sampler.base
    assert (base.mean, base.std) == (0.4, 1.0)  # the paper's mean -0.4 with time reversed
    assert objective.time_sampler.distinct_share == 0.25 and objective.weight_power == 1.0
    pair = objective.time_sampler(50000, generator=torch.Generator().manual_seed(7))
    # the median of the larger of two logit-normal(0.4, 1) draws, and of the smaller, bracket sigmoid(0.4)
    assert float(pair.t.median()) < 1 / (1 + math.exp(-0.4)) < float(pair.r[pair.r > pair.t].median())


@pytest.mark.parametrize(("t", "r", "message"), [
    ([0.2], [0.1], "t <= r"), ([-0.1], [0.5], "[0, 1]"), ([0.5], [1.2], "[0, 1]"), ([0.1, 0.2], [0.3], "shape"),
])
def test_time_pairs_out_of_range_or_reversed_are_refused(t, r, message):
    with pytest.raises(LatentflowError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_time_pair(torch.tensor(t), torch.tensor(r))


def test_adaptive_weight():
    error = torch.tensor([0.0, 1.0, 3.0], requires_grad=True)
    torch.testing.assert_close(adaptive_weight(error, 1.0), 1 / (error.detach() + 1e-3))
    assert not adaptive_weight(error, 1.0).requires_grad
    torch.testing.assert_close(adaptive_weight(error, 0.0), torch.ones(3))


def test_guidance_with_the_data_velocity_mixes_the_unconditional_diagonal():
    """MeanFlow Eq. 13: v = w (x1 - x0) + (1 - w) u(x_t, t, t | null) for labelled samples, unchanged for null."""
    objective = make_objective("meanflow", flow_map_guidance=3.0)
    generator = torch.Generator().manual_seed(8)
    labels = torch.tensor([0, 1, 2, 2])  # 2 is the null class here
    batch = objective.prepare(torch.randn(4, 3, generator=generator), labels, generator)

    def student(x, t, r, c):
        return torch.where((c == 2)[:, None], torch.full_like(x, 5.0), torch.zeros_like(x))

    v = objective.instantaneous_velocity(TrainingModels(student=student, null_class=2), batch)
    torch.testing.assert_close(v[:2], 3.0 * batch.target[:2] + (1 - 3.0) * 5.0)
    torch.testing.assert_close(v[2:], batch.target[2:])


def test_the_flowmap_sampler_fits_only_flow_maps():
    check_solver("flowmap", "average_velocity")
    check_solver("euler", "average_velocity")  # the diagonal is a velocity field
    with pytest.raises(LatentflowError, match="needs a flow-map model"):
        check_solver("flowmap", "velocity")
    with pytest.raises(LatentflowError, match="ddim"):
        check_solver("flowmap", "noise")
    assert nfe_of("flowmap", 2) == 2


def test_meanflow_with_ot_pairing_pairs_each_batch_by_its_exact_plan():
    """flow_map_pairing 'ot': a batch whose noise is a planted permutation of its data, slightly moved, is paired
    back to it (the plan otcfm finds), within each class when class-aware; 'independent' keeps the draw order."""
    generator = torch.Generator().manual_seed(3)
    x1 = torch.randn(32, 6, generator=generator)
    planted = torch.randperm(32, generator=generator)
    noise = x1[planted] + 0.01 * torch.randn(32, 6, generator=generator)
    paired = make_objective("meanflow", flow_map_pairing="ot").prepare(x1, generator=generator, noise=noise)
    assert paired.target.square().sum(1).max() < 0.01**2 * 6 * 9  # x1 - x0: only the planted offset remains
    assert paired.ot_cost == pytest.approx(float(paired.target.square().sum(1).mean()), rel=1e-5)
    assert paired.r is not None and torch.all(paired.r >= paired.t)
    independent = make_objective("meanflow").prepare(x1, generator=generator, noise=noise)
    assert independent.target.square().sum(1).mean() > 1 and independent.ot_cost is None
    labels = torch.arange(32) % 2  # class-aware: the noise rows split in order, one block per class (as otcfm)
    aware = make_objective("meanflow", flow_map_pairing="ot", class_aware=True).prepare(
        x1, labels, torch.Generator().manual_seed(4), noise=noise)
    otcfm = make_objective("otcfm", class_aware=True).prepare(x1, labels, torch.Generator().manual_seed(4),
                                                              noise=noise)
    assert torch.equal(aware.x0, otcfm.x0) and torch.equal(aware.x1, x1) and torch.equal(aware.labels, labels)
    noise_rows = torch.cdist(aware.x0, noise).argmin(1)
    assert sorted(noise_rows[labels == 0].tolist()) == list(range(16))
    with pytest.raises(LatentflowError, match="meanflow pairing 'sinkhorn' unknown"):
        make_objective("meanflow", flow_map_pairing="sinkhorn")
