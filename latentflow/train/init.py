"""Starting a run from a trained one (`latentflow train --init RUN_DIR|PIPE_DIR`): fine-tuning, e.g. a flow map
(objective meanflow) from a plain flow-matching run.

The new run takes the trained run's EMA weights and its model settings; a flow-map objective switches the
model's second time input on, whose zero-initialised layers make the new model start as the old field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin

from latentflow.errors import LatentflowError
from latentflow.flow.flow_maps import INTERVAL_TIME_SCALE
from latentflow.io import read_json
from latentflow.train.checkpoint import CACHE_MANIFEST_FILE, CONFIG_FILE, is_checkpoint, load_ema_model
from latentflow.vae import identity_differences

FLOW_MAP_KEYS = ("interval_embedder.",)
"""Parameter name prefixes a flow map has and a plain model lacks (they start from their initialisation)."""


@dataclass
class InitialModel:
    """A trained model to start from.

    Attributes:
        model: the loaded model (its EMA weights), in eval mode.
        settings: its constructor settings (config.json without diffusers' private keys).
        class_name: "DiT" or "UNet".
        manifest: the cache manifest it was trained on.
        source: where it came from, for messages (the option and the path, e.g. "--init runs/a").
    """

    model: ModelMixin
    settings: dict[str, Any]
    class_name: str
    manifest: dict[str, Any]
    source: str


def model_folder(path: str | Path, flag: str = "--init") -> Path:
    """The model folder inside a training run (`model/`) or a pipeline folder (`transformer/`)."""
    path = Path(path)
    for candidate in (path / "model", path / "transformer"):
        if (candidate / "config.json").is_file():
            return candidate
    raise LatentflowError(f"{flag} {path}: neither a finished training run (model/config.json) nor a pipeline "
                          f"folder (transformer/config.json); give the output_dir of `latentflow train` or an "
                          f"exported pipeline")


def load_initial_model(path: str | Path, flag: str = "--init") -> InitialModel:
    """Load the model and the cache manifest of a run or pipeline folder, or the EMA model of a checkpoint of a
    finished run (RUN/checkpoints/step-N) (`flag` names the option in errors)."""
    from latentflow.models import load_model
    from latentflow.train.config import load_config

    path = Path(path)
    checkpoint_run = path.parent.parent if is_checkpoint(path) else None
    folder = None if checkpoint_run is not None else model_folder(path, flag)
    manifest_file = (checkpoint_run or path) / CACHE_MANIFEST_FILE
    if not manifest_file.is_file():
        raise LatentflowError(f"{flag} {path}: no {CACHE_MANIFEST_FILE} in {manifest_file.parent}, so its latents "
                              f"cannot be checked against this run's cache; use a finished training run folder "
                              f"(or one of its checkpoints) or a pipeline written by export")
    if checkpoint_run is not None:
        model = load_ema_model(path, load_config(checkpoint_run / CONFIG_FILE).model.name)
    else:
        model = load_model(folder).eval()
    settings = {key: value for key, value in dict(model.config).items() if not key.startswith("_")}
    return InitialModel(model, settings, type(model).__name__, read_json(manifest_file, "cache manifest"),
                        f"{flag} {path}")


def check_same_latents(initial: InitialModel, cache_manifest: dict[str, Any], normalize: bool,
                       cache_path: str) -> None:
    """Refuse a start model trained on latents of another VAE, or normalised with other channel statistics.

    Raises:
        LatentflowError: naming what differs.
    """
    differing = identity_differences(initial.manifest["vae"], cache_manifest["vae"])
    if differing:
        raise LatentflowError(f"{initial.source} was trained on latents of another VAE than cache "
                              f"{cache_path} ({', '.join(sorted(differing))} differ); encode with its VAE")
    if normalize:
        for key in ("channel_mean", "channel_std"):
            mine, theirs = torch.tensor(cache_manifest[key]), torch.tensor(initial.manifest[key])
            if mine.shape != theirs.shape or not torch.allclose(mine, theirs, rtol=1e-4, atol=1e-5):
                raise LatentflowError(f"{initial.source} normalised its latents with other {key} than cache "
                                      f"{cache_path}; train on the same cache or set data.normalize=false in both")


def new_flow_map_settings(requested: dict[str, Any]) -> dict[str, Any]:
    """The model settings that make a new flow map: its second time input on, r - t embedded at the config's
    `interval_time_scale` (null: t's scale) or `INTERVAL_TIME_SCALE`."""
    scale = requested.get("interval_time_scale", INTERVAL_TIME_SCALE)
    return {"flow_map": True, "interval_time_scale": None if scale is None else float(scale)}


def merged_settings(initial: InitialModel, requested: dict[str, Any], flow_map: bool) -> dict[str, Any]:
    """The new model's settings: the start model's, with the flow-map input on when asked for (a start model
    that is a flow map already keeps its interval embedding's settings).

    Raises:
        LatentflowError: when the config's model.settings ask for other values than the start model has.
    """
    new_map = flow_map and not initial.settings.get("flow_map", False)
    fresh = ("flow_map", "interval_time_scale") if new_map else ("flow_map",)
    conflicts = {key: (value, initial.settings.get(key)) for key, value in requested.items()
                 if key not in fresh and initial.settings.get(key) != value}
    if conflicts:
        listed = ", ".join(f"{key}={want!r} (start model: {have!r})" for key, (want, have) in conflicts.items())
        raise LatentflowError(f"model.settings differ from {initial.source}: {listed}; drop them (the start "
                              f"model's settings are used)")
    if new_map:
        return {**initial.settings, **new_flow_map_settings(requested)}
    return {**initial.settings, "flow_map": bool(flow_map or initial.settings.get("flow_map", False))}


def load_initial_weights(model: torch.nn.Module, initial: InitialModel) -> None:
    """Copy the start model's weights into `model`; only the flow-map input may be new.

    Raises:
        LatentflowError: when other parameters are missing or left over (a different architecture).
    """
    result = model.load_state_dict(initial.model.state_dict(), strict=False)
    missing = [key for key in result.missing_keys if not key.startswith(FLOW_MAP_KEYS)]
    if missing or result.unexpected_keys:
        raise LatentflowError(f"{initial.source}: weights do not fit the model (missing {missing[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]})")
