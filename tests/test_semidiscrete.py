"""Semidiscrete OT (`latentflow.flow.semidiscrete`): closed-form potentials and cells, the exact OT of a large
noise sample, balance, entropic draws, and an exactly resumable fit."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
from scipy.stats import norm

from latentflow.errors import LatentflowError
from latentflow.flow.semidiscrete import (
    BLOCK_POINTS,
    BLOCK_ROWS,
    FitSettings,
    LaguerreCells,
    PotentialFit,
    measure_balance,
    noise_for_step,
    translation_potential,
)


def fit(points: torch.Tensor, **settings) -> PotentialFit:
    fitted = PotentialFit(points, FitSettings(**settings))
    while not fitted.finished:
        fitted.step()
    return fitted


def quantile_potential(points: torch.Tensor) -> torch.Tensor:
    """The exact potential (k,) of N(0, 1) onto sorted 1D points of mass 1/k, centred: the cell boundary between
    y_i and y_i+1 is the i/k quantile b_i, where (b - y_i)^2 - g_i = (b - y_i+1)^2 - g_i+1."""
    y = points.double().flatten()
    bounds = torch.tensor(norm.ppf(np.arange(1, len(y)) / len(y)), dtype=torch.float64)
    steps = (bounds - y[1:]) ** 2 - (bounds - y[:-1]) ** 2
    exact = torch.cat([torch.zeros(1, dtype=torch.float64), steps.cumsum(0)])
    return exact - exact.mean()


def test_one_dimensional_potential_and_cells_match_the_gaussian_quantiles() -> None:
    y = torch.sort(torch.randn(10, generator=torch.Generator().manual_seed(0)) * 1.5 + 0.3).values
    fitted = fit(y[:, None], steps=1500, batch_size=1024)
    exact = quantile_potential(y)
    assert (fitted.potential.double() - exact).abs().max() < 0.01
    x0 = torch.linspace(-3, 3, 601)[:, None]
    cells = LaguerreCells(fitted.points, fitted.potential).assign(x0)
    bins = torch.bucketize(x0.flatten().double(), torch.tensor(norm.ppf(np.arange(1, 10) / 10)))
    assert (cells == bins).float().mean() > 0.98  # only points within the potential's error of a boundary differ


def regular_polygon(count: int, radius: float, centre: tuple[float, float]) -> torch.Tensor:
    angles = torch.arange(count, dtype=torch.float64) * 2 * math.pi / count
    return (radius * torch.stack([angles.cos(), angles.sin()], 1) + torch.tensor(centre)).float()


def test_a_symmetric_set_has_a_constant_potential_and_nearest_point_cells() -> None:
    points = regular_polygon(6, radius=2.0, centre=(0.0, 0.0))
    fitted = fit(points, steps=800, batch_size=2048)
    assert fitted.potential.abs().max() < 0.05  # every cell is a 60 degree sector already at g = 0
    x0 = noise_for_step(5, 0, 4000, 2)
    nearest = torch.cdist(x0, points).argmin(1)
    assert (LaguerreCells(points, fitted.potential).assign(x0) == nearest).float().mean() > 0.99


def test_the_translation_potential_is_exact_for_a_shifted_symmetric_set() -> None:
    centred = regular_polygon(5, radius=1.0, centre=(0.0, 0.0))
    shifted = centred + torch.tensor([4.0, -3.0])
    x0 = noise_for_step(1, 0, 5000, 2)
    cells = LaguerreCells(shifted, translation_potential(shifted).float())
    assert torch.equal(cells.assign(x0), torch.cdist(x0, centred).argmin(1))


def exact_assignment(x0: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Exact discrete OT (POT's network simplex) of uniform noise rows x0 onto uniform points: each row's point
    (m = len(x0) / len(points) rows per point, so the plan is an assignment)."""
    cost = torch.cdist(x0.double(), points.double()).square().numpy()
    plan = ot.emd(np.full(len(x0), 1 / len(x0)), np.full(len(points), 1 / len(points)), cost, numItermax=10**7)
    return torch.from_numpy(plan.argmax(axis=1))


def test_hard_cells_agree_with_the_exact_ot_of_a_large_noise_sample() -> None:
    generator = torch.Generator().manual_seed(2)
    points = torch.randn(40, 2, generator=generator) * torch.tensor([1.5, 0.5]) + torch.tensor([2.0, 1.0])
    fitted = fit(points, steps=3000, batch_size=1024, lr=0.003)
    x0 = noise_for_step(9, 0, 40 * 200, 2)
    agree = (LaguerreCells(points, fitted.potential).assign(x0) == exact_assignment(x0, points)).float().mean()
    # the exact plan of 8,000 draws is itself a noisy estimate of the cells: measured 0.94 and 0.95 for two
    # noise seeds (0.88 to 0.89 with 2,000 draws)
    assert agree > 0.9


