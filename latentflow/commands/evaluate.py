"""`latentflow evaluate`: FID / KID (/ FD-DINOv2) against NFE for a sweep of solvers."""

from __future__ import annotations

import argparse
from pathlib import Path

from latentflow.commands import HelpFormatter


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="FID/KID vs NFE of a pipeline over solver settings (JSON, CSV, PNG)",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("pipe_dir", type=Path, help="pipeline folder (from `latentflow export`)")
    parser.add_argument("--ref", type=Path, required=True, help="reference image folder or .npz from fid-stats")
    parser.add_argument("--ref-resolution", type=int, default=None,
                        help="with a folder --ref: resize + centre-crop its images to this size first "
                             "(None: the generated images' size)")
    parser.add_argument("--n", type=int, default=2000, help="images per setting")
    parser.add_argument("--sweep", nargs="+", default=["euler:1,2,4,8", "midpoint:4", "dopri5"],
                        help="settings: SOLVER:STEPS,... for fixed-step solvers and ddim; SOLVER[:TOL,...] adaptive")
    parser.add_argument("--time-shift", type=float, nargs="+", default=None, metavar="S",
                        help="fixed-step settings (ODE solvers, flow-map jumps) once per shift S of their grid "
                             "towards the noise, t' = t / (S - (S - 1) t) (SD3's shift; 1 evenly spaced; default: "
                             "the pipeline's)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (None: PIPE_DIR/evaluation)")
    parser.add_argument("--batch-size", type=int, default=50, help="images per pipeline call and feature batch")
    parser.add_argument("--seed", type=int, default=0, help="image i is drawn from seed + i, in every setting")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance (class-conditional models; 1: none; default: the pipeline's, "
                             "what the run's previews used)")
    parser.add_argument("--no-guide", action="store_true",
                        help="guidance from the model alone, without the pipeline's guide/ (when it has one)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="guide only at times LOW <= t <= HIGH (t=0 noise, t=1 data); default: every time")
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--dinov2", type=Path, default=None, help="local transformers Dinov2Model folder (FD-DINOv2)")
    parser.add_argument("--kid-subsets", type=int, default=100, help="random subsets KID averages over")
    parser.add_argument("--kid-subset-size", type=int, default=1000,
                        help="images per KID subset (at most the smaller set)")
    parser.add_argument("--floors", type=Path, default=None,
                        help="training image folder: report real-vs-real and the VAE floor at the same --n beside "
                             "every FID (computed once, cached beside the reference)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from latentflow.card import CARD_NAME, card_evaluation_size, write_model_card
    from latentflow.eval.sweep import EvaluationSettings, evaluate_pipeline
    from latentflow.export import load_pipeline
    from latentflow.processes import local_device

    device = str(local_device(args.device))
    settings = EvaluationSettings(
        reference=args.ref, n=args.n, sweep=list(args.sweep), batch_size=args.batch_size, seed=args.seed,
        guidance_scale=1.0 if args.guidance_scale is None else args.guidance_scale,
        guidance_interval=args.guidance_interval,
        device=device, dinov2=args.dinov2, kid_subsets=args.kid_subsets,
        kid_subset_size=args.kid_subset_size, reference_resolution=args.ref_resolution, floors=args.floors,
        time_shifts=args.time_shift)
    settings.check()
    pipe = load_pipeline(args.pipe_dir, device, progress=False, guide=not args.no_guide)
    settings.guidance_scale = pipe.scheduler.guidance(args.guidance_scale)
    paths = evaluate_pipeline(pipe, args.pipe_dir, settings, args.out or args.pipe_dir / "evaluation")
    shown = card_evaluation_size(args.pipe_dir)
    if shown is not None and shown > settings.n:  # a quick check does not replace a larger evaluation
        card = f"left {args.pipe_dir / CARD_NAME} as it was (its evaluation has {shown} images per setting)"
    else:
        card = f"updated {write_model_card(args.pipe_dir, evaluation_file=paths['json'])}"
    print(f"wrote {paths['json']}, {paths['csv']}, {paths['png']}; {card}")
    return 0
