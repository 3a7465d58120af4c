"""Image preprocessing for encoding: any PIL mode to RGB, shorter-side resize, centre crop.

Everything here runs in DataLoader workers and returns uint8 arrays (cheap to pass between processes); the
main process turns batches into [-1, 1] floats (:func:`to_model_input`).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from latentflow.errors import LatentflowError

Image.MAX_IMAGE_PIXELS = 50_000_000 * 4  # PIL raises DecompressionBombError above twice this: a skip, not a crash
_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class PreprocessConfig:
    """How images become model inputs; stored in the manifest.

    Attributes:
        resolution: output side in pixels (square), a multiple of the VAE downsampling factor.
        resample: PIL filter name for the resize.
        min_size: inputs whose shorter side is below this are rejected (listed in skipped.jsonl).
        jpeg_draft: let the JPEG decoder downscale by 2/4/8 while staying >= resolution (much faster on large
            photos; changes pixels slightly).
    """

    resolution: int
    resample: str = "bicubic"
    min_size: int = 1
    jpeg_draft: bool = True

    def to_dict(self) -> dict:
        return {**asdict(self), "rgb": "alpha composited on white; CMYK/P/L/16-bit converted",
                "resize": "shorter side to resolution", "crop": "centre", "exif_transpose": True}


def check_resolution(resolution: int, factor: int) -> None:
    """Raise unless `resolution` is a positive multiple of the VAE downsampling `factor`."""
    if resolution <= 0:
        raise LatentflowError(f"--resolution must be a positive multiple of the VAE downsampling factor {factor}, "
                              f"got {resolution}; use e.g. {8 * factor}")
    if resolution % factor:
        lower, upper = max(factor, resolution // factor * factor), (resolution // factor + 1) * factor
        raise LatentflowError(f"--resolution {resolution} is not a multiple of the VAE downsampling factor {factor}; "
                              f"use e.g. {lower} or {upper}")


def _sixteen_bit_to_uint8(image: Image.Image) -> Image.Image:
    array = np.asarray(image, dtype=np.float64)
    scale = 65535.0 if array.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0
    return Image.fromarray(np.clip(array / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        image = _sixteen_bit_to_uint8(image)
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        scale = 1.0 if array.max(initial=0) <= 1.0 else 255.0
        image = Image.fromarray(np.clip(array / scale * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        image = image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return image


def resize_center_crop(image: Image.Image, resolution: int, resample: str = "bicubic") -> Image.Image:
    """Resize so the shorter side is `resolution`, then crop the centre `resolution` x `resolution`."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, resample=getattr(Image.Resampling, resample.upper()))
    left, top = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


@dataclass
class Preprocessed:
    """One preprocessed image: pixels (resolution, resolution, 3) uint8 and the original (width, height)."""

    pixels: np.ndarray
    original_size: tuple[int, int]


def preprocess_bytes(data: bytes, config: PreprocessConfig) -> Preprocessed:
    """Decode image bytes and preprocess them; raises on unreadable or rejected input (caller records a skip)."""
    with Image.open(io.BytesIO(data)) as image:
        original_size = image.size
        if min(original_size) < config.min_size:
            raise ValueError(f"image {original_size[0]}x{original_size[1]} is smaller than --min-size "
                             f"{config.min_size}")
        if config.jpeg_draft and image.format == "JPEG" and image.mode in ("RGB", "L"):
            image.draft(image.mode, (config.resolution, config.resolution))
        image.load()
        image = ImageOps.exif_transpose(image)
        image = to_rgb(image)
    pixels = np.asarray(resize_center_crop(image, config.resolution, config.resample), dtype=np.uint8)
    return Preprocessed(pixels=pixels, original_size=original_size)


def to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1]."""
    return pixels.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
