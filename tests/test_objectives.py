import numpy as np
import pytest
import torch

from latentflow.errors import LatentflowError
from latentflow.flow.objectives import OBJECTIVES, DDPMObjective, make_objective
from latentflow.flow.schedules import DDPMSchedule


def test_ddpm_schedule_matches_the_lecture_formula():
    schedule = DDPMSchedule()
    betas = np.linspace(1e-4, 0.02, 1000)
    expected = np.cumprod(1 - betas)
    np.testing.assert_allclose(schedule.betas().numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(schedule.alphas_cumprod()[1:].numpy(), expected, rtol=1e-10)
    assert float(schedule.alphas_cumprod()[0]) == 1.0
    assert float(schedule.alphas_cumprod()[1000]) == pytest.approx(4.04e-5, rel=0.01)


def test_ddpm_time_conversion_round_trips_and_follows_the_convention():
    schedule = DDPMSchedule()
    steps = torch.arange(0, 1001)
    t = schedule.timestep_to_time(steps)
    assert float(t[0]) == 1.0 and float(t[-1]) == 0.0  # k=0 clean data is t=1, k=T noise is t=0
    assert torch.equal(schedule.time_to_timestep(t), steps)


def test_ddpm_objective_builds_x_t_from_the_schedule():
    objective = DDPMObjective()
    x1 = torch.randn(64, 2, dtype=torch.float64)
    batch = objective.prepare(x1, generator=torch.Generator().manual_seed(0))
    steps = DDPMSchedule().time_to_timestep(batch.t)
    assert int(steps.min()) >= 1 and int(steps.max()) <= 1000
    alpha_bar = DDPMSchedule().alphas_cumprod()[steps].unsqueeze(1)
    torch.testing.assert_close(batch.x_t, alpha_bar.sqrt() * x1 + (1 - alpha_bar).sqrt() * batch.x0, rtol=1e-5,
                               atol=1e-5)
    assert torch.equal(batch.target, batch.x0)
    assert objective.prediction == "noise"


@pytest.mark.parametrize("name", [n for n in OBJECTIVES if n != "ddpm"])
def test_flow_objectives_target_is_data_minus_noise(name):
    x1 = torch.randn(32, 3, 4, 4)
    labels = torch.randint(0, 4, (32,))
    batch = make_objective(name, class_aware=True).prepare(x1, labels, torch.Generator().manual_seed(0))
    torch.testing.assert_close(batch.target, batch.x1 - batch.x0)
    assert batch.t.shape == (32,) and batch.x_t.shape == x1.shape
    if name != "otcfm-sinkhorn":  # pairs drawn from a plan need not keep every data row
        assert torch.equal(batch.labels, labels) and torch.equal(batch.x1, x1)
    assert (batch.ot_cost is None) == (name in ("rf", "cfm", "meanflow"))


def test_rf_x_t_lies_on_the_straight_line():
    x1 = torch.randn(16, 2)
    batch = make_objective("rf").prepare(x1, generator=torch.Generator().manual_seed(1))
    t = batch.t.unsqueeze(1)
    torch.testing.assert_close(batch.x_t, t * batch.x1 + (1 - t) * batch.x0)


def test_loss_is_per_sample_mse_and_zero_for_the_exact_target():
    objective = make_objective("cfm")
    batch = objective.prepare(torch.randn(8, 2, 3), generator=torch.Generator().manual_seed(2))
    assert torch.equal(objective.loss(batch.target, batch), torch.zeros(8))
    loss = objective.loss(batch.target + 2.0, batch)
    torch.testing.assert_close(loss, torch.full((8,), 4.0))
    with pytest.raises(LatentflowError, match="output shape"):
        objective.loss(torch.zeros(8, 6), batch)


def test_unknown_objective_and_rf_with_sigma_are_refused():
    with pytest.raises(LatentflowError, match="choose one of"):
        make_objective("score")
    with pytest.raises(LatentflowError, match="sigma 0"):
        make_objective("rf", sigma=0.1)
