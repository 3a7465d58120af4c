"""A meanflow training step against a plain flow-matching step of the same model and batch, in one run.

The model is the flowers demo's DiT (hidden 192, depth 6, 3 heads, patch 2 on 32 x 8 x 8 TAEF2 latents, 5
classes) with its flow-map input on; the batch is 64 latents. Each step is the whole optimizer step: prepare,
loss (with the JVP for meanflow), backward, AdamW. Goal (issue 13): a meanflow step at most 1.6x an FM step.

    .venv/bin/python benchmarks/meanflow_step.py [--batch 64] [--repeats 20] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from latentflow.flow.objectives import TrainingModels, make_objective
from latentflow.models import make_model

GOAL = 1.6


def demo_model(device: str, patch_size: int = 2) -> torch.nn.Module:
    return make_model("dit", in_channels=32, sample_size=8, patch_size=patch_size, hidden_size=192, depth=6,
                      num_heads=3, num_classes=5, flow_map=True).to(device)


def as_four_argument(model: torch.nn.Module):
    return lambda x, t, r, labels: model(x, t, labels) if r is None else model(x, t, labels, r=r)


def step_seconds(objective, model, teacher, batch_size: int, repeats: int, device: str) -> float:
    """Median seconds of one optimizer step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    call = as_four_argument(model)
    models = TrainingModels(student=call, tangent=call, teacher=None if teacher is None else as_four_argument(teacher),
                            null_class=5)
    generator = torch.Generator().manual_seed(0)
    x1 = torch.randn(batch_size, 32, 8, 8, generator=generator).to(device)
    labels = torch.randint(0, 6, (batch_size,), generator=generator).to(device)
    times = []
    for index in range(repeats + 3):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        batch = objective.prepare(x1, labels, torch.Generator(device=device).manual_seed(index))
        loss = objective.training_loss(models, batch).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if index >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--patch-size", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = demo_model(args.device, args.patch_size)
    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    rows = [
        ("rf (plain flow matching)", make_objective("rf"), None),
        ("meanflow, data velocity, 25% r != t (paper)", make_objective("meanflow"), None),
        ("meanflow, data velocity, 75% r != t", make_objective("meanflow", flow_map_share=0.75), None),
        ("meanflow, data velocity + guidance (Eq. 13), 25%", make_objective("meanflow", flow_map_guidance=3.0), None),
        ("meanflow, teacher velocity, guidance 4, 75%",
         make_objective("meanflow", flow_map_velocity="teacher", flow_map_guidance=4.0, flow_map_share=0.75), teacher),
    ]
    print(f"device {args.device}, threads {torch.get_num_threads()}, batch {args.batch}, demo DiT patch "
          f"{args.patch_size}, median of {args.repeats} optimizer steps")
    baseline = None
    for name, objective, teacher_model in rows:
        seconds = step_seconds(objective, model, teacher_model, args.batch, args.repeats, args.device)
        baseline = baseline or seconds
        verdict = "" if objective.prediction != "average_velocity" else (
            f"  (goal <= {GOAL}x: {'met' if seconds / baseline <= GOAL else 'not met'})")
        print(f"{name:52s} {seconds * 1e3:8.1f} ms  {seconds / baseline:5.2f}x the FM step{verdict}")


if __name__ == "__main__":
    main()
