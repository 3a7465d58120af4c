"""Pairing noise with latents for a training step: in the loader workers (local OT, independent, the stored
couplings of a reflow cache, or dataset OT against the whole cache's fitted potential) or across processes
(global OT), with label dropout for classifier-free guidance; the per-batch seeds that make a resumed run draw
exactly what an uninterrupted one would."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from latentflow.errors import LatentflowError
from latentflow.flow.couplings import Pairing, mean_squared_distance
from latentflow.flow.objectives import Objective, TrainingBatch

if TYPE_CHECKING:
    from latentflow.data.cache import LatentCache
    from latentflow.data.potential import CellShard, DatasetCells
    from latentflow.train.config import Config


def seed_for(*parts: int) -> int:
    """A deterministic 63-bit seed mixed from integers."""
    data = np.asarray(parts, dtype=np.int64).tobytes()
    return (zlib.crc32(data) << 31 | zlib.crc32(data[::-1])) & (2**63 - 1)


def drop_labels(
    labels: torch.Tensor | None, probability: float, null_class: int, generator: torch.Generator
) -> torch.Tensor | None:
    """Replace each label by the null class with `probability` (classifier-free guidance training)."""
    if labels is None or probability <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator) < probability  # (B,)
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_class), labels)


def batch_key(batch: dict[str, Any]) -> int:
    """A deterministic key for a loader batch: its index if the loader gives one, else a checksum."""
    if "batch_index" in batch:
        return int(batch["batch_index"])
    return zlib.crc32(batch["latents"].detach().cpu().contiguous().numpy().tobytes())


class PairingTransform:
    """The loader's `batch_transform`: pairs noise with latents in the loader workers.

    With `pair=True` it returns a prepared `TrainingBatch` (noise drawn, OT pairing, times,
    x_t, target, label dropout); with `pair=False` (global OT) it returns the batch dict
    untouched apart from a `seed` entry, and pairing happens in the step across processes.
    Randomness comes from the loader's per-batch generator (seeded by seed, rank and batch
    index; or, called without one, from a generator seeded by seed, rank and the batch's
    index or checksum), so a resumed run draws exactly what an uninterrupted one would.
    With `keep_endpoints=False` the prepared batch leaves x0 and x1 out (None): the step
    needs only x_t, t, target and labels, and two fewer tensors cross from the worker.
    With `stored_noise=True` (`objective.coupling: stored`) the batch's `noise` (B, ...),
    stored by `latentflow reflow` with each latent, is the x0 of its pair instead of a draw.
    With `dataset_cells` (`objective.ot_scope: dataset`) every noise draw is paired with its optimal point of the
    whole cache (`latentflow.data.potential.DatasetCells`): the batch gives only its size and, for a class-aware
    potential, the class each noise row is drawn for.
    """

    def __init__(
        self, objective: Objective, seed: int, rank: int, num_classes: int, label_dropout: float, pair: bool,
        keep_endpoints: bool = True, stored_noise: bool = False, dataset_cells: "DatasetCells | None" = None,
    ) -> None:
        self.objective, self.seed, self.rank = objective, seed, rank
        self.num_classes, self.label_dropout, self.pair = num_classes, label_dropout, pair
        self.keep_endpoints, self.stored_noise, self.dataset_cells = keep_endpoints, stored_noise, dataset_cells

    def __call__(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> TrainingBatch | dict[str,
                                                                                                                Any]:
        if generator is None:
            generator = torch.Generator().manual_seed(seed_for(self.seed, self.rank, batch_key(batch)))
        labels = batch.get("labels") if self.num_classes > 0 else None
        if not self.pair:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            return {"latents": batch["latents"], "labels": labels, "seed": seed}
        if self.dataset_cells is not None:
            x0 = torch.randn(batch["latents"].shape, generator=generator)  # (B, C, h, w)
            prepared = pair_with_dataset(self.dataset_cells, x0, labels, self.objective, self.label_dropout,
                                         self.num_classes, generator)
        else:
            prepared = self.objective.prepare(batch["latents"], labels, generator, noise=self._noise(batch))
            prepared.labels = drop_labels(prepared.labels, self.label_dropout, self.num_classes, generator)
        if not self.keep_endpoints:
            prepared.x0 = prepared.x1 = None
        return prepared

    def _noise(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The stored x0 (B, ...) of the batch's pairs, or None to draw it."""
        if not self.stored_noise:
            return None
        if batch.get("noise") is None:
            raise LatentflowError("objective.coupling 'stored': the batch has no stored noise; train on a couplings "
                                  "cache from `latentflow reflow`")
        return batch["noise"]


