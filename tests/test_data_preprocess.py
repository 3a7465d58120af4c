"""latentflow.data.preprocess: every PIL mode to RGB, shorter-side resize + centre crop, resolution checks."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from latentflow.data.preprocess import (
    PreprocessConfig,
    check_resolution,
    preprocess_bytes,
    resize_center_crop,
    to_model_input,
    to_rgb,
)
from latentflow.errors import LatentflowError


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((0, 0), (0, 0, 255, 255))  # one opaque blue pixel
    image.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black
    rgb = np.asarray(to_rgb(image))
    assert tuple(rgb[0, 0]) == (0, 0, 255) and tuple(rgb[3, 3]) == (255, 255, 255)
    assert abs(int(rgb[0, 1, 0]) - 127) <= 1


@pytest.mark.parametrize("mode", ["L", "LA", "P", "CMYK", "1", "I", "F", "YCbCr"])
def test_modes_become_rgb(mode):
    image = Image.new("RGB", (6, 5), (10, 200, 30)).convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (6, 5)


def test_palette_with_transparency_uses_white():
    image = Image.new("P", (2, 2), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    assert tuple(np.asarray(to_rgb(image))[0, 0]) == (255, 255, 255)


def test_sixteen_bit_png_scales_to_eight_bit():
    array = np.full((8, 8), 65535, dtype=np.uint16)
    array[0, 0] = 32896  # mid grey in 16 bits
    data = encoded(Image.fromarray(array))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    pixels = preprocess_bytes(data, PreprocessConfig(resolution=8)).pixels
    assert tuple(pixels[7, 7]) == (255, 255, 255) and abs(int(pixels[0, 0, 0]) - 128) <= 1


def test_resize_shorter_side_then_centre_crop():
    array = np.zeros((20, 40, 3), dtype=np.uint8)  # H=20, W=40
    array[:, 10:30] = 255  # the central 20 columns are white
    out = np.asarray(resize_center_crop(Image.fromarray(array), 10))
    assert out.shape == (10, 10, 3)
    assert out[:, 1:-1].min() >= 250 and out.min() >= 200  # the crop kept the white centre (bicubic edge bleed)
    tall = resize_center_crop(Image.new("RGB", (30, 90)), 16)
    assert tall.size == (16, 16)


def test_tiny_image_is_upscaled_and_min_size_rejects():
    data = encoded(Image.new("RGB", (1, 1), (5, 6, 7)))
    result = preprocess_bytes(data, PreprocessConfig(resolution=16))
    assert result.pixels.shape == (16, 16, 3) and result.original_size == (1, 1)
    assert (result.pixels == np.array([5, 6, 7], dtype=np.uint8)).all()
    with pytest.raises(ValueError, match="min-size"):
        preprocess_bytes(data, PreprocessConfig(resolution=16, min_size=8))


def test_jpeg_draft_keeps_size_and_content():
    gradient = np.tile(np.linspace(0, 255, 256, dtype=np.uint8), (256, 1))
    data = encoded(Image.fromarray(gradient).convert("RGB"), "JPEG", quality=95)
    fast = preprocess_bytes(data, PreprocessConfig(resolution=32)).pixels.astype(float)
    exact = preprocess_bytes(data, PreprocessConfig(resolution=32, jpeg_draft=False)).pixels.astype(float)
    assert fast.shape == exact.shape == (32, 32, 3) and np.abs(fast - exact).mean() < 3


def test_unreadable_bytes_raise_for_the_caller_to_skip():
    with pytest.raises((OSError, ValueError)):
        preprocess_bytes(b"not an image", PreprocessConfig(resolution=8))


def test_check_resolution_and_model_input_range():
    check_resolution(64, 8)
    with pytest.raises(LatentflowError, match="multiple of the VAE downsampling factor 8; use e.g. 56 or 64"):
        check_resolution(60, 8)
    pixels = torch.tensor([[[[0, 255, 128]]]], dtype=torch.uint8)  # (1, 1, 1, 3)
    x = to_model_input(pixels)
    assert x.shape == (1, 3, 1, 1)
    torch.testing.assert_close(x.flatten(), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]))
