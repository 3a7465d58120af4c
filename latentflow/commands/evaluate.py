"""`latentflow evaluate`: FID / KID (/ FD-DINOv2) against NFE for a sweep of solvers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="FID/KID vs NFE of a pipeline over solver settings (JSON, CSV, PNG)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("pipe_dir", type=Path, help="pipeline folder (from `latentflow export`)")
    parser.add_argument("--ref", type=Path, required=True, help="reference image folder or .npz from fid-stats")
    parser.add_argument("--ref-resolution", type=int, default=None,
                        help="with a folder --ref: resize + centre-crop its images to this size first "
                             "(None: the generated images' size)")
    parser.add_argument("--n", type=int, default=2000, help="images per setting")
    parser.add_argument("--sweep", nargs="+", default=["euler:1,2,4,8", "midpoint:4", "dopri5"],
                        help="settings: SOLVER:STEPS,... for fixed-step solvers and ddim; SOLVER[:TOL,...] adaptive")
    parser.add_argument("--out", type=Path, default=None, help="output folder (None: PIPE_DIR/evaluation)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dinov2", type=Path, default=None, help="local transformers Dinov2Model folder (FD-DINOv2)")
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from latentflow.errors import LatentflowError
    from latentflow.evaluation import (
        evaluate_setting, make_extractors, parse_sweep, reference_statistics, write_sweep_results,
    )
    from latentflow.export import load_pipeline

    if args.n < 2:
        raise LatentflowError(f"--n must be at least 2, got {args.n}")
    settings = parse_sweep(args.sweep)
    pipe = load_pipeline(args.pipe_dir, args.device, progress=False)
    for setting in settings:  # refuse e.g. euler for a ddpm model before any work
        pipe.check_solver(setting.solver)
    extractors = make_extractors(args.device, args.dinov2)
    image_size = pipe.image_size()[0]
    resolution = (args.ref_resolution or image_size) if args.ref.is_dir() else None
    if resolution is None:
        _check_reference_resolution(args.ref, image_size)
    reference = reference_statistics(args.ref, extractors, args.batch_size, lambda it: tqdm(it, desc="reference"),
                                     resolution)
    results = []
    for setting in tqdm(settings, desc="settings"):
        result = evaluate_setting(pipe, setting, reference, extractors, args.n, args.batch_size, args.seed,
                                  args.guidance_scale, args.kid_subsets, args.kid_subset_size)
        results.append(result)
        tqdm.write(_format_row(result.row()))
    info = {"pipeline": str(args.pipe_dir), "reference": str(args.ref), "n": args.n, "seed": args.seed,
            "image_size": image_size, "reference_resolution": resolution,
            "guidance_scale": args.guidance_scale, "sweep": list(args.sweep)}
    paths = write_sweep_results(results, args.out or args.pipe_dir / "evaluation", info)
    print(f"wrote {paths['json']}, {paths['csv']}, {paths['png']}")
    return 0


def _check_reference_resolution(reference: Path, image_size: int) -> None:
    from latentflow.evaluation import statistics_resolution

    stored = statistics_resolution(reference)
    if stored != image_size:
        print(f"warning: {reference} was computed at resolution {stored or 'as stored'}, the samples are "
              f"{image_size} px; FID compares like with like only at equal resolution (fid-stats --resolution)",
              file=sys.stderr)


def _format_row(row: dict) -> str:
    kid = "" if row["kid"] is None else f"  KID {row['kid']:.4f} +- {row['kid_std']:.4f}"
    dino = "" if row["fd_dinov2"] is None else f"  FD-DINOv2 {row['fd_dinov2']:.2f}"
    return f"{row['setting']:>16}  NFE {row['nfe']:7.1f}  FID {row['fid']:8.2f}{kid}{dino}"
