import pytest
import torch

from latentflow.errors import LatentflowError
from latentflow.flow.paths import CFMPath, RectifiedFlowPath, expand_time
from latentflow.flow.time_samplers import LogitNormalTime, UniformTime, make_time_sampler


@pytest.mark.parametrize("shape", [(8, 2), (4, 3, 5, 5)])
def test_rectified_flow_endpoints_are_noise_and_data(shape):
    x0, x1 = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    path = RectifiedFlowPath()
    at_noise = path.sample(x0, x1, torch.zeros(shape[0], dtype=torch.float64))
    at_data = path.sample(x0, x1, torch.ones(shape[0], dtype=torch.float64))
    torch.testing.assert_close(at_noise.x_t, x0)
    torch.testing.assert_close(at_data.x_t, x1)
    torch.testing.assert_close(at_noise.u_t, x1 - x0)


@pytest.mark.parametrize("path", [RectifiedFlowPath(), CFMPath(sigma=0.0)])
def test_target_velocity_equals_finite_difference_of_the_path(path):
    x0, x1 = torch.randn(6, 2, 3, dtype=torch.float64), torch.randn(6, 2, 3, dtype=torch.float64)
    t = torch.rand(6, dtype=torch.float64) * 0.8 + 0.1
    h = 1e-6
    forward = path.sample(x0, x1, t + h).x_t
    backward = path.sample(x0, x1, t - h).x_t
    torch.testing.assert_close((forward - backward) / (2 * h), path.sample(x0, x1, t).u_t)


def test_cfm_path_noise_has_the_configured_sigma():
    x0, x1 = torch.zeros(20000, 2), torch.ones(20000, 2)
    t = torch.full((20000,), 0.3)
    sample = CFMPath(sigma=0.01).sample(x0, x1, t, torch.Generator().manual_seed(0))
    assert abs(float(sample.x_t.mean()) - 0.3) < 1e-3
    assert abs(float(sample.x_t.std()) - 0.01) < 5e-4
    torch.testing.assert_close(sample.u_t, x1 - x0)


def test_bad_time_shape_and_sigma_are_refused():
    with pytest.raises(LatentflowError, match="t must have shape"):
        expand_time(torch.zeros(3), torch.zeros(4, 2))
    for sigma in (-1.0, float("nan"), float("inf")):  # NaN was accepted and trained on
        with pytest.raises(LatentflowError, match="path sigma must be >= 0 and finite"):
            CFMPath(sigma=sigma)


def test_time_samplers_cover_the_unit_interval():
    generator = torch.Generator().manual_seed(0)
    uniform = UniformTime()(50000, generator=generator)
    assert 0 <= float(uniform.min()) and float(uniform.max()) <= 1
    assert abs(float(uniform.mean()) - 0.5) < 0.01
    logit = LogitNormalTime(mean=0.0, std=1.0)(50000, generator=generator)
    assert abs(float(torch.logit(logit).std()) - 1.0) < 0.02
    with pytest.raises(LatentflowError, match="uniform"):
        make_time_sampler("beta")
