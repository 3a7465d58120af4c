"""How short each coupling's pairs are on a latent cache: mean ||x0 - x1||^2 of independent pairs, minibatch OT
(exact, per batch, as `objective.name: otcfm` trains: across classes, the default, and within each class) and
dataset OT (a fitted `ot-fit` potential), in one run.

The room a coupling has to straighten paths is the share of the independent pairs' cost it removes. In 2D the
semidiscrete pairs cost about a third of independent ones (the lab reports it per run); among a few thousand
latents of 2,048 dimensions every noise draw is nearly as far from every latent, so no coupling can remove much.

    .venv/bin/python benchmarks/pair_costs.py CACHE [--potential aware] [--batch 64] [--batches 40]
"""

from __future__ import annotations

import argparse

import torch

from latentflow.data.cache import LatentCache
from latentflow.data.potential import load_dataset_cells
from latentflow.flow.couplings import ExactOTCoupling, mean_squared_distance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    parser.add_argument("--potential", default="aware", help="the ot-fit potential's --name")
    parser.add_argument("--batch", type=int, default=64, help="minibatch OT's batch (the demo trains with 64)")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cache = LatentCache(args.cache)
    cells = load_dataset_cells(cache, args.potential, normalized=True, random_flip=False)
    aware = cells.group_classes is not None
    points, labels = cells.points, cells.labels
    generator = torch.Generator().manual_seed(args.seed)
    minibatch = {"minibatch OT": ExactOTCoupling(), "minibatch, class": ExactOTCoupling(class_aware=True)}
    costs = {"independent": 0.0, **dict.fromkeys(minibatch, 0.0), "dataset OT": 0.0}
    for _ in range(args.batches):
        x0 = torch.randn(args.batch, *points.shape[1:], generator=generator)
        rows = torch.randint(0, points.shape[0], (args.batch,), generator=generator)
        x1, y = points[rows], None if labels is None else labels[rows]
        costs["independent"] += mean_squared_distance(x0, x1) / args.batches
        for name, coupling in minibatch.items():
            costs[name] += coupling(x0, x1, y, generator).cost / args.batches
        # dataset OT: the same noise and, class-aware, the same classes; the potential picks the latent
        costs["dataset OT"] += mean_squared_distance(x0, points[cells.pair(x0, y)]) / args.batches
    draws = args.batch * args.batches
    print(f"{cache.path}: {points.shape[0]} latents of {points[0].numel()} dimensions, potential "
          f"{args.potential!r} ({'class-aware' if aware else 'class-blind'}), {draws} noise draws, minibatch OT in "
          f"batches of {args.batch}")
    for name, cost in costs.items():
        print(f"  {name:16s} mean ||x0 - x1||^2 {cost:8.1f}  {cost / costs['independent']:.3f}x independent")
    print(f"  dataset OT / minibatch OT: {costs['dataset OT'] / costs['minibatch OT']:.3f}x; share of the "
          f"independent cost removed: minibatch {1 - costs['minibatch OT'] / costs['independent']:.3f}, dataset "
          f"{1 - costs['dataset OT'] / costs['independent']:.3f}")


if __name__ == "__main__":
    main()
