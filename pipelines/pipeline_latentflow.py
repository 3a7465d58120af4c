"""LatentFlowPipeline: sample a latent flow-matching (or DDPM) model and decode with its VAE.

    from latentflow.pipelines import LatentFlowPipeline   # installed; `from pipelines import ...` in a checkout
    pipe = LatentFlowPipeline.from_pretrained("PIPE_DIR").to("cpu")
    out = pipe(batch_size=4, num_inference_steps=8, solver="euler", generator=torch.Generator().manual_seed(0))
    out.images[0].save("sample.png"); print(out.nfe)

or, without importing this module first, `DiffusionPipeline.from_pretrained("PIPE_DIR",
custom_pipeline="PIPE_DIR", trust_remote_code=True)` (save_pretrained puts a copy of this file in the folder as
pipeline.py; `custom_pipeline="pipelines/pipeline_latentflow.py"` works as well). diffusers runs this file,
which imports the `latentflow` modules that `model_index.json` names; the `latentflow` package must be installed.

Time convention: t=0 is noise x0 ~ N(0, I), t=1 is data. A velocity model is integrated with
`latentflow.flow.solvers.integrate` (any torchdiffeq method); a noise model (ddpm) with `ddim_sample`; a flow map
(objective meanflow) jumps with `sample_flow_map` (solver "flowmap": K steps, exactly K evaluations), or has its
diagonal u(x, t, t) = v(x, t) integrated like a velocity model.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from diffusers import DiffusionPipeline, ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

import latentflow.models  # noqa: F401  (model_index.json names latentflow.models.* classes)
import latentflow.vae  # the VAE may be a latentflow class, e.g. TAEF2's PooledAutoencoderTiny
from latentflow.errors import LatentflowError, require_count
from latentflow.flow.guidance import guided_field
from latentflow.flow.solvers import (
    FLOW_MAP_SOLVERS,
    STAGES_PER_STEP,
    Field,
    check_solver,
    check_solver_time_shift,
    check_stepping,
    ddim_sample,
    integrate,
    nfe_of,
    sample_flow_map,
    step_grid,
)
from latentflow.io import PIPELINE_MARKER, write_bytes_atomic
from latentflow.scheduler import LatentFlowScheduler

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CUSTOM_PIPELINE_FILE = "pipeline.py"  # the name diffusers looks for when custom_pipeline is a folder


def _expose_loading_base(module_name: str) -> None:
    """diffusers finds a component's loading method by looking up `ModelMixin` & co. as attributes of the module
    named in model_index.json; give our component modules that attribute where they don't import it."""
    module = sys.modules[module_name]
    if not hasattr(module, "ModelMixin"):
        module.ModelMixin = ModelMixin


for _name in ("latentflow.vae", "latentflow.models.dit", "latentflow.models.unet"):
    _expose_loading_base(_name)


@dataclass
class LatentFlowPipelineOutput(BaseOutput):
    """Output of LatentFlowPipeline.

    Attributes:
        images: list of PIL images, numpy (B, H, W, 3) in [0, 1], torch (B, 3, H, W) in [0, 1], or for
            output_type="latent" the latents (B, C, h, w) in the latent cache's space (decodable by the VAE).
        nfe: exact number of evaluations of the sampled field (velocity or noise); one evaluation covers the
            whole batch, and with classifier-free guidance the conditional and unconditional halves together.
        class_labels: (B,) class ids sampled with, or None for an unconditional model.
    """

    images: Any
    nfe: int
    class_labels: torch.Tensor | None = None


