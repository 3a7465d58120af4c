"""`latentflow reflow`: store a teacher's (noise, endpoint) couplings as a latent cache, to train a 2-rectified
flow on them (`objective.coupling: stored`)."""

from __future__ import annotations

import argparse
import sys

from latentflow.commands import HelpFormatter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The reflow options."""
    parser.add_argument("teacher", help="pipeline folder (model_index.json) or finished training run folder")
    parser.add_argument("--n", type=int, required=True, help="number of couplings (indices 0..n-1)")
    parser.add_argument("--out", required=True, help="couplings cache folder (new, or one to resume or extend)")
    parser.add_argument("--solver", default="dopri5", help="torchdiffeq method (euler, midpoint, rk4, dopri5, ...)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps of a fixed-step solver (default: the pipeline's; an adaptive one picks its own)")
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance of the teacher")
    parser.add_argument("--batch-size", type=int, default=64, help="couplings per pipeline call")
    parser.add_argument("--seed", type=int, default=0, help="sample i's noise comes from a generator seeded (seed, i)")
    parser.add_argument("--shard-size", type=int, default=1000, help="couplings per shard")
    parser.add_argument("--device", default=None, help="default: the accelerate device, else cuda if present, else cpu")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from latentflow.reflow import ReflowConfig, make_couplings

    config = ReflowConfig(teacher=args.teacher, n=args.n, out=args.out, solver=args.solver, steps=args.steps,
                          guidance_scale=args.guidance_scale, batch_size=args.batch_size, seed=args.seed,
                          shard_size=args.shard_size, device=args.device, progress=args.progress,
                          command=getattr(args, "command_line", sys.argv))
    result = make_couplings(config)
    if result.already_complete:
        print(f"{result.out}: complete, nothing to do ({result.num_samples} couplings)")
    else:
        nfe = result.manifest["couplings"]["nfe_per_sample"]
        print(f"{result.out}: made {result.made} couplings this run in {result.seconds:.1f} s; the cache has "
              f"{result.num_samples} ({nfe:g} teacher evaluations each)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("reflow", help="store a teacher's noise-endpoint couplings for reflow",
                                   description=__doc__,
                                   formatter_class=HelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)
