"""A latent cache's semidiscrete OT potential: fitted once over the whole cache (`latentflow ot-fit`), stored
beside it, and read by training with `objective.ot_scope: dataset` to pair every noise draw with its optimal
cached latent (the maths: `latentflow.flow.semidiscrete`).

Files, in `CACHE/ot/`:
    NAME.safetensors      `potential` (P,) float32, one value per point (points: the cache's latents in load
                          order, then their flip variants when fitted with flips), per class when class-aware
    NAME.json             the cache's fingerprint (sha256 of its manifest), the point space (normalised,
                          flips), the settings, whether the fit finished, the final dual, the balance and
                          the pairs' mean squared distance beside independent pairing's
    NAME.state.safetensors  the unfinished fit's optimiser state (removed when it finishes)
Every file is written to a temporary name and renamed, so an interrupted fit resumes from its last state.
"""

from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from latentflow.data.cache import LatentCache, cache_fingerprint
from latentflow.errors import LatentflowError, first_line, require_count
from latentflow.flow.semidiscrete import (
    Balance,
    DrawSplit,
    FitSettings,
    LaguerreCells,
    PotentialFit,
    measure_balance,
)
from latentflow.io import read_json, write_bytes_atomic, write_json_atomic
from latentflow.processes import Distributed, share_cpu_threads

FORMAT = 1
DEFAULT_NAME = "potential"
MAX_IMBALANCE = 0.05
"""The largest balance excess (total variation beyond sampling noise) training accepts: a potential within it
gives a data marginal at most 5% (in total variation) away from the cache's uniform one, about the effect of
leaving out or doubling one image in twenty; a fit that stops short of it is a fit that needs more steps."""


@dataclass
class CachePoints:
    """The points a potential is fitted over, in the model's space, ordered group by group (class-aware: class by
    class, each in load order; class-blind: load order itself), so that each group is a slice of one tensor.

    Attributes:
        points: (P', C, h, w) float32: every point (P' = P), or one process's part of every group
            (`load_points(part=...)`), group by group.
        labels: (P,) long, every point's label in group order, or None for an unlabelled cache.
        order: (P,) long, every point's place in load order (the cached means shard by shard, then their flip
            variants: the order of a potential's values in its file), in group order.
        spans: per group, its rows in `points`.
        firsts: per group, the group-order index of its first row in `points` (-1 where a part holds none).
        sizes: per group, how many points it has in all.
    """

    points: torch.Tensor
    labels: torch.Tensor | None
    order: torch.Tensor
    spans: list[slice]
    firsts: list[int]
    sizes: list[int]
    normalized: bool
    flips: bool

    @property
    def groups(self) -> list[torch.Tensor]:
        """Per group, the load-order places of the points held (every point of the group unless a part)."""
        return [self.order[first:first + span.stop - span.start] for first, span in zip(self.firsts, self.spans)]