def check_coupling(config: "Config", cache: "LatentCache") -> None:
    """Refuse, before any step, a `objective.coupling: stored` run that its cache cannot serve: a cache without
    stored noise, posterior sampling from a cache with stds, or latents normalised otherwise than the teacher's
    (the noise is in the teacher's model space). A couplings cache trained with 'sampled' is fine (its noise is
    ignored); the cache-free checks are in `validate_config`.

    Raises:
        LatentflowError: naming the setting and the fix.
    """
    if config.objective.coupling != "stored":
        return
    where = f"objective.coupling 'stored' on data.cache {cache.path}"
    if not cache.has_noise:
        raise LatentflowError(f"{where}: the cache stores no noise (not a couplings cache); make one with "
                              "`latentflow reflow`, or use objective.coupling: sampled")
    if config.data.sample_posterior and cache.has_std:
        raise LatentflowError(f"{where}: the cache has posterior stds, and a resampled latent is not the noise's "
                              "endpoint; set data.sample_posterior: false")
    normalized = (cache.manifest.get("couplings") or {}).get("normalized")
    if normalized is not None and bool(config.data.normalize) != normalized:
        raise LatentflowError(f"{where}: the teacher {'normalised' if normalized else 'did not normalise'} its "
                              f"latents, so its noise pairs with {'normalised' if normalized else 'raw'} endpoints; "
                              f"set data.normalize: {str(normalized).lower()}")


def dataset_pairing(cells: "DatasetCells", x0: torch.Tensor, labels: torch.Tensor | None,
                    generator: torch.Generator | None = None, null_rows: torch.Tensor | None = None) -> Pairing:
    """Noise x0 (B, ...) paired row by row with its optimal point of the whole cache (`objective.ot_scope:
    dataset`; within the row's class from `labels` (B,) for a class-aware potential); the pairs' labels are the
    points' own. The rows in `null_rows` (B,) bool, those whose label training drops, pair with `cells.null`
    instead (over the whole cache; their x1_index is into its points)."""
    index = cells.pair(x0, labels, generator)  # (B,)
    x1 = cells.points[index]
    point_labels = None if labels is None or cells.labels is None else cells.labels[index]
    if null_rows is not None and cells.null is not None:
        rows = torch.nonzero(null_rows.to(x0.device)).flatten()
        if rows.numel():
            index[rows] = cells.null.pair(x0[rows], None, generator)
            x1[rows] = cells.null.points[index[rows]]
            if point_labels is not None and cells.null.labels is not None:
                point_labels[rows] = cells.null.labels[index[rows]]
    rows = torch.arange(x0.shape[0], device=x0.device)
    return Pairing(x0, x1, point_labels, rows, index, mean_squared_distance(x0, x1))


def pair_with_dataset(cells: "DatasetCells", x0: torch.Tensor, labels: torch.Tensor | None, objective: Objective,
                      label_dropout: float, null_class: int, generator: torch.Generator) -> TrainingBatch:
    """The training batch of noise x0 (B, ...) paired over the whole cache (`dataset_pairing`), with labels
    dropped to `null_class` at rate `label_dropout`. With `cells.null` (`objective.ot_null_potential`) the rows
    to drop are drawn first and pair through it; without, after the path (the order every earlier run drew in)."""
    if cells.null is None or labels is None:
        return paired_batch(dataset_pairing(cells, x0, labels, generator), objective, label_dropout, null_class,
                            generator)
    drop = torch.rand(labels.shape, generator=generator) < label_dropout  # (B,)
    pairing = dataset_pairing(cells, x0, labels, generator, drop)
    batch = objective.prepare_paired(pairing, generator)
    batch.labels = torch.where(drop.to(batch.labels.device), null_class, batch.labels)
    batch.ot_cost = pairing.cost
    return batch


