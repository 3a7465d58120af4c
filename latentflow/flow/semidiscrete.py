"""Semidiscrete optimal transport between Gaussian noise and a finite set of points (a whole latent cache).

For the cost c(x, y) = ||x - y||^2, the optimal transport of a continuous source (here N(0, I)) onto N points
y_j of equal mass 1/N sends x to the point of its Laguerre cell,

    T(x) = argmin_j ||x - y_j||^2 - g_j,                                  (Peyré & Cuturi 2019, Eq. 5.8)

for the dual potential g that gives every cell source mass 1/N. g maximises the concave semi-dual

    F(g) = E_x[min_j (||x - y_j||^2 - g_j)] + (1/N) sum_j g_j,            (Peyré & Cuturi 2019, Eq. 5.10)

whose gradient is dF/dg_j = 1/N - P(x lands in cell j); with an entropic blur eps > 0 the min becomes the
soft-min -eps log (1/N) sum_j exp(-(c - g_j) / eps), the gradient 1/N - E[softmax_j((g - c(x, .)) / eps)], and
the pairing a draw from that softmax (Genevay et al. 2016, Eq. 7 and Algorithm 2). We ascend F with Adam on
fresh noise batches: the gradient scaled by N, so an unvisited cell pushes +1 and an over-full one pushes
1 - N * share, with the step in cost units and a cosine decay, and the potential averaged over the last
steps (Polyak-Ruppert averaging, which removes most of the batch noise of the final iterate; by default over the
last half, `FitSettings.average_from`).

Everything works on flattened points (N, D); ||x||^2 is the same for every j and is dropped from the argmin:
score_j(x) = ||y_j||^2 - 2 <x, y_j> - g_j. Work is chunked over noise rows so a chunk's scores (rows, N) stay
within `CHUNK_ELEMENTS`; the pairing of many points, hard or entropic, is also split over blocks of points
(`BLOCK_ROWS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from latentflow.errors import LatentflowError
from latentflow.flow.screening import Screen

CHUNK_ELEMENTS = 1 << 24
"""Scores held at once (rows x points, float32: 64 MiB)."""

BLOCK_ROWS = 1024
"""The pairing (hard or entropic) of more than CHUNK_ELEMENTS / BLOCK_ROWS points (16,384) scores chunks of this
many noise rows against blocks of that many points, keeping each row's minimum over the blocks (each block with its
own bf16 screen; the entropic shares take two passes over the blocks, the rows' normalisers first). Chunking rows
alone would leave CHUNK_ELEMENTS / N rows per product (13 for ImageNet's 1.28M latents), and every such product
reads every point for those few rows: 13 FLOPs per bfloat16 value read, where a GPU's matrix units need about 300
and this CPU's float32 product halved its rate at 83 rows (200,000 points). With blocks a product has up to 1,024
rows and reads each block once per chunk of rows."""
BLOCK_POINTS = CHUNK_ELEMENTS // BLOCK_ROWS


def flatten_points(points: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N, D) float32, contiguous."""
    return points.reshape(points.shape[0], -1).float().contiguous()


def row_chunks(count: int, width: int) -> list[slice]:
    """Slices of `count` rows of `width` values each, at most CHUNK_ELEMENTS values per slice."""
    size = max(1, CHUNK_ELEMENTS // max(1, width))
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def squared_norms(points: torch.Tensor) -> torch.Tensor:
    """(N,) ||y_j||^2 of flat points (N, D), in chunks of rows: no (N, D) temporary, which for ImageNet's latents
    would be another 21 GB beside the points."""
    parts = [points[rows].square().sum(1) for rows in row_chunks(points.shape[0], points.shape[1])]
    return torch.cat(parts) if parts else points.new_zeros(0)


def screen_for(points: torch.Tensor, epsilon: float) -> Screen | bool:
    """The hard argmin's screen over flat points (N, D) where it pays (`Screen.pays`), else False (entropic
    pairing draws from every score and is never screened)."""
    return Screen.of(points) if epsilon == 0 and Screen.pays(points) else False


@dataclass
class LaguerreCells:
    """Data points and a dual potential: the semidiscrete pairing of noise with them.

    Attributes:
        points: (N, D) float32.
        potential: (N,) float32 dual potential g (cost units).
        epsilon: entropic blur; 0 pairs by the hard argmin, > 0 draws from the softmax.
        screen: the hard argmin's bfloat16 first pass (`latentflow.flow.screening`; same pairing, faster): True
            builds one where it pays (`Screen.pays`), False never screens, a `Screen` of these points is used as
            is (a fit shares one over its steps); for cells in blocks (`blocks`), one such entry per block, which
            `screen` then holds (True or a `Screen` over all the points builds each block's where it pays).
        norms: (N,) ||y_j||^2 when the caller has them (a fit's steps share them), else computed.
        blocks: blocks of at most BLOCK_POINTS consecutive points, each cells of its own, when there are more
            points than that (set on construction; None otherwise), for the hard and the entropic pairing.
    """

    points: torch.Tensor
    potential: torch.Tensor
    epsilon: float = 0.0
    screen: Screen | bool | list[Screen | bool] = True
    norms: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.points.dim() != 2 or self.potential.shape != (self.points.shape[0],):
            raise LatentflowError(f"LaguerreCells needs points (N, D) and a potential (N,), got "
                                  f"{tuple(self.points.shape)} and {tuple(self.potential.shape)}")
        if self.epsilon < 0:
            raise LatentflowError(f"semidiscrete OT epsilon must be >= 0, got {self.epsilon}")
        if self.norms is None:
            self.norms = squared_norms(self.points)
        self.offsets = self.norms - self.potential  # (N,) ||y_j||^2 - g_j
        self.blocks: list[LaguerreCells] | None = None
        if self.points.shape[0] > BLOCK_POINTS:
            starts = range(0, self.points.shape[0], BLOCK_POINTS)
            screens = self.screen if isinstance(self.screen, list) else [bool(self.screen)] * len(starts)
            spans = [slice(start, start + BLOCK_POINTS) for start in starts]
            self.blocks = [LaguerreCells(self.points[span], self.potential[span], self.epsilon, screen,
                                         self.norms[span]) for span, screen in zip(spans, screens)]
            self.screen = [block.screen for block in self.blocks]
        elif self.screen is True:
            self.screen = screen_for(self.points, self.epsilon)

    def scores(self, x0: torch.Tensor) -> torch.Tensor:
        """score (B, N) = ||x0 - y_j||^2 - g_j - ||x0||^2 for flat noise x0 (B, D)."""
        return torch.addmm(self.offsets.unsqueeze(0), x0, self.points.T, alpha=-2.0)

    def chunks(self, rows: int) -> list[slice]:
        """Row slices whose scores against every point (or, for cells in blocks, against one block) stay within
        CHUNK_ELEMENTS."""
        return row_chunks(rows, BLOCK_POINTS if self.blocks else self.points.shape[0])

    def assign(self, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The point paired with each noise row x0 (B, ...): (B,) long indices into `points`.

        Hard (epsilon 0): the Laguerre cell, argmin_j score_j. Entropic: a draw from softmax(-score / eps) by the
        Gumbel-max trick (argmin of score - eps * Gumbel noise), with `generator` for the Gumbel noise.
        """
        flat = x0.reshape(x0.shape[0], -1).to(self.points)
        if flat.shape[1] != self.points.shape[1]:
            raise LatentflowError(f"noise of {flat.shape[1]} dimensions cannot be paired with points of "
                                  f"{self.points.shape[1]}")
        return self.drawn_min(flat, generator)[1]

    def drawn_min(self, flat: torch.Tensor, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(score, point), each (B,), of the pairing's choice for flat noise rows (B, D), in chunks: hard, the
        minimal score and its point; entropic, the minimum of score_j - eps * G_j (G_j independent Gumbel(0, 1)
        draws from `generator`) and its point. Minima of disjoint sets of points compare across sets: the
        smallest of them is the choice over their union (hard: the argmin; entropic: a draw from the softmax over
        all of them), which is how points sharded across processes pair (`latentflow.train.pairing`)."""
        if self.blocks is not None and self.epsilon > 0:  # independent Gumbel draws per block: the same law
            return self._min_over_blocks(lambda block: block.drawn_min(flat, generator), flat)
        values = torch.empty(flat.shape[0], dtype=flat.dtype, device=flat.device)
        out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        for rows in self.chunks(flat.shape[0]):
            if self.epsilon == 0:
                values[rows], out[rows] = self.hard_min(flat[rows])
                continue
            scores = self.scores(flat[rows])  # (b, N)
            where = scores.device if generator is None else generator.device
            uniform = torch.rand(scores.shape, generator=generator, device=where).to(scores.device)
            scores -= self.epsilon * -torch.log(-torch.log(uniform.clamp_min(1e-20)))  # Gumbel(0, 1)
            values[rows], out[rows] = scores.min(dim=1)
        return values, out

    def hard_min(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(min_j score_j, argmin_j score_j), each (b,), for flat noise x0 (b, D): through the screen when the
        cells have one (the same answer, faster); for cells in blocks, the minimum over the blocks' (the first
        block's on a tie, as one argmin over every point takes the first)."""
        if self.blocks is not None:
            return self._min_over_blocks(lambda block: block.hard_min(x0), x0)
        if isinstance(self.screen, Screen):
            found = self.screen.argmin(self.points, self.offsets, x0)
            return found.values, found.indices
        return self.scores(x0).min(dim=1)

    def _min_over_blocks(self, block_min, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The smallest of `block_min(block)`'s (value, index) over the blocks, as (value, index among all
        points), each (b,); the first block's on a tie, as one argmin over every point takes the first."""
        best = torch.full((x0.shape[0],), math.inf, dtype=x0.dtype, device=x0.device)
        index = torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device)
        start = 0
        for block in self.blocks:
            value, found = block_min(block)
            better = value < best
            best, index = torch.where(better, value, best), torch.where(better, found + start, index)
            start += block.points.shape[0]
        return best, index

    def _soft_shares_in_blocks(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(softmax mass per point summed over rows (N,) float64, logsumexp_j(-score_j / eps) per row (b,)) for
        rows x0 (b, D) of entropic cells in blocks: two passes over the blocks, the row's normaliser first."""
        normaliser = torch.full((x0.shape[0],), -math.inf, dtype=x0.dtype, device=x0.device)
        for block in self.blocks:
            normaliser = torch.logaddexp(normaliser, torch.logsumexp(-block.scores(x0) / self.epsilon, dim=1))
        shares = [torch.exp(-block.scores(x0) / self.epsilon - normaliser[:, None]).sum(0).double()
                  for block in self.blocks]
        return torch.cat(shares), normaliser

    def cell_shares(self, x0: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(shares (N,), mean transport value) over noise rows x0 (B, D): the share of the rows each cell
        receives (soft for epsilon > 0) and mean_x of min_j (c(x, y_j) - g_j), soft-min for epsilon > 0."""
        shares = torch.zeros(self.points.shape[0], dtype=torch.float64, device=x0.device)
        total = 0.0
        for rows in self.chunks(x0.shape[0]):
            norms = x0[rows].square().sum(1)  # (b,)
            if self.epsilon > 0 and self.blocks is not None:
                soft, normaliser = self._soft_shares_in_blocks(x0[rows])
                shares += soft
                log_mean = normaliser - math.log(self.points.shape[0])
                total += float((norms - self.epsilon * log_mean).double().sum())
            elif self.epsilon > 0:
                scores = self.scores(x0[rows])  # (b, N)
                soft = torch.softmax(-scores / self.epsilon, dim=1)  # (b, N)
                shares += soft.sum(0).double()
                log_mean = torch.logsumexp(-scores / self.epsilon, dim=1) - math.log(self.points.shape[0])
                total += float((norms - self.epsilon * log_mean).double().sum())
            else:
                best, index = self.hard_min(x0[rows])
                shares += torch.bincount(index, minlength=self.points.shape[0]).double()
                total += float((norms + best).double().sum())
        return shares / x0.shape[0], total / x0.shape[0]


@dataclass
class FitSettings:
    """How `PotentialFit` ascends the semi-dual.

    Attributes:
        steps: ascent steps.
        batch_size: fresh noise rows per step.
        epsilon: entropic blur in cost units (0: hard assignment).
        lr: Adam's first step in units of `cost_scale` (the typical spread of a noise draw's costs over the
            centred points: the range the potential may have to cover).
        seed: noise of step k comes from seed and k alone, so a resumed fit draws what an uninterrupted one would.
        average_from: the share of the steps after which the potential is the running (Polyak) average of the
            iterates; 1 keeps the final iterate. Averaging removes the noise of the last steps, but averages in
            the drift of a fit still converging: from half-way suits a fit that settles early (a cache's latents:
            excess 0.013 against 0.017 for the final iterate, demo settings), a later start suits one that settles
            late (8,000 2D points at the lab's small step: 0.067 from half-way, 0.013 over the last tenth).
    """

    steps: int = 1000
    batch_size: int = 1024
    epsilon: float = 0.0
    lr: float = 0.03
    seed: int = 0
    average_from: float = 0.5

    def validate(self) -> None:
        for name, value in (("steps", self.steps), ("batch size", self.batch_size)):
            if value < 1:
                raise LatentflowError(f"ot fit {name} must be >= 1, got {value}")
        if not 0 <= self.epsilon < math.inf:
            raise LatentflowError(f"ot fit epsilon must be a finite number >= 0 (0: hard assignment), got "
                                  f"{self.epsilon}")
        if not 0 < self.lr < math.inf:
            raise LatentflowError(f"ot fit lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.average_from <= 1:
            raise LatentflowError(f"ot fit average_from must be in [0, 1] (the share of steps before averaging), "
                                  f"got {self.average_from}")


@dataclass(frozen=True)
class DrawSplit:
    """How one fit's noise draws are split over processes (`accelerate launch ... ot-fit`): every process holds
    every point and draws each step's whole batch (the same, from the seed and step), scores only its own
    contiguous rows, and `reduce_sum` adds the processes' cell counts, so that every process takes the same
    step, the one a single process would take. The hard pairing's counts are integers, so the fit is that of one
    process up to float rounding of the matrix products' ties; `measure_balance` splits its batches likewise.

    Attributes:
        rank, world: this process and how many there are.
        reduce_sum: a tensor summed over the processes, on every process (identity for one).
    """

    rank: int = 0
    world: int = 1
    reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda tensor: tensor

    def rows(self, count: int) -> slice:
        """This process's contiguous share of `count` rows (the first processes take one more where they differ)."""
        size, extra = divmod(count, self.world)
        start = self.rank * size + min(self.rank, extra)
        return slice(start, start + size + (self.rank < extra))

    def counted(self, cells: "LaguerreCells", x0: torch.Tensor) -> tuple[torch.Tensor, float]:
        """`cells.cell_shares` of the whole batch x0, each process scoring its share of the rows."""
        return self.summed([self.local_shares(cells, x0)], x0.shape[0])[0]

    def local_shares(self, cells: "LaguerreCells", x0: torch.Tensor) -> tuple[torch.Tensor, float]:
        """`cells.cell_shares` of this process's rows of x0 (zeros where it has none: more processes than rows)."""
        mine = x0[self.rows(x0.shape[0])]
        if mine.shape[0]:
            return cells.cell_shares(mine)
        return torch.zeros(cells.points.shape[0], dtype=torch.float64, device=x0.device), 0.0

    def summed(self, parts: list[tuple[torch.Tensor, float]], rows: int) -> list[tuple[torch.Tensor, float]]:
        """Each part's shares and transport (from `local_shares` of one batch of `rows` draws) over every
        process's rows, with one `reduce_sum` for all the parts (a class-aware fit's classes)."""
        if self.world == 1:
            return parts
        mine = self.rows(rows)
        scored = mine.stop - mine.start
        local = torch.cat([torch.cat([shares * scored, shares.new_tensor([transport * scored])])
                           for shares, transport in parts])
        totals = (self.reduce_sum(local) / rows).split([shares.numel() + 1 for shares, _ in parts])
        return [(total[:-1], float(total[-1])) for total in totals]


def noise_for_step(seed: int, step: int, rows: int, dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The fit's noise batch (rows, dim) of `step`: N(0, I) from a generator seeded by (seed, step) only."""
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)
    return torch.randn(rows, dim, generator=generator, device=device)


def translation_potential(points: torch.Tensor) -> torch.Tensor:
    """(N,) float64 g_j = 2 <mean, y_j - mean>: the exact potential's part due to the points' mean.

    For y_j = z_j + mean, ||x - y_j||^2 = ||x - z_j||^2 + 2 <mean, z_j> + (terms of x alone), so the cells of
    the centred points z under a potential h are the cells of y under h + 2 <mean, z>: starting the ascent
    here leaves it only the centred problem to solve.
    """
    mean = points.mean(0, dtype=torch.float64)
    parts = [2.0 * (points[rows].double() - mean) @ mean for rows in row_chunks(*points.shape)]  # no (N, D) copy
    return torch.cat(parts) if parts else mean.new_zeros(0)


SCALE_ROWS = 4096
"""`cost_scale` reads at most this many noise rows: a median needs no more, and a large cache's fit step may draw
hundreds of thousands (each scored against every point at once, in thin chunks)."""


def cost_scale(points: torch.Tensor, x0: torch.Tensor) -> float:
    """Median over noise rows x0 (B, D) (the first SCALE_ROWS) of the spread (std over points) of ||x - y_j||^2,
    centred points."""
    if points.shape[0] < 2:
        return 1.0
    x0 = x0[:SCALE_ROWS]
    # ||x - (y_j - m)||^2 = ||y_j - m||^2 - 2 <x, y_j> + (terms of x alone, which leave the spread over j alone)
    mean = points.mean(0, dtype=torch.float64)
    centred_norms = torch.cat([(points[rows].double() - mean).square().sum(1)
                               for rows in row_chunks(*points.shape)]).float()
    spreads = [torch.addmm(centred_norms.unsqueeze(0), x0[rows], points.T, alpha=-2.0).std(dim=1)
               for rows in row_chunks(x0.shape[0], points.shape[0])]  # every score of a row at once
    return max(float(torch.cat(spreads).median()), 1e-12)


class PotentialFit:
    """Stochastic ascent of the semi-dual for one set of points (one class, or the whole cache).

    `step()` does one Adam step on a fresh noise batch; `state_dict()` / `load_state_dict()` carry everything a
    resumed fit needs. `potential` is the averaged potential (the iterate before averaging starts).
    """

    BETAS = (0.9, 0.999)
    RECENT_DRAWS = 20
    """`recent_imbalance` averages the shares of about this many recent draws per point."""

    def __init__(self, points: torch.Tensor, settings: FitSettings, split: DrawSplit = DrawSplit()) -> None:
        settings.validate()
        self.points, self.settings, self.split = flatten_points(points), settings, split
        count = self.points.shape[0]
        self.iterate = translation_potential(self.points)
        self.norms = squared_norms(self.points)  # every step's cells share them
        self.average = torch.zeros_like(self.iterate)
        self.first_moment = torch.zeros_like(self.iterate)
        self.second_moment = torch.zeros_like(self.iterate)
        self.recent_shares = torch.full_like(self.iterate, 1.0 / count)
        self.step_count, self.averaged, self.scale = 0, 0, None
        self.last_dual = float("nan")
        # the points stay: one screen (or one per block) for every step
        self.screen = LaguerreCells(self.points, self.iterate.float(), settings.epsilon, norms=self.norms).screen

    @property
    def finished(self) -> bool:
        return self.step_count >= self.settings.steps

    @property
    def potential(self) -> torch.Tensor:
        """(N,) float32: the Polyak average once averaging started, else the current iterate."""
        return (self.average if self.averaged else self.iterate).float()

    @property
    def recent_imbalance(self) -> float:
        """Total variation from uniform of the shares of the last ~RECENT_DRAWS draws per point (a progress
        figure: about 0.09 from sampling noise alone when balanced; `measure_balance` gives the real one)."""
        return float(0.5 * (self.recent_shares - 1.0 / self.recent_shares.numel()).abs().sum())

    def learning_rate(self) -> float:
        """Adam's step at the current step: lr x cost scale, cosine-decayed to zero over the fit."""
        progress = self.step_count / self.settings.steps
        return self.settings.lr * self.scale * 0.5 * (1 + math.cos(math.pi * progress))

    def step(self, x0: torch.Tensor | None = None) -> None:
        """One ascent step: shares of a fresh noise batch, Adam on N * (1/N - share), then averaging.

        Args:
            x0: this step's noise batch when the caller already drew it (the class-aware fit draws it once for
                all classes); it must be `noise_for_step(seed, step_count, batch_size, dim)`.
        """
        if x0 is None:
            x0 = self.noise()
        self.advance(*self.split.counted(self.cells(x0), x0))

    def cells(self, x0: torch.Tensor) -> LaguerreCells:
        """The cells of the current iterate, for the step on noise batch x0 (the first step's batch sets the cost
        scale)."""
        if self.scale is None:
            self.scale = cost_scale(self.points, x0)
        return LaguerreCells(self.points, self.iterate.float(), self.settings.epsilon, self.screen, self.norms)

    def advance(self, shares: torch.Tensor, transport: float) -> None:
        """The step's Adam update and averaging from its batch's cell shares (N,) and mean transport cost, summed
        over every process's rows (`DrawSplit.summed`)."""
        count = self.points.shape[0]
        ascent = 1.0 - count * shares  # (N,) N x the semi-dual's gradient
        self.last_dual = transport + float(self.iterate.mean())
        decay = max(0.0, 1.0 - self.settings.batch_size / (self.RECENT_DRAWS * count))
        self.recent_shares.mul_(decay).add_(shares, alpha=1 - decay)
        self._adam(ascent)
        self.step_count += 1
        if self.step_count > int(self.settings.steps * self.settings.average_from):
            self.averaged += 1
            self.average += (self.iterate - self.average) / self.averaged

    def noise(self) -> torch.Tensor:
        """The noise batch (batch_size, D) of the current step."""
        return noise_for_step(self.settings.seed, self.step_count, self.settings.batch_size, self.points.shape[1],
                              self.points.device)

    def _adam(self, ascent: torch.Tensor) -> None:
        beta1, beta2 = self.BETAS
        self.first_moment.mul_(beta1).add_(ascent, alpha=1 - beta1)
        self.second_moment.mul_(beta2).addcmul_(ascent, ascent, value=1 - beta2)
        step = self.step_count + 1
        corrected1 = self.first_moment / (1 - beta1**step)
        corrected2 = self.second_moment / (1 - beta2**step)
        self.iterate += self.learning_rate() * corrected1 / (corrected2.sqrt() + 1e-8)
        self.iterate -= self.iterate.mean()  # g is defined up to a constant: keep it centred

    def state_dict(self) -> dict[str, torch.Tensor]:
        counters = [self.step_count, self.averaged, -1.0 if self.scale is None else self.scale]
        return {"iterate": self.iterate, "average": self.average, "first_moment": self.first_moment,
                "second_moment": self.second_moment, "recent_shares": self.recent_shares,
                "counters": torch.tensor(counters, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in ("iterate", "average", "first_moment", "second_moment", "recent_shares"):
            if state[name].shape != self.iterate.shape:
                raise LatentflowError(f"ot fit state {name} has shape {tuple(state[name].shape)}, expected "
                                      f"{tuple(self.iterate.shape)}: it belongs to another cache")
            getattr(self, name).copy_(state[name])
        step_count, averaged, scale = state["counters"].tolist()
        self.step_count, self.averaged = int(step_count), int(averaged)
        self.scale = None if scale < 0 else scale


@dataclass
class Balance:
    """How evenly noise is spread over the points by a potential, from `draws_per_point` x N noise draws.

    Attributes:
        total_variation: 0.5 sum_j |share_j - 1/N|, the share of pairings that a perfectly balanced potential
            would send elsewhere.
        sampling_floor: the total variation a perfectly balanced potential shows from this many draws alone
            (0.5 sqrt(2 / (pi m)) for m draws per point, the Poisson counts' mean absolute deviation).
        chi_square_per_dof: Pearson's chi-square against uniform counts over N - 1 (about 1 when balanced).
        max_over_mean, min_over_mean: the fullest and emptiest cell against the mean count.
        pair_cost: the draws' mean squared distance to their paired point, mean ||x - T(x)||^2.
        independent_cost: what independent pairing costs, E||x - y||^2 = D + mean_j ||y_j||^2 for x ~ N(0, I)
            and y uniform over the points: pair_cost / independent_cost is how much shorter the pairs are, the
            room a coupling has to straighten paths (in high dimensions with few points it is small).
    """

    draws_per_point: int
    total_variation: float
    sampling_floor: float
    chi_square_per_dof: float
    max_over_mean: float
    min_over_mean: float
    pair_cost: float
    independent_cost: float

    @property
    def excess(self) -> float:
        """Total variation beyond what the draws alone explain."""
        return max(0.0, self.total_variation - self.sampling_floor)


def measure_balance(cells: LaguerreCells, draws_per_point: int, seed: int, batch_size: int = 4096,
                    split: DrawSplit = DrawSplit()) -> Balance:
    """Pair draws_per_point x N fresh noise rows (seeded by `seed`) with `cells`: each point's share, and the
    pairs' mean squared distance beside independent pairing's. Under several processes (`split`) each pairs every
    world-th batch and the counts are summed (the entropic draws then differ from one process's)."""
    count = cells.points.shape[0]
    counts = torch.zeros(count + 1, dtype=torch.float64, device=cells.points.device)  # the cost summed last
    total, batch = draws_per_point * count, 0
    generator = torch.Generator(device=cells.points.device).manual_seed(seed + 1_000_003 * split.rank)
    while total > 0:
        rows = min(batch_size, total)
        if batch % split.world == split.rank:
            x0 = noise_for_step(seed, 10**9 + batch, rows, cells.points.shape[1], cells.points.device)
            paired = cells.assign(x0, generator)
            counts[:count] += torch.bincount(paired, minlength=count).double()
            counts[count] += (x0 - cells.points[paired]).square().sum(1).double().sum()
        total, batch = total - rows, batch + 1
    counts = split.reduce_sum(counts)
    counts, cost = counts[:count], float(counts[count])
    mean = counts.mean()
    return Balance(
        draws_per_point=draws_per_point,
        total_variation=float(0.5 * (counts / counts.sum() - 1.0 / count).abs().sum()),
        sampling_floor=0.5 * math.sqrt(2 / (math.pi * draws_per_point)),
        chi_square_per_dof=float(((counts - mean) ** 2 / mean).sum() / max(1, count - 1)),
        max_over_mean=float(counts.max() / mean),
        min_over_mean=float(counts.min() / mean),
        pair_cost=cost / (draws_per_point * count),
        independent_cost=cells.points.shape[1] + float(cells.norms.double().mean()),
    )
