"""`latentflow sample`: generate images with an exported pipeline (grid and/or one file per image)."""

from __future__ import annotations

import argparse
from pathlib import Path

from latentflow.commands import HelpFormatter


def register(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="generate images with a pipeline folder",
                                   formatter_class=HelpFormatter)
    parser.add_argument("pipe_dir", type=Path, help="pipeline folder (from `latentflow export`)")
    parser.add_argument("--n", type=int, default=64, help="number of images")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps of a fixed-step solver or DDIM (default: the pipeline's)")
    parser.add_argument("--solver", default=None, help="euler, midpoint, rk4, dopri5, ... or ddim (ddpm models)")
    parser.add_argument("--atol", type=float, default=None, help="tolerance of an adaptive solver (atol and rtol)")
    parser.add_argument("--time-shift", type=float, default=None, metavar="S",
                        help="fixed-step ODE solvers and flow-map jumps: steps shifted towards the noise, "
                             "t' = t / (S - (S - 1) t) (SD3's shift; 1 evenly spaced; default: the pipeline's)")
    parser.add_argument("--seed", type=int, default=0, help="image i is drawn from seed + i")
    parser.add_argument("--class", dest="class_label", default=None, help="class name or id (default: random)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="classifier-free guidance (class-conditional models; 1: none; default: the pipeline's, "
                             "what the run's previews used)")
    parser.add_argument("--no-guide", action="store_true",
                        help="guidance from the model alone, without the pipeline's guide/ (when it has one)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                        help="guide only at times LOW <= t <= HIGH (t=0 noise, t=1 data); default: every time")
    parser.add_argument("--eta", type=float, default=None, help="DDIM stochasticity (ddpm models)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per pipeline call")
    parser.add_argument("--grid", type=Path, default=None, help="write all images as one grid PNG")
    parser.add_argument("--outdir", type=Path, default=None, help="write one PNG per image")
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from latentflow.errors import LatentflowError
    from latentflow.eval.sweep import SamplerSetting, generate_batches
    from latentflow.export import load_pipeline
    from latentflow.flow.solvers import check_stepping
    from latentflow.io import check_folder_target, image_format, image_grid, save_image
    from latentflow.processes import local_device
    from latentflow.train.checkpoint import check_holds_no_work

    if args.grid is None and args.outdir is None:
        raise LatentflowError("nothing to write: give --grid FILE.png and/or --outdir DIR")
    if args.n < 1:
        raise LatentflowError(f"--n must be at least 1, got {args.n}")
    if args.grid is not None:
        image_format(args.grid)
    if args.outdir is not None:
        check_folder_target(args.outdir, what="folder for the images")
        check_holds_no_work(args.outdir, "the images")
    pipe = load_pipeline(args.pipe_dir, local_device(args.device), progress=False, guide=not args.no_guide)
    setting = SamplerSetting(args.solver or pipe.scheduler.default_solver, args.steps, args.atol, args.time_shift)
    check_stepping(setting.solver, setting.steps, setting.tolerance, "--steps", "--atol")
    guidance = pipe.scheduler.guidance(args.guidance_scale)
    batches = generate_batches(pipe, args.n, setting, args.batch_size, args.seed, args.class_label,
                               guidance, args.eta, args.guidance_interval)
    images, nfes = [], []
    with tqdm(total=args.n, desc="sampling", unit="img", delay=1) as bar:  # an early error prints alone
        for batch in batches:
            if args.outdir is not None:
                for offset, image in enumerate(batch.images):
                    save_image(image_grid(image[None], columns=1, padding=0),
                                      args.outdir / f"{len(images) + offset:06d}.png")
            images.extend(batch.images)
            nfes.append(batch.nfe)
            bar.update(len(batch.images))
    if args.grid is not None:
        save_image(image_grid(torch.stack(images)), args.grid)
    written = " and ".join(str(path) for path in (args.grid, args.outdir) if path is not None)
    nfe = nfes[0] if len(set(nfes)) == 1 else nfes
    shown = f", guidance {guidance:g}" if pipe.scheduler.config.num_classes else ""
    print(f"{args.n} images, {setting.label}{shown}, NFE per batch {nfe}: wrote {written}")
    return 0
