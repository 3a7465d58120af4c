"""`LatentFlowScheduler`: the sampling-settings component of a pipeline folder (`scheduler/scheduler_config.json`).

It lives in the installed `latentflow` package so that `model_index.json` names an importable module whichever
way the pipeline class itself was loaded (folders written before 0.2 name `latentflow.export`, which re-exports it).
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import torch
from diffusers import SchedulerMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from latentflow.errors import LatentflowError
from latentflow.flow.guidance import check_guidance_scale
from latentflow.flow.schedules import DDPMSchedule, check_time_shift
from latentflow.flow.solvers import PREDICTIONS

PREDICTION_TYPES = PREDICTIONS


class LatentFlowScheduler(SchedulerMixin, ConfigMixin):
    """Sampling settings of a latent flow (or DDPM) model; stateless, saved as `scheduler/scheduler_config.json`.

    It is a `SchedulerMixin` only so that diffusers knows how to save and load it as a pipeline component; the
    integration itself is `latentflow.flow.solvers.integrate` (velocity models) or `ddim_sample` (noise models).

    Args:
        prediction_type: "velocity" (flow matching), "noise" (DDPM, sampled with DDIM) or "average_velocity" (a
            flow map, objective meanflow: sampled with "flowmap" in exactly as many evaluations as steps).
        solver: default solver: a torchdiffeq method for velocity models, "ddim" for noise models.
        num_inference_steps: default steps (fixed-step solvers and DDIM).
        atol, rtol: default tolerances of adaptive solvers.
        eta: default DDIM stochasticity (0 deterministic, 1 ancestral DDPM).
        time_shift: default shift of the grid of fixed-step ODE solvers and flow-map jumps towards the noise (1:
            evenly spaced steps; `latentflow.flow.schedules.shift_times`).
        guidance_scale: default classifier-free guidance w of class-conditional models (1: none; export takes the
            run's `sample.guidance_scale`, what its previews were sampled with).
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
        time_shift: float = 1.0,
        guidance_scale: float = 1.0,
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
        check_time_shift(time_shift)
        check_guidance_scale(guidance_scale)
        if guidance_scale != 1.0 and not num_classes:
            raise LatentflowError(f"guidance_scale {guidance_scale} needs a class-conditional model (num_classes > 0)")
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
        defaults = {"noise": "ddim", "average_velocity": "flowmap"}
        return self.config.solver or defaults.get(self.config.prediction_type, "euler")

    def guidance(self, scale: float | None) -> float:
        """`scale`, or when None the pipeline's default `guidance_scale`: one rule for the pipeline, `sample` and
        `evaluate`."""
        return float(self.config.guidance_scale) if scale is None else scale

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
        if isinstance(label, bool) or not isinstance(label, numbers.Real) or not float(label).is_integer():
            raise LatentflowError(f"class label {label!r} is neither a class name nor an integer id; choose one of "
                                  f"{names or 'the ids 0..num_classes-1'}")
        if not 0 <= int(label) < self.config.num_classes:
            raise LatentflowError(f"class id {label} out of range 0..{self.config.num_classes - 1} ({names})")
        return int(label)
