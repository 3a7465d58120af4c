"""The exported pipeline format: the sampling-settings component, and export of a training run.

A pipeline folder (written by `LatentFlowPipeline.save_pretrained`, or `latentflow export`) holds:

    model_index.json            diffusers' index: transformer, vae, scheduler with their classes
    transformer/                the EMA DiT or U-Net (config.json + safetensors)
    vae/                        the VAE the latent cache was encoded with
    scheduler/scheduler_config.json   LatentFlowScheduler: solver defaults, prediction type, DDPM schedule,
                                latent shape and channel statistics, classes, the VAE's fingerprint
    cache_manifest.json         the latent cache's manifest (exports only)

`LatentFlowScheduler` lives here, in the installed `latentflow` package, so that `model_index.json` names an
importable module (`latentflow.export`) whichever way the pipeline class itself was loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from diffusers import SchedulerMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from latentflow import atomic
from latentflow.errors import LatentflowError
from latentflow.objectives import DDPMSchedule

PREDICTION_TYPES = ("velocity", "noise")
CACHE_MANIFEST_NAME = "cache_manifest.json"


class LatentFlowScheduler(SchedulerMixin, ConfigMixin):
    """Sampling settings of a latent flow (or DDPM) model; stateless, saved as `scheduler/scheduler_config.json`.

    It is a `SchedulerMixin` only so that diffusers knows how to save and load it as a pipeline component; the
    integration itself is `latentflow.solvers.integrate` (velocity models) or `ddim_sample` (noise models).

    Args:
        prediction_type: "velocity" (flow matching) or "noise" (DDPM, sampled with DDIM).
        solver: default solver: a torchdiffeq method for velocity models, "ddim" for noise models.
        num_inference_steps: default steps (fixed-step solvers and DDIM).
        atol, rtol: default tolerances of adaptive solvers.
        eta: default DDIM stochasticity (0 deterministic, 1 ancestral DDPM).
        ddpm_num_train_timesteps, ddpm_beta_start, ddpm_beta_end: the DDPM schedule a noise model was trained with.
        latent_channels: C of the model-space latents.
        latent_size: [h, w] of the latents.
        latent_mean, latent_std: per-channel statistics (C,) the model's latents were normalised with, or None
            when it was trained on the cache's latents as they are.
        num_classes: number of real classes (0: unconditional).
        null_class: class id meaning "no class" for classifier-free guidance (None: num_classes).
        label_names: class names in id order, or None.
        vae_fingerprint: what identifies the VAE the cache was encoded with (see `vae_fingerprint`), or None.
        objective: the training objective's name, for the record.
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(
        self,
        prediction_type: str = "velocity",
        solver: str | None = None,
        num_inference_steps: int = 8,
        atol: float = 1e-5,
        rtol: float = 1e-5,
        eta: float = 0.0,
        ddpm_num_train_timesteps: int = DDPMSchedule.num_train_timesteps,
        ddpm_beta_start: float = DDPMSchedule.beta_start,
        ddpm_beta_end: float = DDPMSchedule.beta_end,
        latent_channels: int = 4,
        latent_size: Sequence[int] = (32, 32),
        latent_mean: Sequence[float] | None = None,
        latent_std: Sequence[float] | None = None,
        num_classes: int = 0,
        null_class: int | None = None,
        label_names: Sequence[str] | None = None,
        vae_fingerprint: dict[str, Any] | None = None,
        objective: str | None = None,
    ) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise LatentflowError(f"prediction_type {prediction_type!r} is not one of {list(PREDICTION_TYPES)}")
        if (latent_mean is None) != (latent_std is None):
            raise LatentflowError("latent_mean and latent_std must be given together (or both None)")
        for name, values in (("latent_mean", latent_mean), ("latent_std", latent_std)):
            if values is not None and len(values) != latent_channels:
                raise LatentflowError(f"{name} has {len(values)} entries; expected latent_channels={latent_channels}")
        if label_names is not None and len(label_names) != num_classes:
            raise LatentflowError(f"label_names has {len(label_names)} entries; expected num_classes={num_classes}")

    @property
    def default_solver(self) -> str:
        """The solver used when the caller names none."""
        return self.config.solver or ("ddim" if self.config.prediction_type == "noise" else "euler")

    @property
    def null_class_id(self) -> int:
        """The class id of the null (unconditional) class."""
        null = self.config.null_class
        return self.config.num_classes if null is None else int(null)

    def ddpm_schedule(self) -> DDPMSchedule:
        """The DDPM schedule of a noise-prediction model."""
        return DDPMSchedule(
            num_train_timesteps=self.config.ddpm_num_train_timesteps,
            beta_start=self.config.ddpm_beta_start,
            beta_end=self.config.ddpm_beta_end,
        )

    def channel_statistics(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean (1, C, 1, 1), std (1, C, 1, 1)) float32 for de-normalising, or None."""
        if self.config.latent_mean is None:
            return None
        mean = torch.tensor(self.config.latent_mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.config.latent_std, dtype=torch.float32).view(1, -1, 1, 1)
        return mean, std

    def class_id(self, label: int | str) -> int:
        """A class id from an id or a label name; raises LatentflowError listing the valid ones."""
        names = list(self.config.label_names or [])
        if isinstance(label, str):
            if label in names:
                return names.index(label)
            if label.isdigit():
                label = int(label)
            else:
                raise LatentflowError(f"unknown class {label!r}; choose one of {names or 'the ids 0..num_classes-1'}")
        if not 0 <= int(label) < self.config.num_classes:
            raise LatentflowError(f"class id {label} out of range 0..{self.config.num_classes - 1} ({names})")
        return int(label)


# ----------------------------------------------------------------------------------------------------------------
# VAE fingerprints: what makes latents decodable by a VAE
# ----------------------------------------------------------------------------------------------------------------


def _config_value(vae: torch.nn.Module, key: str) -> Any:
    return getattr(getattr(vae, "config", None), key, None) if hasattr(vae, "config") else None


def vae_fingerprint(vae: torch.nn.Module) -> dict[str, Any]:
    """A JSON-able fingerprint of a diffusers VAE: class, latent channels, scaling/shift and a weights hash.

    The hash covers parameter names, shapes and float32 values (in name order), so it survives a save/load
    round trip but not a change of weights.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {
        "class_name": type(vae).__name__,
        "latent_channels": _config_value(vae, "latent_channels"),
        "scaling_factor": _config_value(vae, "scaling_factor"),
        "shift_factor": _config_value(vae, "shift_factor"),
        "weights_sha256": digest.hexdigest(),
    }


