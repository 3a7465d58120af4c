"""`latentflow plot-log OUT`: draw a run's OUT/log.csv curves to OUT/log.png."""

from __future__ import annotations

import argparse
from pathlib import Path

from latentflow.commands import HelpFormatter


def register(subparsers) -> None:
    parser = subparsers.add_parser("plot-log", help="plot a training run's log.csv to PNG",
                                   formatter_class=HelpFormatter)
    parser.add_argument("run_dir", type=Path, help="the training output_dir holding log.csv")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default RUN_DIR/log.png)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from latentflow.io import check_png_target
    from latentflow.train.logs import plot_log

    if args.out is not None:
        check_png_target(args.out)
    print(plot_log(args.run_dir, args.out))
    return 0
