"""`latentflow toy`: the 2D lab."""

from __future__ import annotations

import argparse
from pathlib import Path

from latentflow.commands import HelpFormatter
from latentflow.errors import LatentflowError
from latentflow.toy.lab import LAB_OBJECTIVES, LabSettings


def int_list(text: str) -> tuple[int, ...]:
    """Parse '1,2,4' into (1, 2, 4); empty or malformed lists are user errors."""
    parts = [part for part in text.split(",") if part.strip()]
    try:
        return tuple(int(part) for part in parts)
    except ValueError:
        raise LatentflowError(f"--nfe must be comma-separated integers such as 1,2,4,8,100, got {text!r}") from None


def register(subparsers) -> None:
    parser = subparsers.add_parser("toy", help="2D lab: train and compare objectives on point clouds",
                                   formatter_class=HelpFormatter)
    defaults = LabSettings()
    parser.add_argument("--source", default=defaults.source, help="built-in name or FILE.npy of shape (N, 2) (t=0)")
    parser.add_argument("--target", default=defaults.target, help="built-in name or FILE.npy of shape (N, 2) (t=1)")
    parser.add_argument("--objective", default=defaults.objective,
                        help=f"one or a comma-separated list of {', '.join(LAB_OBJECTIVES)} (reflow: rf, then "
                             "rf again on its own (noise, endpoint) pairs; meanflow-ft: rf, then a flow map "
                             "fine-tuned from it on its velocity; meanflow-reflow: rf, then a flow map fine-tuned "
                             "from it on its own (noise, endpoint) pairs)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="pairs per training step")
    parser.add_argument("--nfe", default="1,2,4,8,100", help="solver step counts to evaluate")
    parser.add_argument("--solver", default=defaults.solver,
                        help="torchdiffeq fixed-step method (ddpm samples with DDIM)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of training and evaluation")
    parser.add_argument("--lr", type=float, default=defaults.learning_rate, help="Adam learning rate")
    parser.add_argument("--lr-schedule", default=defaults.lr_schedule, help="constant or cosine (decay to zero)")
    parser.add_argument("--eval-samples", type=int, default=defaults.eval_samples,
                        help="samples per NFE for W2 (against as many held-out target points)")
    parser.add_argument("--sigma", type=float, default=None, help="path sigma (default: 0 for rf, 0.01 otherwise)")
    parser.add_argument("--reg", type=float, default=defaults.reg,
                        help="Sinkhorn regularisation (relative to max cost)")
    parser.add_argument("--workers", type=int, default=None,
                        help="loader processes that prepare batches (default: one per core, up to 4, for OT "
                             "objectives; 1 for the others; 0 on a single core)")
    parser.add_argument("--reflow-pairs", type=int, default=defaults.reflow_pairs,
                        help="reflow, meanflow-reflow: (noise, endpoint) pairs integrated from the first rf model")
    parser.add_argument("--reflow-solver", default=defaults.reflow_solver,
                        help="reflow, meanflow-reflow: the pairs' ODE solver")
    parser.add_argument("--dataset-size", type=int, default=defaults.dataset_size,
                        help="otcfm-dataset: fixed training points drawn from the target")
    parser.add_argument("--ot-steps", type=int, default=defaults.ot_steps,
                        help="otcfm-dataset: potential fit steps")
    parser.add_argument("--ot-batch", type=int, default=defaults.ot_batch,
                        help="otcfm-dataset: noise draws per fit step")
    parser.add_argument("--ot-lr", type=float, default=defaults.ot_lr, help="otcfm-dataset: potential fit step size")
    parser.add_argument("--ot-average-from", type=float, default=defaults.ot_average_from,
                        help="otcfm-dataset: share of the fit's steps after which its iterates are averaged")
    parser.add_argument("--flow-map-share", type=float, default=defaults.flow_map_share,
                        help="meanflow, meanflow-ft, meanflow-reflow: share of (t, r) pairs with r != t")
    parser.add_argument("--flow-map-weight-power", type=float, default=defaults.flow_map_weight_power,
                        help="meanflow, meanflow-ft, meanflow-reflow: power p of the adaptive loss weight "
                             "(0: plain MSE)")
    parser.add_argument("--finetune-steps", type=int, default=None,
                        help="meanflow-ft, meanflow-reflow: steps of the flow map's fine-tune (default: --steps)")
    parser.add_argument("--time-sampler", default=None,
                        help="training times: uniform or logit_normal (default: the objective's own; meanflow: "
                             "the paper's logit-normal)")
    parser.add_argument("--finite-data", action="store_true",
                        help="every objective trains on the same --dataset-size fixed target points (as from a "
                             "cache), not fresh draws; W2 is still measured on fresh held-out points")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from latentflow.toy.runner import format_table, run_objectives

    objectives = [name.strip() for name in args.objective.split(",") if name.strip()]
    if not objectives:
        raise LatentflowError(f"--objective is empty; choose from {list(LAB_OBJECTIVES)}")
    settings = LabSettings(
        source=args.source, target=args.target, objective=objectives[0], steps=args.steps,
        batch_size=args.batch_size, nfe=int_list(args.nfe), solver=args.solver, seed=args.seed,
        learning_rate=args.lr, lr_schedule=args.lr_schedule, eval_samples=args.eval_samples, sigma=args.sigma,
        reg=args.reg, workers=args.workers,
        reflow_pairs=args.reflow_pairs, reflow_solver=args.reflow_solver, dataset_size=args.dataset_size,
        ot_steps=args.ot_steps, ot_batch=args.ot_batch, ot_lr=args.ot_lr, ot_average_from=args.ot_average_from,
        flow_map_share=args.flow_map_share,
        flow_map_weight_power=args.flow_map_weight_power, finetune_steps=args.finetune_steps,
        time_sampler=args.time_sampler, finite_data=args.finite_data,
    )
    for name in objectives:  # refuse bad settings before any training starts
        LabSettings(**{**settings.__dict__, "objective": name,
                       "source": "gaussian" if name == "ddpm" and len(objectives) > 1 else settings.source}).validate()
    from latentflow.toy.distributions import get_distribution

    get_distribution(settings.source), get_distribution(settings.target)
    results = run_objectives(settings, objectives, args.out)
    print(format_table(results))
    print(f"wrote {args.out}/metrics.json, samples_nfe*.npy and {args.out}/trajectories.png")
    return 0