class LatentFlowPipeline(DiffusionPipeline):
    """Generate images by integrating a learned velocity field in a VAE's latent space.

    Args:
        transformer: the velocity (or noise) model, `model(x_t, t, class_labels=None)` with t in [0, 1].
        vae: the diffusers VAE the training latents were encoded with.
        scheduler: `LatentFlowScheduler`, the sampling settings and latent statistics.
        guide: optional weaker model on the same latents (an early EMA checkpoint of the same run, see
            `train.guide_step`): with guidance, its null-class prediction is the unconditional branch.
    """

    model_cpu_offload_seq = "transformer->guide->vae"
    _optional_components = ["guide"]

    def __init__(self, transformer: torch.nn.Module, vae: torch.nn.Module, scheduler: LatentFlowScheduler,
                 guide: torch.nn.Module | None = None) -> None:
        super().__init__()
        _check_components(transformer, vae, scheduler, guide)
        self.register_modules(transformer=transformer, vae=vae, scheduler=scheduler, guide=guide)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """diffusers' from_pretrained, after importing the `latentflow` modules a local folder's model_index.json
        names (diffusers loads components only from modules already imported; folders exported by earlier
        releases name modules this file does not import, e.g. `latentflow.export`)."""
        _import_named_latentflow_modules(Path(pretrained_model_name_or_path))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """diffusers' save_pretrained, plus this file as `pipeline.py` so that
        `DiffusionPipeline.from_pretrained(DIR, custom_pipeline=DIR, trust_remote_code=True)` finds the class."""
        super().save_pretrained(save_directory, **kwargs)
        write_bytes_atomic(Path(save_directory) / CUSTOM_PIPELINE_FILE, Path(__file__).read_bytes())

    # ------------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int | None = None,
        solver: str | None = None,
        atol: float | None = None,
        rtol: float | None = None,
        class_labels: int | str | Sequence[int | str] | torch.Tensor | None = None,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        use_guide: bool = True,
        eta: float | None = None,
        time_shift: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, float, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> LatentFlowPipelineOutput | tuple:
        """Sample images.

        Args:
            batch_size: number of images (taken from `latents` or a list of `class_labels` when given).
            num_inference_steps: steps of fixed-step solvers and DDIM (default: the scheduler's); refused for an
                adaptive solver, which picks its own.
            solver: torchdiffeq method for velocity models ("euler", "midpoint", "rk4", "dopri5", ...), "ddim"
                for noise models, "flowmap" (or an ODE method) for flow maps (default: the scheduler's).
            atol, rtol: tolerances of adaptive solvers (default: the scheduler's); refused for a fixed-step one.
            class_labels: ids or label names, one or one per image; None on a class-conditional model draws
                uniform labels with `generator`.
            guidance_scale: classifier-free guidance w, v = v_null + w (v_class - v_null); 1 means none (and no
                extra evaluations); default: the scheduler's `guidance_scale` (what the run's previews used; 1 in a
                pipeline exported before it was recorded).
            guidance_interval: (t_low, t_high): guide only at times low <= t <= high (t=0 noise, t=1 data), the
                conditional model alone elsewhere (None: guide at every time).
            use_guide: with guidance and a `guide` component, take the unconditional branch from the guide,
                v = g_null + w (v_class - g_null); False: from the model itself.
            eta: DDIM stochasticity for noise models (0 deterministic, 1 ancestral).
            time_shift: fixed-step ODE solvers and flow-map jumps: the step grid warped towards the noise,
                t' = t / (s - (s - 1) t) (SD3's shift; 1 evenly spaced, 2 puts the middle of the grid at t = 1/3;
                default: the scheduler's).
            generator: torch generator(s) for the initial noise, labels and DDIM noise.
            latents: (B, C, h, w) initial noise x0 at t=0 instead of drawing it.
            output_type: "pil", "np" (B, H, W, 3) in [0, 1], "pt" (B, 3, H, W) in [0, 1], or "latent".
            return_dict: return a LatentFlowPipelineOutput (else a tuple (images, nfe)).
            callback_on_step_end: called as fn(pipe, step, t, {"latents": x}) after each step of a one-step
                fixed-grid solver (euler, midpoint, heun2, heun3, rk4); may return {"latents": new_x}.
            callback_on_step_end_tensor_inputs: tensors passed to the callback (only "latents").

        Returns:
            LatentFlowPipelineOutput(images, nfe, class_labels).
        """
        if isinstance(class_labels, torch.Tensor) and class_labels.ndim == 0:
            class_labels = int(class_labels)
        settings = self._resolve_settings(num_inference_steps, solver, atol, rtol, eta, output_type, time_shift)
        device, dtype = self._execution_device, self.transformer.dtype
        x0 = self._initial_noise(batch_size, class_labels, generator, latents, device, dtype)
        labels = self._class_labels(class_labels, x0.shape[0], generator, device)
        field = self._guided_field(labels, self.scheduler.guidance(guidance_scale), guidance_interval, use_guide)
        if callback_on_step_end is not None:
            _check_callback(settings["solver"], callback_on_step_end_tensor_inputs)
        x1, nfe = self._sample(field, x0, settings, generator, callback_on_step_end)
        images = self._postprocess(x1, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, nfe
        return LatentFlowPipelineOutput(images=images, nfe=nfe, class_labels=labels)

    # ------------------------------------------------------------------------------------------------------------
    # settings and inputs

    def _resolve_settings(self, steps, solver, atol, rtol, eta, output_type, time_shift=None) -> dict[str, Any]:
        """Call arguments with the scheduler's defaults filled in, validated."""
        config = self.scheduler.config
        solver = solver or self.scheduler.default_solver
        check_stepping(solver, steps, atol)
        check_stepping(solver, None, rtol, tolerance_name="rtol")
        settings = {
            "solver": solver,
            "steps": config.num_inference_steps if steps is None else steps,
            "atol": config.atol if atol is None else atol,
            "rtol": config.rtol if rtol is None else rtol,
            "eta": config.eta if eta is None else eta,
            "time_shift": config.time_shift if time_shift is None else time_shift,
        }
        if output_type not in OUTPUT_TYPES:
            raise LatentflowError(f"output_type {output_type!r} is not one of {list(OUTPUT_TYPES)}")
        require_count("num_inference_steps", settings["steps"], 1)
        self.check_solver(settings["solver"])
        check_solver_time_shift(settings["solver"], settings["time_shift"])
        for name in ("atol", "rtol"):
            value = settings[name]
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
                raise LatentflowError(f"{name} must be a finite number > 0 (an adaptive solver's tolerance), "
                                      f"got {value!r}")
        eta = settings["eta"]
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0 <= eta < math.inf:
            raise LatentflowError(f"eta must be a finite number >= 0 (DDIM: 0 deterministic, 1 ancestral), got {eta!r}")
        if eta != 0 and settings["solver"] != "ddim":
            raise LatentflowError(f"eta={eta:g} is DDIM's stochasticity, and solver {settings['solver']!r} integrates "
                                  "a deterministic ODE; leave eta unset, or sample a ddpm pipeline with solver='ddim'")
        return settings

    def check_solver(self, solver: str) -> None:
        """Raise LatentflowError when this pipeline's model cannot be sampled with `solver`."""
        check_solver(solver, self.scheduler.config.prediction_type)

    def _latent_shape(self, batch_size: int) -> tuple[int, ...]:
        config = self.scheduler.config
        return (batch_size, config.latent_channels, *config.latent_size)

    def _initial_noise(self, batch_size, class_labels, generator, latents, device, dtype) -> torch.Tensor:
        """(B, C, h, w) noise x0 at t=0: the given latents, else drawn with `generator`."""
        if latents is not None:
            _check_latents(latents, self._latent_shape(1)[1:])
            _check_generators(generator, latents.shape[0])
            return latents.to(device=device, dtype=dtype)
        require_count("batch_size", batch_size, 1)
        if isinstance(class_labels, (list, tuple, torch.Tensor)) and batch_size == 1:
            if len(class_labels) == 0:
                raise LatentflowError("class_labels is empty; give one label, or one per image")
            batch_size = len(class_labels)
        _check_generators(generator, batch_size)
        return randn_tensor(self._latent_shape(batch_size), generator=generator, device=device, dtype=dtype)

    def _class_labels(self, class_labels, batch_size: int, generator, device) -> torch.Tensor | None:
        """(B,) long class ids, or None for an unconditional model."""
        num_classes = self.scheduler.config.num_classes
        if num_classes == 0:
            if class_labels is not None:
                raise LatentflowError("class_labels given, but this pipeline's model is unconditional")
            return None
        if class_labels is None:
            first = generator[0] if isinstance(generator, list) else generator
            drawn = torch.randint(num_classes, (batch_size,), generator=first, device=_generator_device(first))
            return drawn.to(device)
        if isinstance(class_labels, torch.Tensor):
            if class_labels.ndim > 1:
                raise LatentflowError(f"class_labels tensor has shape {tuple(class_labels.shape)}; give one label "
                                      f"(0-D) or one per image (B,)")
            class_labels = class_labels.reshape(-1).tolist()
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels] * batch_size
        ids = [self.scheduler.class_id(label) for label in class_labels]
        if len(ids) != batch_size:
            raise LatentflowError(f"got {len(ids)} class labels for a batch of {batch_size}")
        return torch.tensor(ids, dtype=torch.long, device=device)

    # ------------------------------------------------------------------------------------------------------------
    # the field and its integration

    def _model(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
               r: torch.Tensor | None = None) -> torch.Tensor:
        output = self.transformer(x, t, class_labels=labels) if r is None else self.transformer(x, t, labels, r=r)
        return output.sample if hasattr(output, "sample") else output

    def _guide_model(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                     r: torch.Tensor | None = None) -> torch.Tensor:
        labels = labels if getattr(self.guide.config, "num_classes", 0) else None
        inputs = x.to(self.guide.dtype)
        output = self.guide(inputs, t, class_labels=labels) if r is None else self.guide(inputs, t, labels, r=r)
        return (output.sample if hasattr(output, "sample") else output).to(x.dtype)  # back to the model's dtype

    def _guided_field(self, labels: torch.Tensor | None, guidance_scale: float,
                      guidance_interval: tuple[float, float] | None = None, use_guide: bool = True) -> Field:
        """field(x (B, C, h, w), t (B,)): the model's prediction, with classifier-free guidance when w != 1 (the
        unconditional branch from the guide when there is one and `use_guide`)."""
        if use_guide not in (True, False):  # numpy's bools and 0/1 too; a string such as "no" is not
            raise LatentflowError(f"use_guide must be True or False, got {use_guide!r}")
        guide = self._guide_model if use_guide and self.guide is not None else None
        return guided_field(self._model, labels, self.scheduler.null_class_id, guidance_scale, guidance_interval,
                            guide=guide)

    def _sample(self, field: Field, x0: torch.Tensor, settings: dict, generator, callback) -> tuple[torch.Tensor, int]:
        """Integrate from noise x0 (t=0) to data (t=1); returns (x1 (B, C, h, w), nfe)."""
        solver, steps = settings["solver"], settings["steps"]
        total = nfe_of(solver, steps)
        with self._progress(total) as bar:
            counted = _counting(field, bar)
            if solver == "ddim":
                first = generator[0] if isinstance(generator, list) else generator
                output = ddim_sample(counted, x0, self.scheduler.ddpm_schedule(), steps, settings["eta"], first)
                return output.x, output.nfe
            if solver in FLOW_MAP_SOLVERS:
                output = sample_flow_map(counted, x0, steps, time_shift=settings["time_shift"])
                return output.x, output.nfe
            if callback is not None:
                return self._integrate_stepwise(counted, x0, solver, steps, callback, settings["time_shift"])
            output = integrate(counted, x0, method=solver, steps=steps, atol=settings["atol"], rtol=settings["rtol"],
                               time_shift=settings["time_shift"])
            return output.x, output.nfe

    def _integrate_stepwise(self, field: Field, x: torch.Tensor, solver: str, steps: int, callback,
                            time_shift: float = 1.0) -> tuple:
        """One `integrate` call per grid interval [t_i, t_i+1] (time rescaled to [0, 1]), calling back after each."""
        grid = step_grid(steps, x.device, x.dtype, time_shift)
        nfe = 0
        for step in range(steps):
            start, width = grid[step], grid[step + 1] - grid[step]
            rescaled = _rescaled_field(field, start, width)
            output = integrate(rescaled, x, method=solver, steps=1)
            x, nfe = output.x, nfe + output.nfe
            returned = callback(self, step, float(grid[step + 1]), {"latents": x}) or {}
            x = returned.get("latents", x)
        return x, nfe

    def _progress(self, total: int | None):
        if total:
            return self.progress_bar(total=total)
        return tqdm(total=None, **getattr(self, "_progress_bar_config", {}))

    # ------------------------------------------------------------------------------------------------------------
    # decoding

    def _to_cache_space(self, x1: torch.Tensor) -> torch.Tensor:
        """Undo the per-channel normalisation the model was trained with (if any)."""
        statistics = self.scheduler.channel_statistics()
        return x1 if statistics is None else latentflow.vae.denormalize_latents(x1, *statistics)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Cache-space latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1], with the VAE's own scale/shift."""
        return latentflow.vae.decode_latents(self.vae, latents)

    @torch.no_grad()
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the images this pipeline makes (found by decoding one latent of the configured shape)."""
        probe = torch.zeros(self._latent_shape(1), device=self.vae.device, dtype=self.vae.dtype)
        return tuple(self.decode_latents(probe).shape[-2:])

    def _postprocess(self, x1: torch.Tensor, output_type: str) -> Any:
        latents = self._to_cache_space(x1)
        if output_type == "latent":
            return latents
        images = self.decode_latents(latents) / 2 + 0.5  # (B, 3, H, W) in [0, 1]
        if output_type == "pt":
            return images
        array = images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        return array if output_type == "np" else self.numpy_to_pil(array)


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _import_named_latentflow_modules(folder: Path) -> None:
    """Import the modules of `latentflow` (and nothing else) that `folder/model_index.json` names."""
    index = folder / PIPELINE_MARKER
    if not index.is_file():
        return
    for value in json.loads(index.read_text()).values():
        if isinstance(value, list) and value and isinstance(value[0], str) and value[0].startswith("latentflow."):
            importlib.import_module(value[0])


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _counting(field: Field, bar) -> Field:
    """The field, advancing the progress bar by one per evaluation."""

    def counted(x: torch.Tensor, t: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        value = field(x, t, *extra)
        bar.update(1)
        return value

    return counted


def _rescaled_field(field: Field, start: torch.Tensor, width: torch.Tensor) -> Field:
    """g(x, s) = width * field(x, start + s * width): integrating g over s in [0, 1] covers [start, start + width]."""
    return lambda x, s: width * field(x, start + s * width)


def _check_latents(latents: Any, expected: tuple[int, ...]) -> None:
    """Refuse initial noise that is not a (B, *expected) tensor with B >= 1."""
    if not isinstance(latents, torch.Tensor):
        raise LatentflowError(f"latents must be a torch.Tensor of shape (B, *{expected}), got {type(latents).__name__}")
    if latents.ndim != len(expected) + 1 or tuple(latents.shape[1:]) != expected or latents.shape[0] < 1:
        raise LatentflowError(f"latents have shape {tuple(latents.shape)}; expected (B, *{expected}) with B >= 1")
    if not latents.is_floating_point():
        raise LatentflowError(f"latents must be floating-point noise (e.g. torch.randn), got {latents.dtype}")
    if not torch.isfinite(latents).all():
        raise LatentflowError("latents hold NaN or infinite values; pass finite noise (e.g. torch.randn)")


def _check_generators(generator: Any, batch_size: int) -> None:
    """Refuse a generator list whose length is not the batch size (one generator per image)."""
    if isinstance(generator, list) and len(generator) != batch_size:
        raise LatentflowError(f"got {len(generator)} generators for a batch of {batch_size}; pass one "
                              f"torch.Generator, or a list of {batch_size}")
    if isinstance(generator, list) and not all(isinstance(item, torch.Generator) for item in generator):
        raise LatentflowError("generator list holds something other than torch.Generator objects")


def _check_callback(solver: str, tensor_inputs: Sequence[str]) -> None:
    if solver not in STAGES_PER_STEP:
        raise LatentflowError(
            f"callback_on_step_end works with the one-step fixed-grid solvers {sorted(STAGES_PER_STEP)}, not {solver!r}"
        )
    if set(tensor_inputs) - {"latents"}:
        raise LatentflowError(
            f"callback_on_step_end_tensor_inputs may only contain 'latents', got {list(tensor_inputs)}"
        )


def _check_components(transformer: torch.nn.Module, vae: torch.nn.Module, scheduler: LatentFlowScheduler,
                      guide: torch.nn.Module | None = None) -> None:
    """Refuse component combinations that cannot sample correctly, naming the mismatch."""
    config = scheduler.config
    if guide is not None:
        for key in ("in_channels", "sample_size", "flow_map"):
            mine, theirs = getattr(transformer.config, key, None), getattr(guide.config, key, None)
            if mine != theirs:
                raise LatentflowError(f"guide {key}={theirs} but transformer {key}={mine}: the guide must be a model "
                                      f"of the same latents (an earlier checkpoint of the same run)")
        guide_classes = getattr(guide.config, "num_classes", 0) or 0
        if guide_classes not in (0, config.num_classes):
            raise LatentflowError(f"guide num_classes={guide_classes} but scheduler num_classes={config.num_classes}")
    model_channels = getattr(transformer.config, "in_channels", None)
    vae_channels = getattr(vae.config, "latent_channels", None)
    if model_channels is not None and model_channels != config.latent_channels:
        raise LatentflowError(
            f"transformer in_channels={model_channels} but scheduler latent_channels={config.latent_channels}"
        )
    if vae_channels is not None and vae_channels != config.latent_channels:
        raise LatentflowError(
            f"vae latent_channels={vae_channels} but the model works on {config.latent_channels}-channel latents"
        )
    model_classes = getattr(transformer.config, "num_classes", 0) or 0
    if model_classes != config.num_classes:
        raise LatentflowError(f"transformer num_classes={model_classes} but scheduler num_classes={config.num_classes}")
    latentflow.vae.check_vae_fingerprint(config.vae_fingerprint, vae, "LatentFlowPipeline")


__all__ = ["LatentFlowPipeline", "LatentFlowPipelineOutput", "LatentFlowScheduler"]
