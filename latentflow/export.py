"""Export of a training run as a pipeline folder, and loading one.

A pipeline folder (written by `LatentFlowPipeline.save_pretrained`, or `latentflow export`) holds:

    model_index.json            diffusers' index: transformer, vae, scheduler with their classes
    transformer/                the EMA DiT or U-Net (config.json + safetensors)
    guide/                      optional: a weaker model of the same latents whose null-class prediction is
                                guidance's unconditional branch (the run's `guide/`, see `train.guide_step`)
    vae/                        the VAE the latent cache was encoded with
    scheduler/scheduler_config.json   LatentFlowScheduler: solver defaults, prediction type, DDPM schedule,
                                latent shape and channel statistics, classes, the VAE's fingerprint
    pipeline.py                 the pipeline's source, for `custom_pipeline=DIR`
    cache_manifest.json         the latent cache's manifest (exports only)
    training_config.yaml        the run's resolved config (exports only)

Pipeline folders written before 0.2 name `latentflow.export.LatentFlowScheduler` in `model_index.json` and
import `check_vae_fingerprint` from here in their `pipeline.py`: both names stay importable from this module.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import SchedulerMixin  # noqa: F401  (diffusers finds a component's loader through the module

# model_index.json names: 0.1.0 folders name this one for the scheduler)
from latentflow.card import GRID_NAME, TRAINING_CONFIG_NAME, write_model_card
from latentflow.errors import LatentflowError, first_line, require_count
from latentflow.flow.objectives import make_objective
from latentflow.flow.schedules import DDPMSchedule
from latentflow.flow.solvers import FLOW_MAP_SOLVERS
from latentflow.io import (
    PIPELINE_MARKER,
    check_folder_target,
    image_grid,
    read_json,
    save_image,
    write_folder_atomic,
    write_json_atomic,
)
from latentflow.processes import torch_device
from latentflow.scheduler import LatentFlowScheduler
from latentflow.train.checkpoint import CACHE_MANIFEST_FILE, CONFIG_FILE, MODEL_DIR
from latentflow.vae import check_same_vae, check_vae_fingerprint, vae_fingerprint

__all__ = ["LatentFlowScheduler", "check_vae_fingerprint", "export_run", "load_pipeline", "pipeline_from_run",
           "scheduler_from_run"]

PIPELINE_KIND = "pipeline folder"


def load_pipeline(pipe_dir: str | os.PathLike, device: torch.device | str = "cpu", progress: bool = True,
                  guide: bool = True):
    """Load a saved LatentFlowPipeline from a local folder (no network) and move it to `device`; `guide=False`
    leaves out the folder's guide (guidance then takes its unconditional branch from the model itself);
    `progress=False` shows no bar, neither diffusers' while loading nor the pipeline's while sampling."""
    from diffusers.utils import logging as diffusers_logging

    from latentflow.pipelines.pipeline_latentflow import LatentFlowPipeline

    index = Path(pipe_dir) / PIPELINE_MARKER
    if not index.is_file():
        raise FileNotFoundError(
            f"no pipeline at {pipe_dir} (missing {PIPELINE_MARKER}); write one with `latentflow export`"
        )
    device = torch_device(device)
    check_pipeline_folder(pipe_dir, skip=() if guide else ("guide",))
    extra = {} if guide else {"guide": None}
    shown = diffusers_logging.is_progress_bar_enabled()
    if not progress:
        diffusers_logging.disable_progress_bar()
    try:
        pipe = LatentFlowPipeline.from_pretrained(str(pipe_dir), local_files_only=True, **extra).to(device)
    except (OSError, ValueError) as error:  # a truncated weights file, a config that is no JSON
        raise LatentflowError(f"pipeline {pipe_dir} could not be loaded ({first_line(error)}); export it again with "
                              f"`latentflow export RUN --out {pipe_dir}`") from error
    finally:
        if shown:
            diffusers_logging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    return pipe


COMPONENT_CONFIGS = {"scheduler": "scheduler_config.json"}
"""Each component folder's config file where it is not config.json."""


