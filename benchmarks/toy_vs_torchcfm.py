"""2D lab, latentflow against torchcfm, in one run: 8gaussians -> moons.

Both sides train the same 3x64 SELU MLP (same initial weights), with the same
steps, batch size, data batches, Adam 1e-3, and are evaluated identically (exact
W2 to 2,000 held-out moons samples after Euler with NFE 1, 2, 4, 8).

    bash benchmarks/setup_bench.sh      # installs torchcfm beside latentflow (no torchvision)
    .venv/bin/python benchmarks/toy_vs_torchcfm.py --steps 5000 [--seeds 0,1,2] [--inline-too]

Our OT-CFM pairs its batches in loader worker processes (the lab's default for OT
objectives); torchcfm pairs inside its training step.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

import numpy as np
import torch

from latentflow.flow.metrics import wasserstein2
from latentflow.flow.objectives import make_objective
from latentflow.flow.solvers import integrate
from latentflow.toy.distributions import get_distribution
from latentflow.toy.lab import LabSettings, PreparedBatches, ToyMLP, batch_workers, train_field

NFES = (1, 2, 4, 8)


def train_torchcfm(name: str, settings: LabSettings, model: torch.nn.Module) -> float:
    """torchcfm's own recipe on our batches; returns training seconds."""
    from torchcfm.conditional_flow_matching import (
        ConditionalFlowMatcher,
        ExactOptimalTransportConditionalFlowMatcher,
    )

    matcher = (ExactOptimalTransportConditionalFlowMatcher if name == "otcfm" else ConditionalFlowMatcher)(sigma=0.01)
    source, target = get_distribution(settings.source), get_distribution(settings.target)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    for step in range(settings.steps):
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
        x0, x1 = source(settings.batch_size, generator), target(settings.batch_size, generator)
        t, x_t, u_t = matcher.sample_location_and_conditional_flow(x0, x1)
        loss = torch.mean((model(x_t, t) - u_t) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    torch.set_num_threads(threads)
    return seconds


def evaluate(model: torch.nn.Module, settings: LabSettings) -> dict[int, float]:
    """Exact W2 to held-out target samples for each NFE (Euler)."""
    generator = torch.Generator().manual_seed(12345)
    x0 = get_distribution(settings.source)(2000, generator)
    reference = get_distribution(settings.target)(2000, generator)
    return {k: wasserstein2(integrate(model, x0, "euler", steps=k).x, reference) for k in NFES}


def run_side(side: str, name: str, settings: LabSettings) -> tuple[float, dict[int, float]]:
    torch.manual_seed(settings.seed)
    model = ToyMLP()
    if side == "torchcfm":
        seconds = train_torchcfm(name, settings, model)
    else:
        objective = make_objective(name, sigma=0.01)
        seconds, _ = train_field(settings, objective, model, get_distribution(settings.source),
                                 get_distribution(settings.target))
    return seconds, evaluate(model, settings)


def run_seed(settings: LabSettings, inline_too: bool) -> dict[tuple[str, str], tuple[float, dict[int, float]]]:
    """Every (side, objective) for one seed; ours with the lab's default loader workers."""
    results = {}
    for side in ("latentflow", "torchcfm"):
        for name in ("cfm", "otcfm"):
            results[side, name] = run_side(side, name, settings)
            print(f"seed {settings.seed} {side:10s} {name:6s} trained in {results[side, name][0]:.1f} s", flush=True)
    if inline_too:
        inline = replace(settings, workers=0)
        results["latentflow (inline)", "otcfm"] = run_side("latentflow", "otcfm", inline)
        print(f"seed {settings.seed} latentflow otcfm inline trained in "
              f"{results['latentflow (inline)', 'otcfm'][0]:.1f} s")
    return results


def print_table(results: dict) -> None:
    print("| side | objective | " + " | ".join(f"W2 @ NFE {k}" for k in NFES) + " | train s |")
    print("|---|---|" + "---|" * (len(NFES) + 1))
    for (side, name), (seconds, w2) in results.items():
        print(f"| {side} | {name} | " + " | ".join(f"{w2[k]:.3f}" for k in NFES) + f" | {seconds:.1f} |")


def summarise(per_seed: list[dict]) -> None:
    """The goals' two numbers for each seed, then their mean and standard deviation over seeds."""
    w2_ratio = [r["latentflow", "otcfm"][1][1] / r["torchcfm", "otcfm"][1][1] for r in per_seed]
    ours_time = [r["latentflow", "otcfm"][0] / r["latentflow", "cfm"][0] for r in per_seed]
    theirs_time = [r["torchcfm", "otcfm"][0] / r["torchcfm", "cfm"][0] for r in per_seed]
    for label, values in (("OT-CFM W2 @ NFE 1, latentflow / torchcfm (goal <= 1)", w2_ratio),
                          ("OT-CFM / CFM training time, latentflow (goal <= 1.2)", ours_time),
                          ("OT-CFM / CFM training time, torchcfm", theirs_time)):
        spread = f" +- {np.std(values, ddof=1):.2f} over {len(values)} seeds" if len(values) > 1 else ""
        print(f"{label}: " + ", ".join(f"{v:.2f}" for v in values) + f"; mean {np.mean(values):.2f}{spread}")
    for side in ("latentflow", "torchcfm"):
        values = [r[side, "otcfm"][1][1] for r in per_seed]
        print(f"{side} OT-CFM W2 @ NFE 1: mean {np.mean(values):.3f}" +
              (f" +- {np.std(values, ddof=1):.3f}" if len(values) > 1 else ""))


def seconds_per_batch(settings: LabSettings, name: str, batches: int = 300) -> float:
    """One process preparing `name`'s batches (sampling, pairing, x_t) as the loader workers do."""
    torch.set_num_threads(1)
    dataset = PreparedBatches(settings, make_objective(name, sigma=0.01), get_distribution(settings.source),
                              get_distribution(settings.target), as_numpy=True)
    dataset[0]
    start = time.perf_counter()
    for step in range(1, batches + 1):
        dataset[step]
    return (time.perf_counter() - start) / batches


def assignment_floor(settings: LabSettings, problems: int = 50) -> float:
    """scipy's linear_sum_assignment on B x B costs with the exact duals already subtracted (from POT's
    network simplex): the least any dual estimate could leave it to do."""
    import ot
    from scipy.optimize import linear_sum_assignment

    source, target = get_distribution(settings.source), get_distribution(settings.target)
    weights = np.full(settings.batch_size, 1.0 / settings.batch_size)
    reduced = []
    for problem in range(problems):
        generator = torch.Generator().manual_seed(problem)
        x0, x1 = source(settings.batch_size, generator).double(), target(settings.batch_size, generator).double()
        cost = torch.cdist(x0, x1).square().numpy()
        _, log = ot.emd(weights, weights, cost, log=True)
        reduced.append(cost - log["u"][:, None] - log["v"][None, :])
    start = time.perf_counter()
    for matrix in reduced:
        linear_sum_assignment(matrix)
    return (time.perf_counter() - start) / problems


def seconds_per_update(settings: LabSettings, steps: int = 1000) -> float:
    """The main process's share of a step: forward, loss, backward and the optimizer on a ready batch."""
    from latentflow.train.optim import cpu_fused_optimizer

    torch.set_num_threads(1)
    objective = make_objective("cfm", sigma=0.01)
    batch = PreparedBatches(settings, objective, get_distribution(settings.source),
                            get_distribution(settings.target))[0]
    torch.manual_seed(settings.seed)
    model = ToyMLP()
    optimizer = cpu_fused_optimizer(torch.optim.Adam, model.parameters(), lr=settings.learning_rate)
    for step in range(steps + 50):
        if step == 50:
            start = time.perf_counter()
        loss = objective.loss(model(batch.x_t, batch.t), batch).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()
    return (time.perf_counter() - start) / steps


def time_budget(settings: LabSettings, per_seed: list[dict]) -> None:
    """Why OT-CFM / CFM time is what it is on this machine: a step's parts, and the least the ratio can be
    when the pairing overlaps the update perfectly on os.cpu_count() cores."""
    cfm_step = float(np.median([r["latentflow", "cfm"][0] for r in per_seed])) / settings.steps
    ot_step = float(np.median([r["latentflow", "otcfm"][0] for r in per_seed])) / settings.steps
    update, ot_batch = seconds_per_update(settings), seconds_per_batch(settings, "otcfm")
    cores = os.cpu_count() or 1
    floor = max(update, (update + ot_batch) / cores) / cfm_step
    print(f"\nTime budget (ms, medians over seeds): CFM step {cfm_step * 1e3:.2f} (its batches prepared by a "
          f"loader worker), of which the update {update * 1e3:.2f}; an OT-CFM batch takes {ot_batch * 1e3:.2f} "
          f"in one process, of which linear_sum_assignment alone needs at least "
          f"{assignment_floor(settings) * 1e3:.2f} (exact duals given).")
    print(f"OT-CFM / CFM floor on {cores} cores, pairing perfectly overlapped: max(update, (update + OT batch) / "
          f"{cores}) / CFM step = {floor:.2f}; measured {ot_step / cfm_step:.2f} (measured / floor "
          f"{ot_step / cfm_step / floor:.2f}); the goal 1.2 needs an OT batch under "
          f"{(1.2 * cfm_step * cores - update) * 1e3:.2f} ms here.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--inline-too", action="store_true",
                        help="also train our OT-CFM with the pairing inline (no loader workers)")
    args = parser.parse_args()
    per_seed = []
    for seed in (int(value) for value in args.seeds.split(",")):
        settings = LabSettings(steps=args.steps, batch_size=args.batch_size, seed=seed)
        results = run_seed(settings, args.inline_too)
        print(f"\n8gaussians -> moons, seed {seed}, {args.steps} steps, batch {args.batch_size}, 3x64 SELU MLP, "
              f"Adam 1e-3, Euler; our OT-CFM pairs in {batch_workers(settings, make_objective('otcfm'))} loader "
              f"workers")
        print_table(results)
        per_seed.append(results)
    print()
    summarise(per_seed)
    time_budget(LabSettings(steps=args.steps, batch_size=args.batch_size), per_seed)


if __name__ == "__main__":
    main()
