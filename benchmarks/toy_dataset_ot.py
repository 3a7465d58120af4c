"""2D lab, dataset-scale OT in one run: W2 at NFE 1 of `otcfm-dataset` (semidiscrete OT pairs of Gaussian noise
and a fixed training set of 2,000 target points) against minibatch `otcfm` (batch 256) and `cfm`.

For gaussian -> moons and gaussian -> checkerboard and each seed, the lab trains the same MLP (width, Adam at `--lr`
with cosine decay, `--steps` steps) with each objective; W2 is measured against 2,000 held-out target points as
for every lab run. otcfm-dataset also reports its potential's fit time and balance, and how its pairs compare
with the exact discrete OT of twice as many fresh draws onto the training set (agreement, mean squared pair
distance; training sets of up to 4,000 points).
Goal (issue 14): otcfm-dataset's NFE-1 W2 <= 0.8x minibatch otcfm's.

    .venv/bin/python benchmarks/toy_dataset_ot.py [--seeds 0,1,2] [--steps 5000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from latentflow.toy.lab import LabSettings, run_lab

TARGETS = ("moons", "checkerboard")
OBJECTIVES = ("cfm", "otcfm", "otcfm-dataset")


def describe(name: str, result) -> str:
    """'NAME W2 a@1, b@2, c@100 (straightness s, T s)'."""
    w2 = ", ".join(f"{value:.3f}@{k}" for k, value in result.w2.items())
    return f"{name} W2 {w2} (straightness {result.straightness:.4f}, {result.training_seconds:.0f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (cosine decay to zero)")
    parser.add_argument("--time-sampler", default=None, help="uniform (the lab's default) or logit_normal")
    parser.add_argument("--eval-samples", type=int, default=2000, help="held-out target points W2 is measured on")
    parser.add_argument("--dataset-size", type=int, default=2000, help="otcfm-dataset's training points")
    parser.add_argument("--ot-steps", type=int, default=LabSettings.ot_steps, help="the potential fit's steps")
    parser.add_argument("--ot-average-from", type=float, default=LabSettings.ot_average_from,
                        help="share of the fit's steps after which its iterates are averaged")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--nfe", default="1,2,4,100")
    parser.add_argument("--finite-data", action="store_true",
                        help="cfm and otcfm train on otcfm-dataset's fixed training points too (as from a cache)")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    args = parser.parse_args()
    targets, objectives = args.targets.split(","), args.objectives.split(",")
    nfe = tuple(int(k) for k in args.nfe.split(","))
    seeds = [int(seed) for seed in args.seeds.split(",")]
    ratios: dict[str, list[float]] = {target: [] for target in targets}
    with tempfile.TemporaryDirectory() as scratch:
        for target in targets:
            for seed in seeds:
                base = LabSettings(source="gaussian", target=target, steps=args.steps, seed=seed, nfe=nfe,
                                   width=args.width, learning_rate=args.lr, lr_schedule="cosine", workers=0,
                                   time_sampler=args.time_sampler,
                                   eval_samples=args.eval_samples, dataset_size=args.dataset_size,
                                   finite_data=args.finite_data, ot_steps=args.ot_steps,
                                   ot_average_from=args.ot_average_from)
                results = {name: run_lab(LabSettings(**{**base.__dict__, "objective": name}), Path(scratch) / name)[0]
                           for name in objectives}
                ratios[target].append(results["otcfm-dataset"].w2["1"] / results["otcfm"].w2["1"])
                row = " | ".join(describe(name, results[name]) for name in objectives)
                coupling = results["otcfm-dataset"].coupling
                floor = results["otcfm"].w2_floor
                print(f"gaussian -> {target}, seed {seed}: {row} | floor W2 {floor:.3f}", flush=True)
                exact = (f"; pairs vs exact OT of {2 * args.dataset_size:,} draws: agreement "
                         f"{coupling['exact_ot_agreement']:.3f}, mean cost {coupling['semidiscrete_cost']:.4f} vs "
                         f"{coupling['exact_ot_cost']:.4f}" if "exact_ot_agreement" in coupling else "")
                print(f"    training points' own W2 to the held-out ones {coupling['w2_training_points']:.3f}; "
                      f"potential: fit {coupling['fit_seconds']:.0f} s, balance excess "
                      f"{coupling['balance_excess']:.4f}, pairs' mean squared distance "
                      f"{coupling['pair_cost'] / coupling['independent_cost']:.3f}x independent pairs'{exact}",
                      flush=True)
    print(f"\nwidth {args.width}, lr {args.lr:g}, {args.steps} steps, seeds {seeds}, W2 on {args.eval_samples} "
          f"held-out points, otcfm-dataset on {args.dataset_size} training points (potential: {args.ot_steps} "
          f"steps, averaged from {args.ot_average_from:g} of them)"
          f"{' (the others too: --finite-data)' if args.finite_data else ''}")
    for target in targets:
        ratio = statistics.mean(ratios[target])
        print(f"gaussian -> {target}: otcfm-dataset W2@1 / otcfm W2@1 = {ratio:.2f} (goal <= 0.8: "
              f"{'met' if ratio <= 0.8 else 'not met'})")


if __name__ == "__main__":
    main()