def check_vae_fingerprint(expected: dict[str, Any] | None, vae: torch.nn.Module, where: str) -> None:
    """Raise LatentflowError when `vae` is not the VAE described by `expected` (skipped when None).

    The weights hash is compared only while the VAE is in float32 (a half-precision copy is checked by class,
    channels and scaling/shift alone).
    """
    if not expected:
        return
    actual = vae_fingerprint(vae)
    compared = set(actual)
    if any(tensor.dtype != torch.float32 for tensor in vae.state_dict().values()):
        compared.discard("weights_sha256")  # the hash is defined on float32 weights; a cast VAE can't match it
    differing = {key: (expected.get(key), actual[key]) for key in sorted(compared) if expected.get(key) != actual[key]}
    if differing:
        details = "; ".join(f"{key}: expected {want!r}, got {have!r}" for key, (want, have) in differing.items())
        raise LatentflowError(
            f"{where}: the VAE is not the one the latents were encoded with ({details}). "
            "Use the VAE from the latent cache's manifest."
        )


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON to `path` atomically (sorted keys)."""
    return atomic.write_json_atomic(path, data, indent=2, sort_keys=True)


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """Read a JSON object, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise LatentflowError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise LatentflowError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def replace_directory(staging: Path, target: Path) -> None:
    """Move a fully written `staging` folder to `target`, replacing an old one."""
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def load_pipeline(pipe_dir: str | os.PathLike, device: torch.device | str = "cpu", progress: bool = True):
    """Load a saved LatentFlowPipeline from a local folder (no network) and move it to `device`."""
    from pipelines.pipeline_latentflow import LatentFlowPipeline

    index = Path(pipe_dir) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(
            f"no pipeline at {pipe_dir} (missing model_index.json); write one with `latentflow export`"
        )
    pipe = LatentFlowPipeline.from_pretrained(str(pipe_dir), local_files_only=True).to(device)
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    return pipe


