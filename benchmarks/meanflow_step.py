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


class Stepper:
    """One optimizer step of `objective` on a fixed batch, timed."""

    def __init__(self, objective, model, teacher, batch_size: int, device: str):
        self.objective, self.model, self.device = objective, model, device
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        call = as_four_argument(model)
        self.models = TrainingModels(student=call, tangent=call, null_class=5,
                                     teacher=None if teacher is None else as_four_argument(teacher))
        generator = torch.Generator().manual_seed(0)
        self.x1 = torch.randn(batch_size, 32, 8, 8, generator=generator).to(device)
        self.labels = torch.randint(0, 6, (batch_size,), generator=generator).to(device)

    def seconds(self, index: int) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        batch = self.objective.prepare(self.x1, self.labels, torch.Generator(device=self.device).manual_seed(index))
        loss = self.objective.training_loss(self.models, batch).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


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
          f"{args.patch_size}, median of {args.repeats} optimizer steps (each round steps every variant once, so "
          f"the machine's slow and fast spells hit them alike)")
    steppers = [Stepper(objective, model, teacher_model, args.batch, args.device)
                for _, objective, teacher_model in rows]
    times: list[list[float]] = [[] for _ in rows]
    for index in range(args.repeats + 3):
        for stepper, measured in zip(steppers, times):
            seconds = stepper.seconds(index)
            if index >= 3:
                measured.append(seconds)
    baseline = statistics.median(times[0])
    for (name, objective, _), measured in zip(rows, times):
        seconds = statistics.median(measured)
        verdict = "" if objective.prediction != "average_velocity" else (
            f"  (goal <= {GOAL}x: {'met' if seconds / baseline <= GOAL else 'not met'})")
        print(f"{name:52s} {seconds * 1e3:8.1f} ms  {seconds / baseline:5.2f}x the FM step{verdict}")


if __name__ == "__main__":
    main()
