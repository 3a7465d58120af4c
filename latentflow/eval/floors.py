"""The floors every FID/KID stands beside, at the same sample count n:

- real against real: n training images against the reference (what real photos of the data score);
- the VAE floor: the same n training images after a round trip through the pipeline's VAE (encode, decode),
  against the reference: what a perfect model of the latent cache would score.

Computed once per (training folder, n, seed, resolution, VAE weights, reference) and cached as JSON.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from latentflow.errors import LatentflowError
from latentflow.eval.features import FeatureExtractor
from latentflow.eval.references import FeatureAccumulator, iterate_image_batches, list_images
from latentflow.eval.statistics import FeatureStatistics, SampleMetrics, compare_statistics
from latentflow.io import json_sha256, read_json, write_json_atomic

RoundTrip = Callable[[torch.Tensor], torch.Tensor]
"""uint8 images (B, 3, H, W) -> float images (B, 3, H, W) in [0, 1]."""


@dataclass
class Floors:
    """Real-against-real and VAE-floor metrics of n training images against a reference."""

    n: int
    real: SampleMetrics
    vae: SampleMetrics

    def rows(self) -> list[dict]:
        """CSV/JSON rows in the shape of a sweep row (no solver, no NFE)."""
        return [{"setting": f"floor: {name}", "fid": metrics.fid, "kid": metrics.kid, "kid_std": metrics.kid_std,
                 "fd_dinov2": metrics.fd_dinov2, "num_samples": metrics.num_samples}
                for name, metrics in (("real vs real", self.real), ("VAE round trip", self.vae))]


def vae_round_trip(vae: torch.nn.Module) -> RoundTrip:
    """Encode and decode with a diffusers autoencoder (the posterior mean for a KL VAE), in its raw latent space
    (the scale and shift cancel)."""
    parameter = next(vae.parameters())

    @torch.no_grad()
    def round_trip(images: torch.Tensor) -> torch.Tensor:
        pixels = (images.to(parameter.device, torch.float32) / 127.5 - 1).to(parameter.dtype)  # [-1, 1]
        encoded = vae.encode(pixels)
        latents = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents
        decoded = vae.decode(latents)
        decoded = decoded.sample if hasattr(decoded, "sample") else decoded
        return (decoded.float().clamp(-1, 1) / 2 + 0.5).cpu()

    return round_trip


def floor_files(train_dir: str | os.PathLike, n: int, seed: int = 0) -> list[Path]:
    """n training images drawn without replacement (seeded), in a fixed order."""
    files = list_images(train_dir)
    if len(files) < n:
        raise LatentflowError(f"floors need {n} training images (as many as the samples); {train_dir} has "
                              f"{len(files)}: lower --n or give a larger --floors folder")
    chosen = np.random.default_rng(seed).choice(len(files), n, replace=False)
    return [files[index] for index in sorted(chosen)]


def compute_floors(files: Sequence[Path], reference: dict[str, FeatureStatistics],
                   extractors: Sequence[FeatureExtractor], round_trip: RoundTrip, resolution: int | None,
                   batch_size: int = 50, kid_subsets: int = 100, kid_subset_size: int = 1000,
                   seed: int = 0) -> Floors:
    """Both floors in one pass over the training images (resized and cropped as the references are)."""
    real, through_vae = FeatureAccumulator(extractors), FeatureAccumulator(extractors)
    for batch in iterate_image_batches(files, batch_size, resolution):
        real.update(batch)
        through_vae.update(round_trip(batch))
    compare = lambda accumulator: compare_statistics(accumulator.statistics(), reference, kid_subsets,  # noqa: E731
                                                     kid_subset_size, seed)
    return Floors(len(files), compare(real), compare(through_vae))


def floors_cache_key(train_dir: str | os.PathLike, n: int, seed: int, resolution: int | None, vae_sha256: str,
                     reference: str | os.PathLike, kid_subset_size: int) -> str:
    """What the cached floors depend on, hashed."""
    parts = [str(Path(train_dir).resolve()), n, seed, resolution, vae_sha256, str(Path(reference).resolve()),
             kid_subset_size]
    return json_sha256(parts)[:16]


def cached_floors(cache_file: Path, compute: Callable[[], Floors]) -> Floors:
    """The floors stored in `cache_file`, else computed and stored there."""
    if cache_file.is_file():
        data = read_json(cache_file, "cached floors")
        return Floors(int(data["n"]), SampleMetrics(**data["real"]), SampleMetrics(**data["vae"]))
    floors = compute()
    write_json_atomic(cache_file, {"n": floors.n, "real": asdict(floors.real), "vae": asdict(floors.vae)})
    return floors