def check_pipeline_folder(pipe_dir: str | os.PathLike, skip: tuple[str, ...] = ()) -> None:
    """Refuse a pipeline folder whose model_index.json names a component (other than `skip`) that has no folder and
    config, naming the first one missing, before diffusers' traceback would."""
    index = read_json(Path(pipe_dir) / PIPELINE_MARKER, "pipeline index")
    for name, value in index.items():
        if name.startswith("_") or name in skip or not isinstance(value, list) or None in value:
            continue
        config = Path(pipe_dir) / name / COMPONENT_CONFIGS.get(name, "config.json")
        if not config.is_file():
            raise LatentflowError(f"pipeline {pipe_dir} is incomplete: {config.relative_to(pipe_dir)} is missing "
                                  f"({PIPELINE_MARKER} names {name!r}); export it again with `latentflow export RUN "
                                  f"--out {pipe_dir}`")


def scheduler_from_run(config: Any, manifest: dict[str, Any], vae_module: torch.nn.Module) -> LatentFlowScheduler:
    """The sampling settings of a trained run: objective, latent shape/statistics, classes, sample defaults."""
    prediction = make_objective(config.objective.name).prediction
    solver, steps = config.sample.solver, config.sample.steps
    if prediction == "noise":
        solver = "ddim"
    elif prediction == "average_velocity" and solver not in FLOW_MAP_SOLVERS:
        solver, steps = FLOW_MAP_SOLVERS[0], 1  # a flow map's point: one jump
    channels, height, width = manifest["latent_shape"]
    normalize = bool(config.data.normalize)
    defaults = DDPMSchedule()
    return LatentFlowScheduler(
        prediction_type=prediction,
        solver=solver,
        num_inference_steps=steps,
        guidance_scale=float(config.sample.guidance_scale) if manifest.get("num_classes") else 1.0,
        ddpm_num_train_timesteps=defaults.num_train_timesteps,
        ddpm_beta_start=defaults.beta_start,
        ddpm_beta_end=defaults.beta_end,
        latent_channels=channels,
        latent_size=[height, width],
        latent_mean=list(manifest["channel_mean"]) if normalize else None,
        latent_std=list(manifest["channel_std"]) if normalize else None,
        num_classes=int(manifest["num_classes"]),
        label_names=manifest.get("label_names") if manifest["num_classes"] else None,
        vae_fingerprint=vae_fingerprint(vae_module),
        objective=config.objective.name,
    )


def sample_grid_images(pipe, count: int, seed: int = 0) -> torch.Tensor:
    """(count, 3, H, W) images in [0, 1] with the pipeline's default sampler; classes balanced when conditional."""
    from latentflow.eval.sweep import SamplerSetting, generate_batches

    scheduler = pipe.scheduler
    pipe.set_progress_bar_config(disable=True)
    setting = SamplerSetting(scheduler.default_solver)  # with the pipeline's steps, or tolerance if adaptive
    return torch.cat([batch.images for batch in generate_batches(pipe, count, setting, 16, seed)])


def push_to_hub(folder: str | os.PathLike, repo_id: str, token: str | None = None) -> str:
    """Upload a finished pipeline folder to a Hugging Face Hub model repo (created if missing); returns its URL."""
    from huggingface_hub import HfApi

    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model")
    except Exception as error:  # offline, no token, no rights: one line naming the repo and what to do
        raise LatentflowError(f"push of {folder} to the Hub repo {repo_id} failed ({first_line(error)}); the folder is "
                              f"complete: log in (`hf auth login`) and push again, or upload it with "
                              f"`hf upload {repo_id} {folder}`") from error
    return f"https://huggingface.co/{repo_id}"