def load_points(cache: LatentCache, normalized: bool, flips: bool, class_aware: bool,
                part: tuple[int, int] | None = None) -> CachePoints:
    """The cache's latents as OT points (see `CachePoints`), read shard by shard into one float32 tensor (the
    peak is that tensor and one shard); refuses flips or classes the cache lacks.

    Args:
        part: (rank, world): keep only part rank of world contiguous parts of every group
            (`objective.ot_dataset_on: sharded`), so a process holds 1/world of the points.
    """
    if flips and not cache.has_flip:
        raise LatentflowError(f"{cache.path}: the cache holds no flip variants; fit without --flips, or re-encode "
                              "with --flip")
    if class_aware and cache.num_classes == 0:
        raise LatentflowError(f"{cache.path}: class-aware OT needs labels, and this cache is unlabelled; fit "
                              "without --class-aware")
    count, copies = len(cache), 2 if flips else 1
    total = copies * count
    labels = cache.labels() if class_aware else None  # the groups need them before any point is read
    if labels is not None:
        labels = labels.repeat(copies)
    if class_aware:
        groups = [torch.nonzero(labels == value).flatten() for value in range(cache.num_classes)]
        groups = [group for group in groups if group.numel() > 0]
    else:
        groups = [torch.arange(total)]
    sizes = [group.numel() for group in groups]
    starts = torch.tensor([0, *sizes]).cumsum(0).tolist()
    pieces = [torch.arange(size) if part is None else torch.tensor_split(torch.arange(size), part[1])[part[0]]
              for size in sizes]
    kept = torch.cat([group[piece] for group, piece in zip(groups, pieces)])  # load places of the rows held
    firsts = [start + int(piece[0]) if piece.numel() else -1 for start, piece in zip(starts, pieces)]
    bounds = torch.tensor([0, *[piece.numel() for piece in pieces]]).cumsum(0).tolist()
    spans = [slice(low, high) for low, high in zip(bounds[:-1], bounds[1:])]
    destination = torch.full((total,), -1, dtype=torch.long)
    destination[kept] = torch.arange(kept.numel())
    points = torch.empty(kept.numel(), *cache.latent_shape, dtype=torch.float32)
    read_labels, row = [], 0
    for arrays in cache.shard_arrays():
        size = arrays.mean.shape[0]
        for variant, latents in enumerate([arrays.mean, arrays.flip_mean][:copies]):
            target = destination[variant * count + row:variant * count + row + size]
            held = target >= 0
            points[target[held]] = latents[held].float()
        read_labels.append(arrays.labels)
        row += size
    if labels is None and read_labels and read_labels[0] is not None:
        labels = torch.cat(read_labels).repeat(copies)
    if normalized:
        points.sub_(cache.channel_mean.view(1, -1, 1, 1)).div_(cache.channel_std.view(1, -1, 1, 1))
    order = torch.cat(groups)
    return CachePoints(points, None if labels is None else labels[order], order, spans, firsts, sizes, normalized,
                       flips)


@dataclass
class OTFitConfig:
    """`latentflow ot-fit` settings."""

    cache: str
    name: str = DEFAULT_NAME
    fit: FitSettings = field(default_factory=FitSettings)
    class_aware: bool = False
    flips: bool = False
    normalized: bool = True
    balance_draws: int = 100
    device: str | None = "cpu"
    save_every: int = 200
    progress: bool = True

    def validate(self) -> None:
        """Refuse settings that cannot work, before the cache is read."""
        self.fit.validate()
        potential_paths(self.cache, self.name)
        for name, value in (("balance-draws", self.balance_draws), ("save-every", self.save_every)):
            require_count(f"ot-fit --{name}", value, 1)


POTENTIAL_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
"""A potential's name: a plain file name in CACHE/ot/ (no folders, not hidden)."""


def potential_paths(cache_path: str | Path, name: str) -> tuple[Path, Path, Path]:
    """(NAME.safetensors, NAME.json, NAME.state.safetensors) in CACHE/ot/.

    Raises:
        LatentflowError: a name that is not a plain file name (it would write or read outside CACHE/ot/).
    """
    if not POTENTIAL_NAME.fullmatch(name):
        raise LatentflowError(f"OT potential name {name!r}: use letters, digits, '_', '-' and '.' (not first), no "
                              f"folders; it names CACHE/ot/NAME.*")
    folder = Path(cache_path) / "ot"
    return folder / f"{name}.safetensors", folder / f"{name}.json", folder / f"{name}.state.safetensors"


