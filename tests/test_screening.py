"""The bfloat16 screen of the hard argmin (`latentflow.flow.screening`): its error bound holds, its answer is the
float32 argmin, near-ties fall back to float32, and the semidiscrete cells pair the same with and without it."""

from __future__ import annotations

import pytest
import torch

from latentflow.flow.screening import CANDIDATES, MIN_DIM, MIN_POINTS, WIDE_CANDIDATES, Screen, native_bf16
from latentflow.flow.semidiscrete import FitSettings, LaguerreCells, PotentialFit


def problem(count: int, dim: int, rows: int, seed: int, spread: float = 1.0
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """points (count, dim), offsets (count,) and noise rows (rows, dim), the points as normalised latents are."""
    generator = torch.Generator().manual_seed(seed)
    points = spread * torch.randn(count, dim, generator=generator)
    potential = torch.randn(count, generator=generator) * dim**0.5
    offsets = points.square().sum(1) - potential
    return points, offsets, torch.randn(rows, dim, generator=generator)


def float32_min(points: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.addmm(offsets.unsqueeze(0), x, points.T, alpha=-2.0).min(dim=1)


def test_every_approximate_score_is_within_the_bound() -> None:
    for spread in (0.01, 1.0, 30.0):  # the bound scales with the norms: tiny, latent-sized and large points
        points, offsets, x = problem(500, 1024, 64, seed=1, spread=spread)
        screen = Screen.of(points)
        low_x = x.to(torch.bfloat16)
        product = (low_x @ screen.low.T).float()
        error = ((offsets - 2 * product) - (offsets.double() - 2 * x.double() @ points.double().T)).abs()
        bound = screen._bound(x, low_x, product, offsets)
        assert bool((error.amax(dim=1) <= bound.double()).all())
        assert float((error.amax(dim=1) / bound.double()).max()) > 0.01  # a bound, not a wall far away


def test_the_screened_argmin_is_the_float32_argmin() -> None:
    points, offsets, x = problem(3000, 512, 2000, seed=2)
    found = Screen.of(points).argmin(points, offsets, x)
    best, index = float32_min(points, offsets, x)
    assert torch.equal(found.indices, index)
    torch.testing.assert_close(found.values, best, rtol=1e-5, atol=1e-2)
    assert float(found.certified.float().mean()) > 0.9  # the float32 fallback is the exception


@pytest.mark.parametrize("twins", [2 * CANDIDATES, 2 * WIDE_CANDIDATES])
def test_near_ties_widen_the_shortlist_or_fall_back_to_float32_and_keep_the_exact_answer(twins: int) -> None:
    points, offsets, x = problem(400, 512, 200, seed=3)
    best, index = float32_min(points, offsets, x)
    # rows 0 and 1: their best point gets `twins` copies, closer than the bound resolves, so the first shortlist
    # (and with 2 x WIDE_CANDIDATES twins also the wide one) cannot hold every point that might win
    originals = index[:2].repeat_interleave(twins)
    copies = points[originals] + 1e-3 * torch.randn(len(originals), 512, generator=torch.Generator().manual_seed(6))
    potential = points.square().sum(1) - offsets  # g_j
    points = torch.cat([points, copies])
    offsets = torch.cat([offsets, copies.square().sum(1) - potential[originals]])
    found = Screen.of(points).argmin(points, offsets, x)
    assert torch.equal(found.indices, float32_min(points, offsets, x)[1])
    assert not bool(found.certified[:2].any())


def test_cells_pair_the_same_with_and_without_the_screen() -> None:
    """The fit runs screened where that pays (MIN_POINTS points, native bf16: this machine), sharing one screen."""
    points = torch.randn(MIN_POINTS, 512, generator=torch.Generator().manual_seed(4)) * 0.8 + 0.3
    fitted = PotentialFit(points, FitSettings(steps=60, batch_size=512, seed=4))
    assert isinstance(fitted.screen, Screen) == Screen.pays(points)
    while not fitted.finished:
        fitted.step()
    x0 = torch.randn(4096, 512, generator=torch.Generator().manual_seed(5))
    plain = LaguerreCells(points, fitted.potential, screen=False)
    screened = LaguerreCells(points, fitted.potential, screen=Screen.of(points))
    assert torch.equal(plain.assign(x0), screened.assign(x0))
    shares, transport = plain.cell_shares(x0)
    screened_shares, screened_transport = screened.cell_shares(x0)
    assert torch.equal(shares, screened_shares)
    assert abs(transport - screened_transport) < 1e-4 * abs(transport)


def test_entropic_cells_and_small_problems_are_not_screened() -> None:
    points = torch.randn(MIN_POINTS, MIN_DIM)
    assert isinstance(LaguerreCells(points, torch.zeros(MIN_POINTS)).screen, Screen) == native_bf16(points.device)
    assert LaguerreCells(points, torch.zeros(MIN_POINTS), epsilon=1.0).screen is False
    assert LaguerreCells(points[:, :2], torch.zeros(MIN_POINTS)).screen is False  # the 2D lab
    assert LaguerreCells(points[:-1], torch.zeros(MIN_POINTS - 1)).screen is False
