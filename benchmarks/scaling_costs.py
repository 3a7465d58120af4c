"""What scaling costs, per optimizer step: the bytes DDP all-reduces for each model preset, the bytes
`objective.ot_scope: global` gathers, and the time its global assignment takes, for 8, 64 and 256 ranks.

Counted, not guessed: the gradient bytes are the presets' parameter counts (built on the meta device) times the
gradient's bytes (float32 under bf16 autocast); the gathered bytes are noise, latents (float32) and labels (int64)
of every rank's batch, which each rank receives; the global assignment (`ExactOTCoupling`, the same on every rank,
on the CPU as in training) is timed here on SD-VAE-shaped latents (4 x 32 x 32) at the global batch.
A ring all-reduce moves about 2 (W - 1) / W times the gradient bytes per rank.

    .venv/bin/python benchmarks/scaling_costs.py [--per-rank 32] [--ranks 8,64,256] [--presets DiT-B/2,DiT-XL/2]
"""

from __future__ import annotations

import argparse
import time

import torch

from latentflow.flow.couplings import make_coupling
from latentflow.models import make_model

LATENT = (4, 32, 32)


def parameter_count(preset: str) -> int:
    """Trainable parameters of a preset on SD-VAE latents with 1,000 classes (built on the meta device)."""
    with torch.device("meta"):
        model = make_model(preset, in_channels=LATENT[0], sample_size=LATENT[1], num_classes=1000)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def gathered_bytes(ranks: int, per_rank: int) -> int:
    """What one rank receives for global OT: every rank's noise and latents (float32) and labels (int64)."""
    elements = per_rank * torch.Size(LATENT).numel()
    return ranks * (2 * elements * 4 + per_rank * 8)


def assignment_seconds(rows: int, repeats: int) -> float:
    """Fastest time of the exact global plan (cost matrix and assignment) for `rows` latents, over `repeats`."""
    generator = torch.Generator().manual_seed(rows)
    x0 = torch.randn(rows, *LATENT, generator=generator)
    x1 = torch.randn(rows, *LATENT, generator=generator) * 0.5 + 0.3
    coupling, best = make_coupling("exact"), float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        coupling(x0, x1, None, generator)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-rank", type=int, default=32, help="latents per rank per step (DiT recipe: 256 / 8)")
    parser.add_argument("--ranks", default="8,64,256")
    parser.add_argument("--presets", default="DiT-S/2,DiT-B/2,DiT-L/2,DiT-XL/2")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    print("gradient all-reduce per step (float32 gradients; a ring moves ~2x this per rank):")
    for preset in args.presets.split(","):
        count = parameter_count(preset)
        print(f"  {preset:9s} {count / 1e6:7.1f}M parameters: {count * 4 / 2**20:8.1f} MiB")
    print(f"global OT per step, {args.per_rank} latents of {'x'.join(map(str, LATENT))} per rank:")
    for world in ranks:
        rows = world * args.per_rank
        seconds = assignment_seconds(rows, args.repeats)
        print(f"  {world:4d} ranks: gathers {gathered_bytes(world, args.per_rank) / 2**20:8.1f} MiB per rank; the "
              f"global plan for {rows:5d} rows takes {seconds * 1000:9.1f} ms on this CPU", flush=True)


if __name__ == "__main__":
    main()
