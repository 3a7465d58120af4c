"""`latentflow export`: a training run (EMA weights) -> a diffusers pipeline folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write a LatentFlowPipeline folder from a training run",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="output folder of `latentflow train`")
    parser.add_argument("--out", type=Path, required=True, help="pipeline folder to write")
    parser.add_argument("--vae", default=None,
                        help="load the VAE from here instead of the manifest's source (must be the same weights)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from latentflow.export import export_run

    out = export_run(args.run_dir, args.out, vae=args.vae)
    print(f"wrote pipeline {out} (load with LatentFlowPipeline.from_pretrained({str(out)!r}))")
    return 0
