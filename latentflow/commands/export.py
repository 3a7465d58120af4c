"""`latentflow export`: a training run (EMA weights) -> a diffusers pipeline folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from latentflow.commands import HelpFormatter


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write a LatentFlowPipeline folder from a training run",
                                   formatter_class=HelpFormatter)
    parser.add_argument("run_dir", type=Path, help="output folder of `latentflow train`")
    parser.add_argument("--out", type=Path, required=True, help="pipeline folder to write")
    parser.add_argument("--vae", default=None,
                        help="load the VAE from here instead of the manifest's source (must be the same weights)")
    parser.add_argument("--grid-images", type=int, default=16,
                        help="images in the sample grid the model card shows (0: none)")
    guide = parser.add_mutually_exclusive_group()
    guide.add_argument("--guide", type=Path, default=None,
                       help="run or pipeline folder, or a checkpoint of a finished run (RUN/checkpoints/step-N: "
                            "its EMA), on the same latents, whose null-class prediction becomes guidance's "
                            "unconditional branch (default: the run's guide/ if it has one)")
    guide.add_argument("--no-guide", action="store_true", help="leave the run's guide/ out of the pipeline")
    parser.add_argument("--license", default="other", help="licence named in the model card's header")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                        help="upload the finished folder to this Hugging Face Hub model repo (huggingface_hub)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from latentflow.export import export_run, push_to_hub

    guide = False if args.no_guide else (args.guide or True)
    out = export_run(args.run_dir, args.out, vae=args.vae, grid_images=args.grid_images, license_name=args.license,
                     guide=guide)
    print(f"wrote pipeline {out} (load with LatentFlowPipeline.from_pretrained({str(out)!r}))")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(out, args.push_to_hub)}")
    return 0
