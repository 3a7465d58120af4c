"""Velocity-field backbones: DiT and a diffusers U-Net, built by name.

`make_model("DiT-S/2", in_channels=4, sample_size=32, num_classes=1000)` builds a DiT
with the paper's S size and patch 2; `make_model("dit", hidden_size=..., ...)` and
`make_model("unet", ...)` take free settings. Every model is `ModelMixin, ConfigMixin`
and is called as `model(x_t, t, class_labels=None)`.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Callable

from diffusers import ModelMixin

from latentflow.errors import LatentflowError, first_line
from latentflow.models.dit import DiT
from latentflow.models.unet import UNet

MODEL_CLASSES: dict[str, type[ModelMixin]] = {"dit": DiT, "unet": UNet}

_DIT_SIZES = {
    "S": {"hidden_size": 384, "depth": 12, "num_heads": 6},
    "B": {"hidden_size": 768, "depth": 12, "num_heads": 12},
    "L": {"hidden_size": 1024, "depth": 24, "num_heads": 16},
    "XL": {"hidden_size": 1152, "depth": 28, "num_heads": 16},
}

_UNET_SIZES = {
    "S": {"block_out_channels": (64, 128, 128), "attention_levels": (False, True, True), "layers_per_block": 1},
    "B": {"block_out_channels": (128, 256, 256), "attention_levels": (False, True, True), "layers_per_block": 2},
    "L": {"block_out_channels": (192, 384, 576), "attention_levels": (False, True, True), "layers_per_block": 2},
}


def _presets() -> dict[str, tuple[str, dict[str, Any]]]:
    presets: dict[str, tuple[str, dict[str, Any]]] = {}
    for size, settings in _DIT_SIZES.items():
        for patch in (2, 4, 8):
            presets[f"DiT-{size}/{patch}"] = ("dit", {**settings, "patch_size": patch})
    for size, settings in _UNET_SIZES.items():
        presets[f"UNet-{size}"] = ("unet", dict(settings))
    return presets


MODEL_PRESETS: dict[str, tuple[str, dict[str, Any]]] = _presets()
"""Preset name -> (model class name, constructor settings)."""


def model_names() -> list[str]:
    """Every name `make_model` accepts: presets and free class names."""
    return [*MODEL_PRESETS, *MODEL_CLASSES]


def make_model(name: str, **settings: Any) -> ModelMixin:
    """Build a model from a preset or class name; `settings` override the preset.

    Args:
        name: a key of MODEL_PRESETS (e.g. "DiT-XL/2", "UNet-B") or of MODEL_CLASSES ("dit", "unet").
        **settings: constructor arguments (in_channels, sample_size, num_classes, ...).

    Raises:
        LatentflowError: unknown name or constructor argument, listing the valid ones.
    """
    if name in MODEL_PRESETS:
        class_name, preset = MODEL_PRESETS[name]
    elif name in MODEL_CLASSES:
        class_name, preset = name, {}
    else:
        raise LatentflowError(f"unknown model {name!r}; choose one of {model_names()}")
    model_class = MODEL_CLASSES[class_name]
    valid = set(inspect.signature(model_class.__init__).parameters) - {"self"}
    unknown = sorted(set(settings) - valid)
    if unknown:
        raise LatentflowError(f"unknown setting(s) {unknown} for model {name!r}; valid: {sorted(valid)}")
    return model_class(**{**preset, **settings})


def load_model(path: str | Path, **kwargs: Any) -> ModelMixin:
    """Load a saved DiT or UNet from a `save_pretrained` folder, picking the class from config.json."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no model config at {config_file}; expected a folder written by save_pretrained")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as error:
        raise LatentflowError(f"{config_file}: not a JSON object ({error})") from None
    classes: dict[str, Callable[..., ModelMixin]] = {cls.__name__: cls for cls in MODEL_CLASSES.values()}
    if class_name not in classes:
        raise LatentflowError(f"{config_file}: _class_name {class_name!r} is not one of {sorted(classes)}")
    try:
        return classes[class_name].from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:  # truncated or foreign weights
        raise LatentflowError(f"model {path} could not be loaded ({first_line(error)}); its files are damaged: "
                              "write the folder again") from error


__all__ = ["DiT", "UNet", "MODEL_CLASSES", "MODEL_PRESETS", "make_model", "load_model", "model_names"]
