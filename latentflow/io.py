"""Every write the project makes to disk, atomically: a temporary name in the same folder, flushed, then renamed.

A reader sees either the old file (or folder) or the whole new one, never a half-written one. New files get the
usual permissions (0o666 less the umask), not mkstemp's owner-only 0o600. The latent cache's shard writer is the
one other place that renames (it streams shards too large to buffer; see `latentflow.data.writer`).

Also here: reading a JSON object with errors that name the file, and the one image grid / image saver.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from latentflow.errors import LatentflowError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give `path` the permissions a plain `open`/`mkdir` would (0o666 / 0o777 less the umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; creates the parent folder. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        apply_umask(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, payload: Any, indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write `payload` as JSON (with a final newline) to `path` atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=indent, sort_keys=sort_keys) + "\n")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a numpy array as .npy atomically (no pickles)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return write_bytes_atomic(path, buffer.getvalue())


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


def write_folder_atomic(target: str | os.PathLike, fill: Callable[[Path], Any]) -> Path:
    """Write a whole folder: `fill(staging)` writes into a fresh staging folder beside `target`, which then
    replaces `target`. At every moment `target` is either the old folder or the new one: the old one is renamed
    aside (`.NAME.old`) only after the new one is complete, and the new one is renamed in right after."""
    target = Path(target)
    staging = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        fill(staging)
        for folder, _, files in os.walk(staging):  # what we write gets the umask's permissions
            apply_umask(folder, directory=True)
            for name in files:
                apply_umask(os.path.join(folder, name))
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def replace_folder(staging: Path, target: Path) -> None:
    """Rename a fully written `staging` folder to `target`, replacing an old one (set aside first, then removed)."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


# ---- images -----------------------------------------------------------------------------------------------------


def to_uint8_images(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Quantise images to 8 bits as saving them to PNG would.

    Args:
        images: (B, 3, H, W) uint8, or float in [0, 1]; numpy (B, H, W, 3) is accepted too.

    Returns:
        (B, 3, H, W) uint8 tensor.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
        if images.ndim == 4 and images.shape[-1] == 3:
            images = images.permute(0, 3, 1, 2)
    if images.ndim != 4 or images.shape[1] != 3:
        raise LatentflowError(f"expected RGB images of shape (B, 3, H, W); got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def image_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2):
    """(B, 3, H, W) float images in [0, 1] (or uint8) -> one PIL image with the images on a grid (row-major)."""
    from PIL import Image

    count, _, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    canvas = np.zeros((rows * (height + padding) + padding, columns * (width + padding) + padding, 3), np.uint8)
    pixels = to_uint8_images(images).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    for index, image in enumerate(pixels):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        canvas[top : top + height, left : left + width] = image
    return Image.fromarray(canvas)


def save_image(image, path: str | os.PathLike) -> Path:
    """Save a PIL image atomically (format from the suffix: png, jpg, ...)."""
    path = Path(path)
    buffer = io.BytesIO()
    image.save(buffer, format=(path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"))
    return write_bytes_atomic(path, buffer.getvalue())