def test_balance_is_at_the_sampling_floor_when_fitted_and_far_above_it_at_zero() -> None:
    y = torch.tensor([[-2.0], [0.1], [0.2], [3.0]])
    fitted = fit(y, steps=1500, batch_size=1024)
    balanced = measure_balance(LaguerreCells(y, fitted.potential), draws_per_point=2000, seed=4)
    unfitted = measure_balance(LaguerreCells(y, torch.zeros(4)), draws_per_point=2000, seed=4)
    assert balanced.excess < 0.01 and balanced.chi_square_per_dof < 4  # chi-square with 3 dof: < 4 at p = 0.99
    assert balanced.sampling_floor == pytest.approx(0.5 * math.sqrt(2 / (math.pi * 2000)))
    assert unfitted.excess > 0.2 and unfitted.min_over_mean < 0.3


def test_pair_cost_of_two_symmetric_points_has_its_closed_form() -> None:
    # y = +-a e1 in 3D: by symmetry g = 0 and x goes to the point on its side of x1 = 0, so the mean squared pair
    # distance is E||x||^2 + a^2 - 2a E|x1| = 3 + a^2 - 2a sqrt(2 / pi); independent pairs cost 3 + a^2
    a = 2.0
    points = torch.tensor([[a, 0.0, 0.0], [-a, 0.0, 0.0]])
    balance = measure_balance(LaguerreCells(points, torch.zeros(2)), draws_per_point=40000, seed=1)
    assert balance.independent_cost == pytest.approx(3 + a**2)
    assert balance.pair_cost == pytest.approx(3 + a**2 - 2 * a * math.sqrt(2 / math.pi), abs=0.05)


def test_entropic_draws_follow_the_softmax_of_the_scores() -> None:
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    potential = torch.tensor([0.3, -0.2, 0.1])
    cells = LaguerreCells(points, potential, epsilon=0.7)
    x0 = torch.tensor([[0.4, 0.5]]).repeat(40000, 1)
    draws = torch.bincount(cells.assign(x0, torch.Generator().manual_seed(0)), minlength=3).double() / 40000
    cost = ((x0[0] - points) ** 2).sum(1) - potential
    expected = torch.softmax(-cost.double() / 0.7, 0)
    torch.testing.assert_close(draws, expected, atol=0.01, rtol=0)
    shares, _ = cells.cell_shares(x0[:10])
    torch.testing.assert_close(shares, expected, atol=1e-5, rtol=0)


def test_a_resumed_fit_equals_an_uninterrupted_one() -> None:
    points = torch.randn(30, 3, generator=torch.Generator().manual_seed(1))
    straight = fit(points, steps=60, batch_size=256)
    first = PotentialFit(points, FitSettings(steps=60, batch_size=256))
    for _ in range(35):
        first.step()
    resumed = PotentialFit(points, FitSettings(steps=60, batch_size=256))
    resumed.load_state_dict({name: value.clone() for name, value in first.state_dict().items()})
    while not resumed.finished:
        resumed.step()
    assert torch.equal(resumed.potential, straight.potential)


@pytest.mark.parametrize("average_from", [0.5, 0.75, 1.0])
def test_the_potential_averages_the_iterates_after_average_from_of_the_steps(average_from: float) -> None:
    points = torch.randn(30, 3, generator=torch.Generator().manual_seed(2))
    fitted, iterates = PotentialFit(points, FitSettings(steps=40, batch_size=128, average_from=average_from)), []
    while not fitted.finished:
        fitted.step()
        iterates.append(fitted.iterate.clone())
    averaged = iterates[int(40 * average_from):] or iterates[-1:]  # steps after the share; 1: the final iterate
    torch.testing.assert_close(fitted.potential, torch.stack(averaged).mean(0).float(), rtol=0, atol=1e-6)


def test_bad_shapes_and_settings_are_refused() -> None:
    with pytest.raises(LatentflowError, match="points \\(N, D\\) and a potential \\(N,\\)"):
        LaguerreCells(torch.zeros(3, 2), torch.zeros(4))
    with pytest.raises(LatentflowError, match="epsilon must be >= 0"):
        LaguerreCells(torch.zeros(3, 2), torch.zeros(3), epsilon=-1.0)
    with pytest.raises(LatentflowError, match="cannot be paired with points of 2"):
        LaguerreCells(torch.zeros(3, 2), torch.zeros(3)).assign(torch.zeros(4, 3))
    with pytest.raises(LatentflowError, match="ot fit steps must be >= 1, got 0"):
        PotentialFit(torch.zeros(3, 2), FitSettings(steps=0))
    with pytest.raises(LatentflowError, match="average_from must be in \\[0, 1\\]"):
        PotentialFit(torch.zeros(3, 2), FitSettings(average_from=1.5))
    fitted = PotentialFit(torch.zeros(3, 2), FitSettings(steps=5))
    with pytest.raises(LatentflowError, match="belongs to another cache"):
        fitted.load_state_dict(PotentialFit(torch.zeros(4, 2), FitSettings(steps=5)).state_dict())


