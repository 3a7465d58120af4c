"""`latentflow demo`: the whole main job on a small real dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from latentflow.commands import HelpFormatter
from latentflow.demo import DEFAULT_CONFIG, FEW_STEP_CONFIG, DemoSettings


def register(subparsers) -> None:
    defaults = DemoSettings()
    parser = subparsers.add_parser("demo", help="encode, fit the dataset OT potential, train (OT-CFM), export, "
                                   "sample and evaluate, end to end (--few-step: then a 1-2 step flow map)",
                                   formatter_class=HelpFormatter)
    parser.add_argument("--data", default=defaults.data,
                        help="image folder (with train/ and val/ if any), shards or hf:NAME")
    parser.add_argument("--vae", default=defaults.vae,
                        help="diffusers VAE (hub id or folder) or a TAESD-family .pth folder")
    parser.add_argument("--out", type=Path, default=defaults.out, help="folder of every stage's output")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="training config override (repeatable)")
    parser.add_argument("--resolution", type=int, default=defaults.resolution, help="image side in pixels")
    parser.add_argument("--train-steps", type=int, default=None, help="default: the config's train.max_steps")
    parser.add_argument("--eval-images", type=int, default=defaults.eval_images,
                        help="generated images per FID setting (default: as many as the reference holds)")
    parser.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale,
                        help="classifier-free guidance of the grids and the evaluation (class-conditional models)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=defaults.guidance_interval,
                        metavar=("LOW", "HIGH"), help="guide only at times LOW <= t <= HIGH (t=0 noise, t=1 data)")
    parser.add_argument("--no-floors", dest="floors", action="store_false",
                        help="skip the floors (real vs real, the VAE floor) beside the FIDs")
    parser.add_argument("--sweep", nargs="+", default=defaults.sweep, help="solver settings to evaluate")
    parser.add_argument("--grid-images", type=int, default=defaults.grid_images, help="images in the sample grid")
    parser.add_argument("--ot-fit-steps", type=int, default=defaults.ot_fit_steps,
                        help="ascent steps of the dataset OT potential (configs with objective.ot_scope: dataset)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the grids and the evaluation")
    few = parser.add_argument_group("few steps", "then a flow map fine-tuned from the trained model on its own "
                                    "samples, sampled and evaluated in 1 and 2 evaluations per image")
    few.add_argument("--few-step", action="store_true", help="add the few-step stages (about 10 minutes here)")
    few.add_argument("--few-step-couplings", type=int, default=defaults.few_step_couplings,
                     help="samples of the trained model (the grid's sampler and guidance) the flow map learns")
    few.add_argument("--few-step-config", type=Path, default=FEW_STEP_CONFIG, help="the flow map's training config")
    few.add_argument("--few-step-train-steps", type=int, default=None,
                     help="default: the few-step config's train.max_steps")
    few.add_argument("--few-step-set", dest="few_step_overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="few-step training config override (repeatable)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from latentflow.demo import run_demo

    settings = DemoSettings(data=args.data, vae=args.vae, out=args.out, config=args.config,
                            resolution=args.resolution, train_steps=args.train_steps, eval_images=args.eval_images,
                            sweep=args.sweep, grid_images=args.grid_images, seed=args.seed, overrides=args.overrides,
                            floors=args.floors, guidance_scale=args.guidance_scale, ot_fit_steps=args.ot_fit_steps,
                            guidance_interval=None if args.guidance_interval is None else tuple(args.guidance_interval),
                            few_step=args.few_step, few_step_couplings=args.few_step_couplings,
                            few_step_config=args.few_step_config, few_step_train_steps=args.few_step_train_steps,
                            few_step_overrides=args.few_step_overrides)
    results = run_demo(settings)
    print("\nresults:")
    for name, path in results.items():
        print(f"  {name:10s} {path}")
    return 0