def _identity(config: OTFitConfig, cache: LatentCache) -> dict[str, Any]:
    """What a fit is of: the cache, the point space and the settings (a finished fit with these is reused)."""
    return {"format": FORMAT, "cache_fingerprint": cache_fingerprint(cache), "normalized": config.normalized,
            "flips": config.flips, "class_aware": config.class_aware, "settings": asdict(config.fit)}


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors written atomically (temporary name, then rename)."""
    write_bytes_atomic(path, save({name: tensor.contiguous().cpu() for name, tensor in tensors.items()}))


@dataclass
class OTFitResult:
    """What `fit_cache_potential` did."""

    path: Path
    already_complete: bool
    points: int
    steps_run: int
    seconds: float
    report: dict[str, Any]


class _GroupFits:
    """One `PotentialFit` per class group, stepped in turn; the state of all of them in one dict."""

    def __init__(self, points: CachePoints, settings: FitSettings, device: torch.device, split: DrawSplit) -> None:
        flat = points.points.reshape(points.points.shape[0], -1).to(device)  # each group's fit views its slice
        self.order = points.order
        self.fits = [PotentialFit(flat[span], settings, split) for span in points.spans]

    @property
    def step_count(self) -> int:
        return min(fit.step_count for fit in self.fits)

    def step(self) -> None:
        """One step of every group's fit on the same noise batch, drawn once (the groups share the seed and
        step, so each would draw this batch anyway; drawing it is a large part of a small group's step), with one
        sum over the processes for every group's counts (not one per class: ImageNet has 1,000)."""
        x0, split = self.fits[0].noise(), self.fits[0].split
        parts = [split.local_shares(fit.cells(x0), x0) for fit in self.fits]
        for fit, (shares, transport) in zip(self.fits, split.summed(parts, x0.shape[0])):
            fit.advance(shares, transport)

    def potential(self) -> torch.Tensor:
        """(P,) float32 in load order (the file's)."""
        out = torch.zeros(self.order.numel(), dtype=torch.float32)
        out[self.order] = torch.cat([fit.potential.cpu() for fit in self.fits])
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{index}.{key}": value for index, fit in enumerate(self.fits)
                for key, value in fit.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for index, fit in enumerate(self.fits):
            fit.load_state_dict({key.split(".", 1)[1]: value for key, value in state.items()
                                 if key.split(".", 1)[0] == str(index)})

    def status(self) -> dict[str, float]:
        """The mean dual value of the last step and the worst group's recent imbalance."""
        return {"dual": sum(fit.last_dual for fit in self.fits) / len(self.fits),
                "recent_imbalance": max(fit.recent_imbalance for fit in self.fits)}


def _balance_report(points: CachePoints, potential: torch.Tensor, config: OTFitConfig, device: torch.device,
                    split: DrawSplit) -> dict[str, Any]:
    """Balance of each group's cells: the worst group's figures, every group's excess, and the pairs' mean
    squared distance (with independent pairing's) over all groups."""
    flat = points.points.reshape(points.points.shape[0], -1).to(device)
    potential = potential[points.order].to(device)  # group order, as the points
    balances: list[Balance] = []
    for index, span in enumerate(points.spans):
        cells = LaguerreCells(flat[span], potential[span], config.fit.epsilon)
        balances.append(measure_balance(cells, config.balance_draws, seed=config.fit.seed + 7919 * (index + 1),
                                        split=split))
    worst = max(balances, key=lambda balance: balance.excess)
    sizes = points.sizes

    def over_groups(name: str) -> float:  # weighted by group size: a draw's class is drawn with its share
        return sum(size * getattr(balance, name) for size, balance in zip(sizes, balances)) / sum(sizes)

    return {**asdict(worst), "excess": worst.excess, "per_group_excess": [b.excess for b in balances],
            "pair_cost": over_groups("pair_cost"), "independent_cost": over_groups("independent_cost")}