def paired_batch(pairing: Pairing, objective: Objective, label_dropout: float, null_class: int,
                 generator: torch.Generator) -> TrainingBatch:
    """The training batch of dataset-OT pairs: the objective's path, labels dropped to `null_class` at rate
    `label_dropout` after it, and the pairs' cost."""
    batch = objective.prepare_paired(pairing, generator)
    batch.labels = drop_labels(batch.labels, label_dropout, null_class, generator)
    batch.ot_cost = pairing.cost
    return batch


def sharded_dataset_pairing(shard: "CellShard", x0: torch.Tensor, labels: torch.Tensor | None,
                            gather: Callable[[torch.Tensor], torch.Tensor],
                            reduce_sum: Callable[[torch.Tensor], torch.Tensor], rank: int,
                            generator: torch.Generator | None = None) -> Pairing:
    """`dataset_pairing` with the points sharded across the W processes (`objective.ot_dataset_on: sharded`).

    Every process gathers the global batch's noise (W*b rows) and labels, finds its share's choice for every
    row (`CellShard.best`), and gathers the shares' values; a row goes to the share of lowest value (the lowest
    rank on a tie), which is the choice over all points: for the hard pairing the same argmin as one process
    holding every point (up to ties within float32's rounding), for the entropic one a draw from the same
    softmax (each share's Gumbel noise from its process's `generator`). The chosen latents reach the processes
    that drew their noise by one sum over processes of (W*b, D), zero but for the rows each share won. Per
    process: 2 (W b) (P / W) D FLOPs, as one process pairing its b rows against all P points, for 1/W of the
    points' memory. Every process must call it for every micro-batch, with the same b.

    Args:
        x0: (b, ...) this process's noise.
        labels: (b,) the class each row is drawn for, or None.
        gather: concatenates a tensor over processes along dim 0 (`Accelerator.gather`).
        reduce_sum: sums a tensor over processes (`Accelerator.reduce(t, "sum")`).
    """
    local = x0.shape[0]
    flat = x0.reshape(local, -1)
    flat_all = gather(flat.contiguous())  # (W*b, D)
    labels_all = None if labels is None else gather(labels.contiguous())
    values, index, chosen = shard.best(flat_all, labels_all, generator)
    world = flat_all.shape[0] // local
    choices = gather(torch.stack([values.double(), index.double()], dim=1))  # (W*W*b, 2), both exact in float64
    choices = choices.view(world, -1, 2)
    winner = choices[..., 0].argmin(dim=0)  # (W*b,) the first minimum: the lowest rank on ties
    global_index = choices[..., 1].gather(0, winner.unsqueeze(0)).squeeze(0).long()  # (W*b,)
    chosen[winner != rank] = 0.0
    x1_all = reduce_sum(chosen)  # (W*b, D): each row from the one share that won it
    rows = slice(rank * local, (rank + 1) * local)
    x1, point = x1_all[rows].view_as(x0), global_index[rows]
    point_labels = None if labels is None or shard.labels is None else shard.labels[point]
    return Pairing(x0, x1, point_labels, torch.arange(local, device=x0.device), point, mean_squared_distance(x0, x1))