def pipeline_from_run(run_dir: str | os.PathLike, vae: str | None = None, where: str = "export",
                      guide: str | os.PathLike | bool = True):
    """The pipeline of a finished training run, built in memory: its EMA model, the cache's VAE, its sampling
    settings and its guide (see `export_run` for the arguments; `where` names the caller in errors).

    Returns:
        LatentFlowPipeline on the CPU.
    """
    from latentflow.models import load_model
    from latentflow.pipelines.pipeline_latentflow import LatentFlowPipeline
    from latentflow.train.config import load_config
    from latentflow.vae import load_vae, vae_source

    run = Path(run_dir)
    manifest = read_json(run / CACHE_MANIFEST_FILE, "cache manifest of the run")
    config = load_config(run / CONFIG_FILE)
    if not (run / MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"no EMA model at {run / MODEL_DIR}; is {run} a finished `latentflow train` run?")
    model = load_model(run / MODEL_DIR).eval()
    frozen = load_vae(vae or vae_source(manifest["vae"]))
    check_same_vae(manifest["vae"], frozen.identity, f"{where} {run}")
    return LatentFlowPipeline(transformer=model, vae=frozen.module,
                              scheduler=scheduler_from_run(config, manifest, frozen.module),
                              guide=load_guide(run, manifest, config.data.normalize, guide))


def load_guide(run: Path, manifest: dict[str, Any], normalize: bool, guide: str | os.PathLike | bool):
    """The guide model for a run's pipeline: True takes RUN/guide when the run wrote one, False none, a path the
    EMA model of that run or pipeline folder or checkpoint of a finished run, trained on the same latents."""
    from latentflow.models import load_model
    from latentflow.train.checkpoint import GUIDE_DIR
    from latentflow.train.init import check_same_latents, load_initial_model

    if guide is False or (guide is True and not (run / GUIDE_DIR / "config.json").is_file()):
        return None
    if guide is True:
        return load_model(run / GUIDE_DIR).eval()
    initial = load_initial_model(guide, flag="--guide")
    check_same_latents(initial, manifest, normalize, str(run))
    return initial.model


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, vae: str | None = None,
               grid_images: int = 16, license_name: str = "other", guide: str | os.PathLike | bool = True) -> Path:
    """Turn a training run folder into a pipeline folder.

    Args:
        run_dir: a `latentflow train` output: `model/` (EMA weights, diffusers format), `cache_manifest.json`
            and `config.yaml`.
        out_dir: the pipeline folder to write (replaced atomically if it exists).
        vae: where to load the VAE from, overriding the source recorded in the cache manifest; it must still be
            the same VAE (same weights and factors).
        grid_images: images in the folder's `samples.png` (seed 0, the default sampler; 0: no grid).
        license_name: the licence the model card's header names.
        guide: the pipeline's guide: True the run's `guide/` when it has one, False none, or a run or pipeline
            folder trained on the same latents (e.g. a smaller model).

    Returns:
        The pipeline folder.
    """
    require_count("--grid-images", grid_images, 0, " (0: no grid)")
    check_folder_target(out_dir, PIPELINE_MARKER, PIPELINE_KIND)
    run = Path(run_dir)
    pipe = pipeline_from_run(run, vae, guide=guide)
    manifest = read_json(run / CACHE_MANIFEST_FILE, "cache manifest of the run")

    def fill(staging: Path) -> None:
        pipe.save_pretrained(str(staging), safe_serialization=True)
        write_json_atomic(staging / CACHE_MANIFEST_FILE, manifest, sort_keys=True)
        shutil.copyfile(run / CONFIG_FILE, staging / TRAINING_CONFIG_NAME)
        if grid_images:
            save_image(image_grid(sample_grid_images(pipe, grid_images)), staging / GRID_NAME)
        write_model_card(staging, license_name, name=Path(out_dir).name)

    return write_folder_atomic(out_dir, fill, PIPELINE_MARKER, PIPELINE_KIND)
