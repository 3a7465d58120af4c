"""2D lab, latentflow against torchcfm, in one run: 8gaussians -> moons.

Both sides train the same 3x64 SELU MLP (same initial weights), with the same
steps, batch size, data batches, Adam 1e-3, and are evaluated identically (exact
W2 to 2,000 held-out moons samples after Euler with NFE 1, 2, 4, 8).

    bash benchmarks/setup_bench.sh      # installs torchcfm beside latentflow (no torchvision)
    .venv/bin/python benchmarks/toy_vs_torchcfm.py --steps 5000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from latentflow.metrics import wasserstein2
from latentflow.objectives import make_objective
from latentflow.solvers import integrate
from latentflow.toy.distributions import get_distribution
from latentflow.toy.lab import LabSettings, ToyMLP, train_field

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    settings = LabSettings(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    results = {}
    for side in ("latentflow", "torchcfm"):
        for name in ("cfm", "otcfm"):
            results[side, name] = run_side(side, name, settings)
            print(f"{side:10s} {name:6s} trained in {results[side, name][0]:.1f} s", flush=True)
    print(f"\n8gaussians -> moons, {args.steps} steps, batch {args.batch_size}, 3x64 SELU MLP, Adam 1e-3, Euler")
    print("| side | objective | " + " | ".join(f"W2 @ NFE {k}" for k in NFES) + " | train s |")
    print("|---|---|" + "---|" * (len(NFES) + 1))
    for (side, name), (seconds, w2) in results.items():
        print(f"| {side} | {name} | " + " | ".join(f"{w2[k]:.3f}" for k in NFES) + f" | {seconds:.1f} |")
    ours, theirs = results["latentflow", "otcfm"], results["torchcfm", "otcfm"]
    print(f"\nOT-CFM W2 @ NFE 1, latentflow / torchcfm: {ours[1][1] / theirs[1][1]:.2f}x (goal <= 1)")
    print(f"OT-CFM / CFM training time, latentflow: {ours[0] / results['latentflow', 'cfm'][0]:.2f}x (goal <= 1.2); "
          f"torchcfm: {theirs[0] / results['torchcfm', 'cfm'][0]:.2f}x")
    print(f"OT-CFM training time, latentflow / torchcfm: {ours[0] / theirs[0]:.2f}x")


if __name__ == "__main__":
    main()
