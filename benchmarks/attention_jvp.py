"""What forward-mode AD through the DiT costs, with our attention and with a written-out math attention.

For the flowers demo DiT (hidden 192, depth 6, 3 heads, 32 x 8 x 8 latents, 5 classes) at patch 2 and patch 1,
one batch, median over interleaved rounds after warm-up:

- forward: `model(x, t, class_labels)` under no_grad (the ordinary path: fused SDPA);
- forward+backward: the same with grad and `.backward()` of a squared loss;
- jvp: `torch.func.jvp` along (dx, dt) under no_grad (primal and tangent, as a MeanFlow target is made) through
  `latentflow.models.attention.attention` (fused SDPA forward, closed-form jvp);
- jvp math: the same with the DiT's attention replaced by softmax(q k^T / sqrt(d)) v written out;
- jvp+backward: jvp with grad, then `.backward()` through the primal output (a MeanFlow training step's core).

Usage:
    python benchmarks/attention_jvp.py --batch 64 --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch

from latentflow.models import make_model
from latentflow.models.attention import math_attention

DEMO_DIT = {"in_channels": 32, "sample_size": 8, "num_classes": 5, "hidden_size": 192, "depth": 6, "num_heads": 3}


def median_ms(steps: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, float]:
    """Median wall time in ms of each step over `repeats` rounds after `warmup` rounds; each round runs every
    step once, so a load change on a shared machine hits all steps alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def make_steps(model: torch.nn.Module, batch: int) -> dict[str, Callable[[], object]]:
    """The measured calls on one random batch, by name."""
    generator = torch.Generator().manual_seed(0)
    x, x_tangent = (torch.randn(batch, 32, 8, 8, generator=generator) for _ in range(2))
    t, labels = torch.rand(batch, generator=generator), torch.randint(0, 5, (batch,), generator=generator)
    f = lambda x_t, times: model(x_t, times, class_labels=labels)
    jvp = lambda: torch.func.jvp(f, (x, t), (x_tangent, torch.ones_like(t)))

    def no_grad(step: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return step()
        return run

    def jvp_math() -> object:
        with mock.patch("latentflow.models.dit.attention", math_attention), torch.no_grad():
            return jvp()

    return {
        "forward": no_grad(lambda: f(x, t)),
        "forward+backward": lambda: f(x, t).square().mean().backward(),
        "jvp": no_grad(jvp),
        "jvp math": jvp_math,
        "jvp+backward": lambda: jvp()[0].square().mean().backward(),
    }


def bench_model(patch_size: int, batch: int, warmup: int, repeats: int) -> None:
    """Print ms and the ratio to the ordinary forward for each measured call of one DiT."""
    torch.manual_seed(0)
    model = make_model("dit", patch_size=patch_size, **DEMO_DIT)  # = "DiT-S/2" with the demo's overrides at p=2
    tokens = (8 // patch_size) ** 2
    print(f"DiT hidden 192 depth 6 heads 3 patch {patch_size} ({tokens} tokens), batch {batch}:")
    results = median_ms(make_steps(model, batch), warmup, repeats)
    for name, milliseconds in results.items():
        print(f"  {name:>17}: {milliseconds:8.1f} ms  {milliseconds / results['forward']:5.2f} x forward")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--patches", default="2,1", help="comma-separated patch sizes")
    args = parser.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats} after "
          f"{args.warmup} warm-up calls")
    for patch_size in (int(p) for p in args.patches.split(",")):
        bench_model(patch_size, args.batch, args.warmup, args.repeats)


if __name__ == "__main__":
    main()
