"""Preview grids while training: fixed-noise samples of the EMA model, decoded by the cache's VAE."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from latentflow.errors import LatentflowError
from latentflow.flow.guidance import guided_field
from latentflow.flow.metrics import path_straightness
from latentflow.flow.solvers import FLOW_MAP_SOLVERS, ddim_sample, integrate, sample_flow_map
from latentflow.io import image_grid, save_image
from latentflow.train.config import SampleConfig
from latentflow.vae import FrozenVAE, load_vae, vae_source


def load_preview_vae(accelerator: Accelerator, sample_vae: str | None, cache_vae_identity: dict) -> FrozenVAE | None:
    """The VAE for preview grids on the main process (None elsewhere); every process fails together."""
    vae, error = None, None
    if accelerator.is_main_process:
        try:
            vae = load_vae(sample_vae or vae_source(cache_vae_identity), device=accelerator.device)
        except (LatentflowError, OSError) as caught:
            error = caught
    failures = accelerator.reduce(torch.tensor([float(error is not None)], device=accelerator.device))
    if error is not None:
        raise LatentflowError(f"sample grids need the cache's VAE: {error} (set sample.vae, or sample.every=0)")
    if float(failures) > 0:
        raise LatentflowError("the main process could not load the VAE for sample grids (see its error)")
    return vae


@torch.no_grad()
def preview_latents(model: torch.nn.Module, sample: SampleConfig, latent_shape: tuple[int, ...], num_classes: int,
                    prediction: str, device: torch.device) -> tuple[torch.Tensor, float | None]:
    """Fixed-noise samples of `model` (class i % num_classes for image i, guided by `sample.guidance_scale`).

    Returns:
        (N, C, h, w) latents in the model's space, and the path straightness (None for noise models and flow
        maps sampled with the flow-map sampler).
    """
    generator = torch.Generator().manual_seed(sample.seed)
    noise = torch.randn((sample.num_images, *latent_shape), generator=generator).to(device)
    labels = (torch.arange(sample.num_images) % num_classes).to(device) if num_classes else None
    scale = sample.guidance_scale if labels is not None else 1.0
    field = guided_field(lambda x, t, c: model(x, t, c).float(), labels, num_classes, scale)
    if prediction == "noise":
        return ddim_sample(field, noise, steps=sample.steps).x, None
    if sample.solver in FLOW_MAP_SOLVERS:
        average = guided_field(lambda x, t, c, r: model(x, t, c, r=r).float(), labels, num_classes, scale)
        return sample_flow_map(average, noise, sample.steps).x, None
    out = integrate(field, noise, method=sample.solver, steps=sample.steps, return_trajectory=True)
    return out.x, path_straightness(field, out.trajectory, out.times)


def write_preview(vae: FrozenVAE, latents: torch.Tensor, channel_mean: torch.Tensor | None,
                  channel_std: torch.Tensor | None, path: Path) -> Path:
    """Decode model-space latents (de-normalised with the channel statistics when given) to a PNG grid."""
    from latentflow.vae import decode_latents

    with torch.inference_mode():
        images = decode_latents(vae.module, latents, channel_mean, channel_std)  # (N, 3, H, W) in [-1, 1]
    return save_image(image_grid(images / 2 + 0.5), path)
