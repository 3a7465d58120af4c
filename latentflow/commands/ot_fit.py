"""`latentflow ot-fit`: fit the semidiscrete OT potential between N(0, I) and a whole latent cache, so training
with `objective.ot_scope: dataset` pairs each noise draw with its optimal cached latent. Under `accelerate launch
--multi_gpu --num_processes W -m latentflow.cli ot-fit ...` the W processes split every step's draws (the same
potential, about W times faster)."""

from __future__ import annotations

import argparse
import sys

from latentflow.commands import HelpFormatter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ot-fit options."""
    from latentflow.flow.semidiscrete import FitSettings

    defaults = FitSettings()
    parser.add_argument("cache", help="latent cache folder (manifest.json); the potential goes to CACHE/ot/")
    parser.add_argument("--name", default="potential", help="potential name (CACHE/ot/NAME.*), e.g. one per setting")
    parser.add_argument("--epsilon", type=float, default=defaults.epsilon,
                        help="entropic blur in cost units; 0 (default) is the hard assignment")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="ascent steps (per class if class-aware)")
    parser.add_argument("--batch", type=int, default=defaults.batch_size, help="fresh noise draws per step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="Adam's first step, in units of the costs' "
                        "typical spread (cosine-decayed)")
    parser.add_argument("--average-from", type=float, default=defaults.average_from,
                        help="share of the steps after which the iterates are averaged (1: the final iterate)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the noise draws")
    parser.add_argument("--class-aware", action="store_true", help="one potential per class (pairs within a class)")
    parser.add_argument("--flips", action="store_true", help="include the cache's flip variants as points")
    parser.add_argument("--raw", dest="normalized", action="store_false",
                        help="fit on raw latents (default: normalised as data.normalize: true trains on them)")
    parser.add_argument("--balance-draws", type=int, default=100, help="noise draws per point to measure balance")
    parser.add_argument("--device", default=None, help="default: cuda if present (under accelerate launch: each "
                        "process its own card), else cpu")
    parser.add_argument("--save-every", type=int, default=200, help="steps between resumable saves")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _warn_if_unbalanced(excess: float, steps: int) -> None:
    """Say at once when training would refuse the potential (its balance excess above what it accepts)."""
    from latentflow.data.potential import MAX_IMBALANCE

    if not excess <= MAX_IMBALANCE:
        print(f"warning: balance excess {excess:.3f} is above the {MAX_IMBALANCE} training accepts "
              f"(objective.ot_max_imbalance), so training refuses this potential: fit it longer under another "
              f"--name (more --steps; this fit ran {steps})", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    import os

    from tqdm.auto import tqdm

    from latentflow.data.potential import OTFitConfig, fit_cache_potential
    from latentflow.flow.semidiscrete import FitSettings

    settings = FitSettings(steps=args.steps, batch_size=args.batch, epsilon=args.epsilon, lr=args.lr, seed=args.seed,
                           average_from=args.average_from)
    config = OTFitConfig(cache=args.cache, name=args.name, fit=settings, class_aware=args.class_aware,
                         flips=args.flips, normalized=args.normalized, balance_draws=args.balance_draws,
                         device=args.device, save_every=args.save_every, progress=args.progress)
    main = int(os.environ.get("RANK", "0")) == 0  # under accelerate launch: the first process reports
    bars = []  # opened at the first step, so that an error in the cache or settings prints on a line of its own

    def on_step(step: int, status: dict[str, float]) -> None:
        if not bars:
            bars.append(tqdm(total=args.steps, desc="ot-fit", disable=not (args.progress and main)))
        bar = bars[0]
        bar.n = step
        bar.set_postfix(dual=f"{status['dual']:.4g}", imbalance=f"{status['recent_imbalance']:.3f}", refresh=False)
        bar.update(0)

    result = fit_cache_potential(config, on_step)
    for bar in bars:
        bar.close()
    if not main:
        return 0
    balance = result.report["balance"]
    if result.already_complete:
        print(f"{result.path}: complete, nothing to do ({result.points} points)")
        _warn_if_unbalanced(balance["excess"], settings.steps)
        return 0
    processes = result.report["processes"]
    print(f"{result.path}: {result.points} points, {result.steps_run} steps in {result.seconds:.1f} s"
          f"{f' on {processes} processes' if processes > 1 else ''}; balance: "
          f"total variation {balance['total_variation']:.4f} (sampling floor {balance['sampling_floor']:.4f}, "
          f"excess {balance['excess']:.4f}), fullest cell {balance['max_over_mean']:.2f}x, emptiest "
          f"{balance['min_over_mean']:.2f}x the mean; pairs: mean squared distance {balance['pair_cost']:.4g}, "
          f"{balance['pair_cost'] / balance['independent_cost']:.3f}x independent pairing's "
          f"{balance['independent_cost']:.4g}")
    _warn_if_unbalanced(balance["excess"], settings.steps)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ot-fit", help="fit the dataset-scale OT potential of a latent cache",
                                   description=__doc__,
                                   formatter_class=HelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)
