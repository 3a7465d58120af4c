"""`latentflow plot-eval`: FID against NFE of several evaluations in one plot, with their floors."""

from __future__ import annotations

import argparse
from pathlib import Path

from latentflow.commands import HelpFormatter


def register(subparsers) -> None:
    parser = subparsers.add_parser("plot-eval", help="FID vs NFE of several evaluations in one PNG",
                                   formatter_class=HelpFormatter)
    parser.add_argument("evaluations", type=Path, nargs="+",
                        help="evaluation.json files or the folders holding them (from `latentflow evaluate`)")
    parser.add_argument("--labels", nargs="+", default=None, help="one per evaluation (default: folder names)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--title", default="", help="the plot's title")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from latentflow.errors import LatentflowError
    from latentflow.eval.sweep import EVALUATION_FILE, check_evaluation, plot_evaluations
    from latentflow.io import check_png_target, read_json, write_bytes_atomic

    check_png_target(args.out)
    files = [path / EVALUATION_FILE if path.is_dir() else path for path in args.evaluations]
    labels = args.labels or [file.parent.name for file in files]
    if len(labels) != len(files):
        raise LatentflowError(f"--labels gives {len(labels)} names for {len(files)} evaluations")
    documents = [read_json(file, "evaluation") for file in files]
    for file, document in zip(files, documents):
        check_evaluation(document, str(file))
    write_bytes_atomic(args.out, plot_evaluations(list(zip(labels, documents)), args.title))
    print(f"wrote {args.out}")
    return 0