def dataset_cells_for(config: "Config", cache: "LatentCache",
                      shard: tuple[int, int, torch.device] | None = None) -> "DatasetCells | CellShard | None":
    """The cache's fitted potential for `objective.ot_scope: dataset` (None for other scopes), checked before
    any step: present, finished, of this cache, finite, balanced, fitted in the space training uses, and class-
    aware exactly when `objective.class_aware` is. With `shard` (rank, world, device) (`ot_dataset_on:
    sharded`): this process's `CellShard`, read from the cache alone.

    Raises:
        LatentflowError: naming the potential file and the fix.
    """
    from latentflow.data.potential import load_cell_shard, load_dataset_cells

    objective = config.objective
    if objective.ot_scope != "dataset":
        return None
    on_loader = objective.ot_dataset_on == "loader"  # else the trainer moves or shards the cells, screening there
    if shard is not None:
        cells = load_cell_shard(cache, objective.ot_potential, config.data.normalize, config.data.random_flip,
                                *shard, objective.ot_max_imbalance, objective.ot_screen)
    else:
        cells = load_dataset_cells(cache, objective.ot_potential, config.data.normalize, config.data.random_flip,
                                   objective.ot_max_imbalance, objective.ot_screen and on_loader)
    if bool(cells.record["class_aware"]) != objective.class_aware:
        fitted = "class-aware" if cells.record["class_aware"] else "class-blind"
        raise LatentflowError(f"objective.ot_potential {objective.ot_potential!r} of {cache.path} is {fitted} but "
                              f"objective.class_aware is {str(objective.class_aware).lower()}; refit "
                              f"{'without' if cells.record['class_aware'] else 'with'} --class-aware, or set "
                              f"objective.class_aware: {str(bool(cells.record['class_aware'])).lower()}")
    if objective.ot_null_potential is not None:
        cells.null = load_dataset_cells(cache, objective.ot_null_potential, config.data.normalize,
                                        config.data.random_flip, objective.ot_max_imbalance,
                                        objective.ot_screen and on_loader)
        if cells.null.record["class_aware"]:
            raise LatentflowError(f"objective.ot_null_potential {objective.ot_null_potential!r} of {cache.path} is "
                                  "class-aware, and the null class's rows pair over the whole cache; fit a "
                                  f"class-blind one: latentflow ot-fit {cache.path} --name NAME (no --class-aware)")
    return cells


@dataclass
class GlobalPairing:
    """This process's share of one OT plan solved for the global batch.

    Attributes:
        pairing: the local pairs (x0 drawn on any process, x1 this process's data).
        noise_index: (b,) rows of the gathered global noise paired with this process's rows.
        global_cost: mean squared pair distance over the whole global batch.
    """

    pairing: Pairing
    noise_index: torch.Tensor
    global_cost: float


def global_ot_pairing(
    x1: torch.Tensor,
    labels: torch.Tensor | None,
    coupling: Callable[..., Pairing],
    gather: Callable[[torch.Tensor], torch.Tensor],
    rank: int,
    noise_generator: torch.Generator,
    plan_generator: torch.Generator,
) -> GlobalPairing:
    """Gather noise and latents from all processes, solve one plan, keep this process's pairs.

    Every process draws its own noise (b, ...), all noise and data are gathered to
    (W*b, ...), and each process solves the same plan (same inputs, same `plan_generator`
    seed everywhere) and keeps the pairs at rows rank*b:(rank+1)*b. For exact OT the plan
    is a permutation sorted by data row, so each process keeps its own data and receives
    a distinct share of the global noise.
    """
    local = x1.shape[0]
    x0 = torch.randn(x1.shape, generator=noise_generator, dtype=x1.dtype).to(x1.device)  # (b, ...)
    x0_all, x1_all = gather(x0.contiguous()), gather(x1.contiguous())  # (W*b, ...)
    labels_all = gather(labels.contiguous()) if labels is not None else None
    plan = coupling(x0_all, x1_all, labels_all, plan_generator)
    rows = slice(rank * local, (rank + 1) * local)
    pair_x0, pair_x1 = plan.x0[rows], plan.x1[rows]
    cost = float((pair_x0 - pair_x1).flatten(1).float().square().sum(1).mean())
    pairing = Pairing(
        x0=pair_x0, x1=pair_x1, labels=None if plan.labels is None else plan.labels[rows],
        x0_index=plan.x0_index[rows], x1_index=plan.x1_index[rows], cost=cost,
    )
    return GlobalPairing(pairing, plan.x0_index[rows], plan.cost)
