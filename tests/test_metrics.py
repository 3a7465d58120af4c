import numpy as np
import pytest
import torch

from latentflow.errors import LatentflowError
from latentflow.flow.metrics import path_straightness, sliced_wasserstein2, wasserstein2
from latentflow.flow.solvers import integrate


def test_w2_of_a_translated_cloud_is_the_translation_length():
    points = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert wasserstein2(points, points + shift) == pytest.approx(5.0, rel=1e-9)
    assert wasserstein2(points, points[torch.randperm(200)]) == pytest.approx(0.0, abs=1e-6)


def test_w2_between_unequal_sizes_and_bad_input():
    a = np.zeros((3, 2))
    b = np.ones((5, 2))
    assert wasserstein2(a, b) == pytest.approx(np.sqrt(2.0))
    with pytest.raises(LatentflowError, match="finite"):
        wasserstein2(np.array([[np.nan, 0.0]]), b)


def test_sliced_w2_of_a_translation():
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(4000, 8, generator=generator, dtype=torch.float64)
    shift = torch.zeros(8, dtype=torch.float64)
    shift[0] = 2.0
    # projections of a translation by s have W2^2 = (s.theta)^2 whose mean over directions is |s|^2 / d
    value = sliced_wasserstein2(points, points + shift, num_projections=2000, generator=generator)
    assert value == pytest.approx(2.0 / np.sqrt(8), rel=0.1)
    assert sliced_wasserstein2(points, points, generator=generator) == pytest.approx(0.0, abs=1e-9)


def test_straightness_is_zero_for_constant_velocity_and_positive_for_curved():
    x0 = torch.randn(16, 2, dtype=torch.float64)
    constant = lambda x, t: torch.ones_like(x)  # noqa: E731
    out = integrate(constant, x0, "euler", steps=10, return_trajectory=True)
    assert path_straightness(constant, out.trajectory, out.times) == pytest.approx(0.0, abs=1e-20)
    rotating = lambda x, t: torch.stack([-x[:, 1], x[:, 0]], dim=1)  # noqa: E731
    out = integrate(rotating, x0, "rk4", steps=20, return_trajectory=True)
    assert path_straightness(rotating, out.trajectory, out.times) > 0.1