# ----------------------------------------------------------------------------------------------------------------
# Export of a training run
# ----------------------------------------------------------------------------------------------------------------

RUN_MODEL_DIR = "model"
RUN_MANIFEST = "cache_manifest.json"
RUN_CONFIG = "config.yaml"
VAE_IDENTITY_KEYS = ("class", "files", "scaling_factor", "shift_factor", "latent_channels")


def _identity_key(identity: dict[str, Any]) -> dict[str, Any]:
    """The parts of a VAE identity that decide whether latents decode: weights (file hashes, else the source)
    and the model-space factors."""
    keys = VAE_IDENTITY_KEYS if identity.get("files") else ("class", "source", *VAE_IDENTITY_KEYS[2:])
    return {key: identity.get(key) for key in keys}


def check_vae_matches_manifest(identity: dict[str, Any], manifest: dict[str, Any], where: str) -> None:
    """Refuse a VAE whose identity (from `latentflow.vae.load_vae`) differs from the cache manifest's."""
    expected, actual = _identity_key(manifest["vae"]), _identity_key(identity)
    differing = [key for key in expected if expected[key] != actual.get(key)]
    if differing:
        details = "; ".join(f"{key}: cache {expected[key]!r}, VAE {actual.get(key)!r}" for key in differing)
        raise LatentflowError(f"{where}: this VAE is not the one the cache was encoded with ({details})")


def scheduler_from_run(config: Any, manifest: dict[str, Any], vae_module: torch.nn.Module) -> LatentFlowScheduler:
    """The sampling settings of a trained run: objective, latent shape/statistics, classes, sample defaults."""
    from latentflow.objectives import make_objective

    prediction = make_objective(config.objective.name).prediction
    channels, height, width = manifest["latent_shape"]
    normalize = bool(config.data.normalize)
    defaults = DDPMSchedule()
    return LatentFlowScheduler(
        prediction_type=prediction,
        solver="ddim" if prediction == "noise" else config.sample.solver,
        num_inference_steps=config.sample.steps,
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


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, vae: str | None = None) -> Path:
    """Turn a training run folder into a pipeline folder.

    Args:
        run_dir: a `latentflow train` output: `model/` (EMA weights, diffusers format), `cache_manifest.json`
            and `config.yaml`.
        out_dir: the pipeline folder to write (replaced atomically if it exists).
        vae: where to load the VAE from, overriding the source recorded in the cache manifest; it must still be
            the same VAE (same weight hashes and factors).

    Returns:
        The pipeline folder.
    """
    from latentflow.config import load_config
    from latentflow.models import load_model
    from latentflow.training import vae_source
    from latentflow.vae import load_vae
    from pipelines.pipeline_latentflow import LatentFlowPipeline

    run, out = Path(run_dir), Path(out_dir)
    manifest = read_json(run / RUN_MANIFEST, "cache manifest of the run")
    config = load_config(run / RUN_CONFIG)
    if not (run / RUN_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(f"no EMA model at {run / RUN_MODEL_DIR}; is {run} a finished `latentflow train` run?")
    model = load_model(run / RUN_MODEL_DIR).eval()
    frozen = load_vae(vae or vae_source(manifest["vae"]))
    check_vae_matches_manifest(frozen.identity, manifest, f"export {run}")
    pipe = LatentFlowPipeline(transformer=model, vae=frozen.module,
                              scheduler=scheduler_from_run(config, manifest, frozen.module))
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(str(staging), safe_serialization=True)
    write_json_atomic(staging / CACHE_MANIFEST_NAME, manifest)
    shutil.copyfile(run / RUN_CONFIG, staging / "training_config.yaml")
    replace_directory(staging, out)
    return out
