"""`latentflow train`: train a DiT / U-Net on a latent cache from a YAML config.

Multi-process runs go through accelerate, e.g.
`accelerate launch --config_file configs/accelerate/8gpu.yaml -m latentflow.cli train --config ...`
or `accelerate launch ... scripts/train.py --config ...` (the same arguments).
"""

from __future__ import annotations

import argparse

from latentflow.commands import HelpFormatter


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The train arguments, shared with scripts/train.py."""
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.max_steps=100 (repeatable)")
    parser.add_argument("--resume", default=None, metavar="latest|PATH",
                        help="continue from the newest intact checkpoint of output_dir, or from a checkpoint folder")
    parser.add_argument("--init", default=None, metavar="RUN_DIR|PIPE_DIR",
                        help="start from a trained run's (or pipeline's) EMA weights and model settings, e.g. to "
                             "fine-tune a flow map with objective meanflow (sets train.init)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a velocity field on cached latents (accelerate)",
                                   formatter_class=HelpFormatter)
    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from latentflow.train.config import load_config
    from latentflow.train.trainer import train

    overrides = [*args.overrides, *([f"train.init={args.init}"] if args.init else [])]
    result = train(load_config(args.config, overrides), resume=args.resume)
    print(f"trained to step {result.step}")
    return 0