def test_cells_in_blocks_pair_as_one_argmin_over_every_point() -> None:
    """More points than BLOCK_POINTS: the hard pairing runs in blocks of points (each screened where it pays) and
    in chunks of BLOCK_ROWS rows, and finds the argmin over every point; a fit's steps and the balance run on the
    blocks too."""
    generator = torch.Generator().manual_seed(0)
    count, dim = BLOCK_POINTS + 3000, 256
    points = 0.9 * torch.randn(count, dim, generator=generator) + 0.1
    potential = 30 * torch.randn(count, generator=generator)
    cells = LaguerreCells(points, potential)
    assert [block.points.shape[0] for block in cells.blocks] == [BLOCK_POINTS, 3000]
    assert isinstance(cells.screen, list) and len(cells.screen) == 2
    x0 = torch.randn(BLOCK_ROWS + 300, dim, generator=generator)  # two chunks of rows
    offsets = points.double().square().sum(1) - potential.double()
    exact = torch.cat([torch.addmm(offsets, x0[rows].double(), points.double().T, alpha=-2.0)
                       for rows in (slice(0, 700), slice(700, None))])  # (B, N) float64 scores
    values, index = cells.hard_min(x0)
    best = exact.min(dim=1)
    assert (exact.gather(1, index[:, None]).squeeze(1) - best.values).max() < 1e-2  # the minimum, up to float32
    assert (index == best.indices).double().mean() > 0.99 and (index >= BLOCK_POINTS).any()
    torch.testing.assert_close(values.double(), best.values, rtol=0, atol=1e-2)
    assert torch.equal(cells.assign(x0), index)
    fit = PotentialFit(points, FitSettings(steps=2, batch_size=2048))
    assert isinstance(fit.screen, list)  # one screen per block, built once for every step
    fit.step()
    fit.step()
    shares, _ = LaguerreCells(points, fit.potential, screen=fit.screen).cell_shares(x0)
    assert torch.isfinite(fit.potential).all() and shares.sum().item() == pytest.approx(1.0)
    balance = measure_balance(LaguerreCells(points, fit.potential, screen=fit.screen), 1, seed=0)
    assert balance.max_over_mean > 1 and 0 < balance.pair_cost < balance.independent_cost


def test_entropic_cells_in_blocks_draw_from_and_share_by_the_softmax_over_every_point() -> None:
    """Entropic cells of more than BLOCK_POINTS points: the fit's shares (two passes over the blocks) equal the
    softmax over every point, and the draws (Gumbel-max per block, then the smallest over the blocks) follow it,
    also where a row's mass is split between the two blocks."""
    generator = torch.Generator().manual_seed(3)
    count, dim, epsilon = BLOCK_POINTS + 500, 8, 0.5
    points = torch.randn(count, dim, generator=generator) * 3
    potential = torch.randn(count, generator=generator)
    points[BLOCK_POINTS + 7], potential[BLOCK_POINTS + 7] = points[7], potential[7]  # point 7's twin, block 2
    cells = LaguerreCells(points, potential, epsilon)
    assert [block.points.shape[0] for block in cells.blocks] == [BLOCK_POINTS, 500]
    x0 = torch.cat([points[7:8] + 0.1, torch.randn(BLOCK_ROWS + 20, dim, generator=generator)])  # two row chunks
    exact = torch.softmax(-(points.double().square().sum(1) - potential.double()
                            - 2 * x0.double() @ points.double().T) / epsilon, dim=1)  # (B, N)
    shares, transport = cells.cell_shares(x0)
    torch.testing.assert_close(shares, exact.mean(0), rtol=0, atol=1e-7)
    unblocked = LaguerreCells(points[:BLOCK_POINTS], potential[:BLOCK_POINTS], epsilon)
    assert unblocked.blocks is None and math.isfinite(transport)
    row = exact[0]
    assert row[7] > 0.4 and row[BLOCK_POINTS + 7] > 0.4  # the first row's mass is split between the blocks
    draws = cells.assign(x0[:1].repeat(20000, 1), torch.Generator().manual_seed(5))
    frequencies = torch.bincount(draws, minlength=count).double() / 20000
    assert 0.5 * (frequencies - row).abs().sum() < 0.03  # sampling alone: about 0.01