def _check_existing(json_path: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The existing fit's JSON when it is of the same identity; refuse one of another cache or settings."""
    if not json_path.exists():
        return None
    existing = read_json(json_path, "OT potential record")
    if isinstance(existing.get("settings"), dict):  # a record older than a setting was fitted with its default
        existing["settings"] = {**asdict(FitSettings()), **existing["settings"]}
    mine = {key: existing.get(key) for key in identity}
    if mine != identity:
        differing = sorted(key for key in identity if existing.get(key) != identity[key])
        raise LatentflowError(f"{json_path}: a potential with other {', '.join(differing)} exists; pick another "
                              "--name, or delete it to refit")
    return existing


def fit_cache_potential(config: OTFitConfig, on_step: Callable[[int, dict[str, float]], None] | None = None
                        ) -> OTFitResult:
    """Fit (or resume, or reuse) the potential of `config.cache`; see the module docstring for the files. One
    fit at a time writes CACHE/ot/ (a second is refused, naming the first).

    Under `accelerate launch` every process holds every point on its device (`config.device` None: its own card)
    and scores its share of each step's draws (`DrawSplit`): the same fit, about world times faster; the main
    process writes the files, and a fit may resume on another process count. `on_step` runs on every process."""
    config.validate()
    cache = LatentCache(config.cache)
    dist = Distributed(config.device)
    share_cpu_threads(dist.device, dist.world_size)
    with dist.lock(cache.path / "ot", "latentflow ot-fit", "wait for it to finish"):
        result = _fit(config, cache, on_step, dist)
        dist.barrier()  # the main process's files are written before any process goes on
        return result


def _fit(config: OTFitConfig, cache: LatentCache, on_step: Callable[[int, dict[str, float]], None] | None,
         dist: Distributed) -> OTFitResult:
    start = time.perf_counter()
    identity = _identity(config, cache)
    potential_path, json_path, state_path = potential_paths(cache.path, config.name)
    existing = _check_existing(json_path, identity)
    if existing is not None and existing.get("finished") and potential_path.exists():
        try:
            _potential_values(potential_path, int(existing["points"]))
            return OTFitResult(potential_path, True, int(existing["points"]), 0, 0.0, existing)
        except LatentflowError as error:  # a damaged file of a finished fit: the same settings fit it again
            print(f"ot-fit: {error}; fitting it again", file=sys.stderr)
    points = load_points(cache, config.normalized, config.flips, config.class_aware)
    split = DrawSplit(dist.rank, dist.world_size, dist.reduce_sum)
    fits = _GroupFits(points, config.fit, dist.device, split)
    if state_path.exists() and existing is not None and not existing.get("finished"):
        try:
            fits.load_state_dict(_read_tensors(state_path))
        except LatentflowError as error:
            print(f"ot-fit: {error}; starting the fit over", file=sys.stderr)
            fits = _GroupFits(points, config.fit, dist.device, split)
    first, main = fits.step_count, dist.rank == 0
    while fits.step_count < config.fit.steps:
        fits.step()
        if on_step is not None:
            on_step(fits.step_count, fits.status())
        if main and fits.step_count % config.save_every == 0 and fits.step_count < config.fit.steps:
            _save_state(fits, identity, points, state_path, json_path)
    potential = fits.potential()
    report = {**identity, "points": points.points.shape[0], "dim": int(points.points[0].numel()),
              "groups": points.sizes, "finished": True,
              "step": fits.step_count, **fits.status(),
              "balance": _balance_report(points, potential, config, dist.device, split),
              "fit_seconds": time.perf_counter() - start, "device": str(dist.device), "processes": dist.world_size}
    if main:
        _save_tensors(potential_path, {"potential": potential})
        write_json_atomic(json_path, report)
        state_path.unlink(missing_ok=True)
    return OTFitResult(potential_path, False, points.points.shape[0], fits.step_count - first,
                       time.perf_counter() - start, report)


def _save_state(fits: _GroupFits, identity: dict[str, Any], points: CachePoints, state_path: Path,
                json_path: Path) -> None:
    """The unfinished fit's state, then its record (so a record never points at a missing state)."""
    _save_tensors(state_path, fits.state_dict())
    write_json_atomic(json_path, {**identity, "points": points.points.shape[0], "finished": False,
                                  "step": fits.step_count, **fits.status()})


@dataclass
class DatasetCells:
    """A fitted potential ready to pair: one `LaguerreCells` per group, and the point labels.

    Attributes:
        cells: per group (class-aware: per class id in `group_classes`), cells over its points.
        group_index: per group, (P_g,) indices of its points among all points.
        group_classes: the class id of each group (class-aware), else None.
        points: (P, C, h, w) all points, ordered group by group (each group's cells view its slice); labels (P,)
            or None and potential (P,) in the same order.
        record: the fit's JSON.
        screen: the cells' hard pairing may be screened in bfloat16 (built per device where it pays).
        null: the class-blind cells the null class's rows pair with (`objective.ot_null_potential`), or None.
    """

    cells: list[LaguerreCells]
    group_index: list[torch.Tensor]
    group_classes: list[int] | None
    points: torch.Tensor
    labels: torch.Tensor | None
    potential: torch.Tensor
    record: dict[str, Any]
    screen: bool = True
    null: "DatasetCells | None" = None

    def pair(self, x0: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator | None = None
             ) -> torch.Tensor:
        """(B,) indices into `points` of the data paired with noise x0 (B, C, h, w); class-aware: within each
        row's class from `labels` (B,)."""
        if self.group_classes is None:
            return self.group_index[0][self.cells[0].assign(x0, generator)]
        if labels is None:
            raise LatentflowError("a class-aware OT potential needs the batch's labels; the cache gave none")
        out = torch.empty(x0.shape[0], dtype=torch.long, device=x0.device)
        labels = labels.to(x0.device)
        for cells, index, value in zip(self.cells, self.group_index, self.group_classes):
            rows = torch.nonzero(labels == value).flatten()
            if rows.numel():
                out[rows] = index[cells.assign(x0[rows], generator)]
        return out

    def to(self, device: torch.device | str, screen: bool | None = None) -> "DatasetCells":
        """The same cells with every tensor on `device` (pairing on the training device), screened there where it
        pays if `screen` (None: as these cells)."""
        screen = self.screen if screen is None else screen
        points, potential = self.points.to(device), self.potential.to(device)
        flat = points.reshape(points.shape[0], -1)  # one copy on the device; each group's cells view a slice
        spans = [slice(int(index[0]), int(index[-1]) + 1) for index in self.group_index]
        cells = [LaguerreCells(flat[span], potential[span], old.epsilon, screen)
                 for span, old in zip(spans, self.cells)]
        labels = None if self.labels is None else self.labels.to(device)
        null = None if self.null is None else self.null.to(device, screen)
        return DatasetCells(cells, [index.to(device) for index in self.group_index], self.group_classes,
                            points, labels, potential, self.record, screen, null)

    def shard(self, rank: int, world: int, device: torch.device | str, screen: bool | None = None) -> "CellShard":
        """This process's share of the cells for `objective.ot_dataset_on: sharded`: part `rank` of `world`
        contiguous parts of every group, copied to `device` (screened there where it pays if `screen`; None: as
        these cells), so that these cells' full points can be let go."""
        screen = self.screen if screen is None else screen
        flat = self.points.reshape(self.points.shape[0], -1)
        cells, firsts = [], []
        for index, old in zip(self.group_index, self.cells):
            part = torch.tensor_split(index, world)[rank]  # contiguous: each group's points are a span
            if part.numel() == 0:  # a group of fewer points than processes
                cells.append(None)
                firsts.append(-1)
                continue
            span = slice(int(part[0]), int(part[-1]) + 1)
            cells.append(LaguerreCells(flat[span].to(device, copy=True), self.potential[span].to(device, copy=True),
                                       old.epsilon, screen))
            firsts.append(span.start)
        labels = None if self.labels is None else self.labels.to(device)
        return CellShard(cells, firsts, self.group_classes, labels, self.record)


@dataclass
class CellShard:
    """One process's share of a fitted potential (`objective.ot_dataset_on: sharded`; build with
    `DatasetCells.shard`): every group's points split into contiguous parts, one per process, so that a cache
    larger than one device's memory pairs exactly; `latentflow.train.pairing.sharded_dataset_pairing` merges the
    processes' choices.

    Attributes:
        cells: per group, cells over this process's part of the group (None where the part is empty: a group of
            fewer points than processes).
        firsts: per group, the index among all points (`DatasetCells.points`' order) of the part's first point.
        group_classes: the class id of each group (class-aware), else None.
        labels: (P,) every point's label (small beside the points; a pair takes its point's), or None.
        record: the fit's JSON.
    """

    cells: list[LaguerreCells | None]
    firsts: list[int]
    group_classes: list[int] | None
    labels: torch.Tensor | None
    record: dict[str, Any]

    def best(self, flat: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This share's choice for flat noise rows (B, D) (class-aware: within each row's class from `labels`
        (B,)): its value (B,) (`LaguerreCells.drawn_min`; inf where this share holds no point of the row's class),
        its index among all points (B,) (-1 there) and the point itself (B, D) (zeros there)."""
        if self.group_classes is not None and labels is None:
            raise LatentflowError("a class-aware OT potential needs the batch's labels; the cache gave none")
        values = torch.full((flat.shape[0],), math.inf, dtype=flat.dtype, device=flat.device)
        index = torch.full((flat.shape[0],), -1, dtype=torch.long, device=flat.device)
        chosen = torch.zeros_like(flat)
        for group, (cells, first) in enumerate(zip(self.cells, self.firsts)):
            if cells is None:
                continue
            if self.group_classes is None:
                rows = torch.arange(flat.shape[0], device=flat.device)
            else:
                rows = torch.nonzero(labels.to(flat.device) == self.group_classes[group]).flatten()
            if rows.numel():
                values[rows], local = cells.drawn_min(flat[rows], generator)
                index[rows], chosen[rows] = first + local, cells.points[local]
        return values, index, chosen


def read_potential_record(cache: LatentCache, name: str) -> tuple[dict[str, Any], torch.Tensor]:
    """The finished fit's JSON and potential (P,), checked against `cache`; errors name the file and the fix."""
    potential_path, json_path, _ = potential_paths(cache.path, name)
    refit = f"run `latentflow ot-fit {cache.path}" + ("" if name == DEFAULT_NAME else f" --name {name}") + "`"
    if not json_path.exists() or not potential_path.exists():
        raise LatentflowError(f"{json_path.parent / name}: no OT potential for this cache; {refit}")
    record = read_json(json_path, "OT potential record")
    if not record.get("finished"):
        raise LatentflowError(f"{json_path}: the fit is unfinished (step {record.get('step')}); {refit} to finish it")
    if record.get("cache_fingerprint") != cache_fingerprint(cache):
        raise LatentflowError(f"{json_path}: fitted on another cache (the manifest changed since); {refit} again")
    try:
        potential = _potential_values(potential_path, int(record["points"]))
    except LatentflowError as error:
        raise LatentflowError(f"{error}; {refit} again") from None
    return record, potential


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; a truncated or foreign file is a LatentflowError naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise LatentflowError(f"{path}: unreadable ({first_line(error)})") from error


def _potential_values(path: Path, points: int) -> torch.Tensor:
    """The (points,) finite potential in `path`, else a LatentflowError naming the file and what is wrong."""
    potential = _read_tensors(path).get("potential")
    if potential is None or potential.shape != (points,):
        raise LatentflowError(f"{path}: no potential of {points} values")
    if not torch.isfinite(potential).all():
        raise LatentflowError(f"{path}: the potential holds NaN or infinite values")
    return potential


def _checked_potential(cache: LatentCache, name: str, normalized: bool, random_flip: bool, max_imbalance: float
                       ) -> tuple[dict[str, Any], torch.Tensor]:
    """`read_potential_record`, and checked for this training setup: the point space (normalisation, flips)
    training uses, and a balance excess within `max_imbalance`."""
    record, potential = read_potential_record(cache, name)
    where = f"{potential_paths(cache.path, name)[1]}"
    if bool(record["normalized"]) != normalized:
        raise LatentflowError(f"{where}: fitted on {'normalised' if record['normalized'] else 'raw'} latents but "
                              f"data.normalize is {str(normalized).lower()}; refit, or set data.normalize: "
                              f"{str(bool(record['normalized'])).lower()}")
    if random_flip and cache.has_flip and not record["flips"]:
        raise LatentflowError(f"{where}: fitted without the flip variants that data.random_flip draws; refit with "
                              "--flips, or set data.random_flip: false")
    excess = float(record["balance"]["excess"])
    if not math.isfinite(excess) or excess > max_imbalance:
        raise LatentflowError(f"{where}: balance excess {excess:.3f} is above {max_imbalance} (noise is not spread "
                              "evenly over the cache); refit with more --steps or a larger --batch")
    return record, potential


def _group_classes(points: CachePoints, record: dict[str, Any]) -> list[int] | None:
    """The class of each group of a class-aware potential's points, else None."""
    if not record["class_aware"]:
        return None
    starts = torch.tensor([0, *points.sizes[:-1]]).cumsum(0).tolist()
    return [int(points.labels[start]) for start in starts]


def load_dataset_cells(cache: LatentCache, name: str, normalized: bool, random_flip: bool,
                       max_imbalance: float = MAX_IMBALANCE, screen: bool = True) -> DatasetCells:
    """The potential `name` of `cache`, checked for this training setup, as `DatasetCells` (whose hard pairing
    is screened in bfloat16 where that pays, unless `screen` is False: `LaguerreCells.screen`).

    Raises:
        LatentflowError: no potential, an unfinished one, one of another cache, NaN values, another point space
            (normalisation, flips) than training uses, or a balance excess above `max_imbalance`.
    """
    record, potential = _checked_potential(cache, name, normalized, random_flip, max_imbalance)
    points = load_points(cache, bool(record["normalized"]), bool(record["flips"]), bool(record["class_aware"]))
    potential = potential[points.order]  # group order, as the points: each group's cells view a slice
    flat = points.points.reshape(points.points.shape[0], -1)
    epsilon = float(record["settings"]["epsilon"])
    cells = [LaguerreCells(flat[span], potential[span], epsilon, screen) for span in points.spans]
    group_index = [torch.arange(span.start, span.stop) for span in points.spans]
    return DatasetCells(cells, group_index, _group_classes(points, record), points.points, points.labels, potential,
                        record, screen)


def load_cell_shard(cache: LatentCache, name: str, normalized: bool, random_flip: bool, rank: int, world: int,
                    device: torch.device | str, max_imbalance: float = MAX_IMBALANCE, screen: bool = True
                    ) -> CellShard:
    """`load_dataset_cells(...).shard(rank, world, device, screen)`, reading only this process's part of the
    points from the cache (a process holds 1/world of them on the host too, not all of them first)."""
    record, potential = _checked_potential(cache, name, normalized, random_flip, max_imbalance)
    points = load_points(cache, bool(record["normalized"]), bool(record["flips"]), bool(record["class_aware"]),
                         part=(rank, world))
    potential = potential[points.order]
    flat = points.points.reshape(points.points.shape[0], -1)
    epsilon = float(record["settings"]["epsilon"])
    cells = [None if first < 0 else
             LaguerreCells(flat[span].to(device), potential[first:first + span.stop - span.start].to(device),
                           epsilon, screen)
             for span, first in zip(points.spans, points.firsts)]
    labels = None if points.labels is None else points.labels.to(device)
    return CellShard(cells, points.firsts, _group_classes(points, record), labels, record)
