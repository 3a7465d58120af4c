"""How the dataset-OT potential's fit scales with the number of points: the draws per point it needs.

`latentflow ot-fit` ascends the semi-dual on fresh noise batches; each draw is scored against every point, so a fit
of d draws per point costs d N (2 N D) FLOPs, quadratic in N, if d need not grow with N. This measures d: for
subsets of a real cache's latents (N points, a seeded random subset, class-blind) it fits with d draws per point
in a fixed number of steps (batch = d N / steps: Adam needs its steps whatever the size, and a large cache's fit
wants large batches on a GPU anyway) and reports the balance (excess over the sampling floor, 100 draws per
point), the pairs' cost against independent pairing's, and the fit's seconds, so that the extrapolation in the
README (ImageNet-256: N = 1.28M, D = 4,096) rests on a measured d.

Usage:
    python benchmarks/ot_fit_scaling.py --cache runs/demo/cache --sizes 367,734,1467,2934 --draws 25,50,100,200 \
        --steps 300
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from latentflow.data.cache import LatentCache
from latentflow.data.potential import load_points
from latentflow.flow.semidiscrete import FitSettings, LaguerreCells, PotentialFit, measure_balance


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="a latent cache folder")
    parser.add_argument("--sizes", default="367,734,1467,2934", help="numbers of points, comma-separated")
    parser.add_argument("--draws", default="25,50,100,200", help="fit draws per point, comma-separated")
    parser.add_argument("--steps", type=int, default=300, help="ascent steps of every fit (ot-fit's --steps)")
    parser.add_argument("--balance-draws", type=int, default=100, help="draws per point measuring the balance")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    points = load_points(LatentCache(args.cache), normalized=True, flips=False, class_aware=False).points
    flat = points.reshape(points.shape[0], -1)
    order = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(0))
    print(f"{args.cache}: {flat.shape[0]} latents of {flat.shape[1]} dimensions; {args.steps} steps; balance from "
          f"{args.balance_draws} draws per point ({torch.get_num_threads()} threads)")
    print("points | draws per point | batch | excess | chi2/dof | emptiest | pair cost / independent | fit s")
    for size in [int(text) for text in args.sizes.split(",")]:
        subset = flat[order[:size]].contiguous()
        for draws in [int(text) for text in args.draws.split(",")]:
            batch = max(1, math.ceil(draws * size / args.steps))
            start = time.perf_counter()
            fit = PotentialFit(subset, FitSettings(steps=args.steps, batch_size=batch))
            while not fit.finished:
                fit.step()
            seconds = time.perf_counter() - start
            balance = measure_balance(LaguerreCells(subset, fit.potential), args.balance_draws, seed=1)
            print(f"{size:>6} | {draws:>4} | {batch:>6} | {balance.excess:.4f} | {balance.chi_square_per_dof:6.2f} | "
                  f"{balance.min_over_mean:.2f} | {balance.pair_cost / balance.independent_cost:.4f} | "
                  f"{seconds:6.1f}", flush=True)


if __name__ == "__main__":
    main()
