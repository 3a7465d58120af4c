"""Run the lab for one or more objectives and write metrics, samples and the picture."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch

from latentflow.toy.distributions import get_distribution
from latentflow.toy.lab import LabResult, LabSettings, run_lab, sample_points, write_json
from latentflow.toy.plot import Panel, save_panels


def panels_for(settings: LabSettings, model, objective) -> list[Panel]:
    """The picture's panels for one trained run: its paths; for ddpm deterministic and stochastic."""
    generator = torch.Generator().manual_seed(settings.seed + 2_000_000)
    x0 = get_distribution(settings.source)(300, generator)
    target = get_distribution(settings.target)(2000, generator)
    steps = max(settings.nfe)
    if objective.prediction == "noise":
        deterministic = sample_points(settings, objective, model, x0, steps, eta=0.0, trajectory=True)
        stochastic = sample_points(settings, objective, model, x0, steps, eta=settings.stochastic_eta, trajectory=True)
        return [
            Panel(f"ddpm, DDIM sigma=0 (deterministic), {steps} steps", deterministic.trajectory, target),
            Panel(f"ddpm, DDIM eta={settings.stochastic_eta:g} (stochastic), {steps} steps", stochastic.trajectory,
                  target),
        ]
    if objective.prediction == "average_velocity":
        one = sample_points(settings, objective, model, x0, 1, trajectory=True)
        many = sample_points(settings, objective, model, x0, steps, trajectory=True)
        return [Panel(f"meanflow: {settings.source} -> {settings.target}, the 1-step map", one.trajectory, target),
                Panel(f"meanflow: {steps} flow-map steps", many.trajectory, target)]
    out = sample_points(settings, objective, model, x0, steps, trajectory=True)
    return [Panel(f"{settings.objective}: {settings.source} -> {settings.target}, {settings.solver} {steps} steps",
                  out.trajectory, target)]


def run_objectives(base: LabSettings, objectives: list[str], out_dir: Path) -> dict[str, LabResult]:
    """Run each objective; one objective writes straight into out_dir, several into out_dir/<name>/."""
    results, panels = {}, []
    for name in objectives:
        settings = replace(base, objective=name)
        if name == "ddpm" and len(objectives) > 1 and base.source != "gaussian":
            settings = replace(settings, source="gaussian")  # diffusion starts from Gaussian noise
        run_dir = out_dir if len(objectives) == 1 else out_dir / name
        result, model, objective = run_lab(settings, run_dir)
        results[name] = result
        run_panels = panels_for(settings, model, objective)
        if len(objectives) > 1:
            save_panels(run_panels, run_dir / "trajectories.png")
        panels += run_panels
    save_panels(panels, out_dir / "trajectories.png")
    if len(objectives) > 1:
        write_json(out_dir / "metrics.json", {"runs": {name: asdict(result) for name, result in results.items()}})
    return results


def format_table(results: dict[str, LabResult]) -> str:
    """A markdown table of W2 per NFE, straightness and training time."""
    nfes = list(next(iter(results.values())).w2)
    lines = ["| objective | " + " | ".join(f"W2 @ NFE {k}" for k in nfes) + " | straightness | train s |",
             "|---" * (len(nfes) + 3) + "|"]
    for name, result in results.items():
        straight = "-" if result.straightness is None else f"{result.straightness:.3f}"
        cells = [f"{result.w2[k]:.3f}" for k in nfes]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {straight} | {result.training_seconds:.1f} |")
        if result.w2_stochastic:
            cells = [f"{result.w2_stochastic[k]:.3f}" for k in nfes]
            label = f"{name} (stochastic, eta={result.settings['stochastic_eta']:g})"
            lines.append(f"| {label} | " + " | ".join(cells) + " | - | - |")
    floor = next(iter(results.values())).w2_floor
    if floor is not None:
        n = next(iter(results.values())).settings["eval_samples"]
        lines.append(f"| floor: {n} fresh target points | " + " | ".join(f"{floor:.3f}" for _ in nfes) + " | - | - |")
    return "\n".join(lines)
