"""Image folders and reference statistics: feature statistics of a folder of images, saved as .npz and cached."""

from __future__ import annotations

import io
import os
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from latentflow.data.sources import IMAGE_EXTENSIONS, find_image_files
from latentflow.errors import LatentflowError, first_line, require_count
from latentflow.eval.features import FeatureExtractor
from latentflow.eval.statistics import FeatureStatistics, feature_statistics
from latentflow.io import json_sha256, to_uint8_images, write_bytes_atomic


def list_images(images_dir: str | os.PathLike) -> list[Path]:
    """All image files under `images_dir` (recursively), sorted."""
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = find_image_files(root)  # the same images the encoder would read
    if not files:
        raise LatentflowError(f"{root}: no images found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return files


def _load_uint8(path: Path, resolution: int | None = None) -> torch.Tensor:
    """One image file -> (3, H, W) uint8; with `resolution`, shorter-side resize and centre crop to a square
    exactly as the latent cache's preprocessing does (so a reference matches what the model was trained on)."""
    from PIL import Image

    from latentflow.data.preprocess import resize_center_crop, to_rgb

    try:
        with Image.open(path) as image:
            image = to_rgb(image)
            if resolution is not None:
                image = resize_center_crop(image, resolution)
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError) as error:  # empty, truncated, or not an image: statistics of every image or none
        raise LatentflowError(f"{path}: not a readable image ({first_line(error)}); remove it from the folder or "
                              "save it again") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def iterate_image_batches(
    files: Sequence[Path], batch_size: int = 50, resolution: int | None = None
) -> Iterator[torch.Tensor]:
    """uint8 batches (B, 3, H, W) of the files in order; a batch is cut early when the image size changes.

    Args:
        files: image files.
        batch_size: images per batch.
        resolution: resize + centre-crop every image to this square size first (None: keep sizes).
    """
    require_count("--batch-size", batch_size, 1)
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
        raise LatentflowError(f"--resolution must be a positive number of pixels (or left out), got {resolution!r}")
    batch: list[torch.Tensor] = []
    for path in files:
        image = _load_uint8(path, resolution)
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            yield torch.stack(batch)
            batch = []
        batch.append(image)
    if batch:
        yield torch.stack(batch)


@dataclass
class FeatureAccumulator:
    """Collects features of several extractors over a stream of uint8 image batches."""

    extractors: Sequence[FeatureExtractor]
    features: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def update(self, images: torch.Tensor) -> None:
        """Add a batch: uint8 (B, 3, H, W) or float in [0, 1]."""
        images = to_uint8_images(images)
        for extractor in self.extractors:
            self.features.setdefault(extractor.name, []).append(extractor(images))

    def statistics(self, keep_features: bool = True) -> dict[str, FeatureStatistics]:
        """name -> FeatureStatistics of everything added so far."""
        return {
            name: feature_statistics(np.concatenate(chunks), keep_features) for name, chunks in self.features.items()
        }


def folder_statistics(
    images_dir: str | os.PathLike,
    extractors: Sequence[FeatureExtractor],
    batch_size: int = 50,
    progress: Callable[[Iterable], Iterable] | None = None,
    resolution: int | None = None,
) -> dict[str, FeatureStatistics]:
    """Feature statistics (with features) of every image under `images_dir`, for each extractor; with
    `resolution`, images are first resized and centre-cropped like the latent cache's preprocessing."""
    files = list_images(images_dir)
    accumulator = FeatureAccumulator(extractors)
    batches: Iterable[torch.Tensor] = iterate_image_batches(files, batch_size, resolution)
    if progress is not None:
        batches = progress(batches)
    for batch in batches:
        accumulator.update(batch)
    return accumulator.statistics()


def save_statistics(
    path: str | os.PathLike, stats: dict[str, FeatureStatistics], source: str = "", resolution: int | None = None
) -> Path:
    """Write statistics to an .npz (atomically): `<name>_mu`, `<name>_sigma`, `<name>_features`, ..., plus the
    `source` description and the `resolution` images were brought to (-1: as stored)."""
    path = Path(path)
    arrays: dict[str, np.ndarray] = {"source": np.array(source), "resolution": np.array(resolution or -1)}
    for name, stat in stats.items():
        arrays[f"{name}_mu"] = stat.mu
        arrays[f"{name}_sigma"] = stat.sigma
        arrays[f"{name}_num_images"] = np.array(stat.num_images)
        if stat.features is not None:
            arrays[f"{name}_features"] = stat.features
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return write_bytes_atomic(path, buffer.getvalue())


def write_folder_statistics(
    images_dir: str | os.PathLike,
    out: str | os.PathLike,
    extractors: Sequence[FeatureExtractor],
    batch_size: int = 50,
    progress: Callable[[Iterable], Iterable] | None = None,
    resolution: int | None = None,
) -> dict[str, FeatureStatistics]:
    """`folder_statistics` of `images_dir` saved to the .npz `out`, naming the folder and resolution as its source
    (what `latentflow fid-stats` writes); returns the statistics."""
    stats = folder_statistics(images_dir, extractors, batch_size, progress, resolution)
    save_statistics(out, stats, source=f"{images_dir} (resolution {resolution or 'as stored'})", resolution=resolution)
    return stats


@contextmanager
def _statistics_file(path: str | os.PathLike) -> Iterator:
    """np.load of a statistics .npz (no pickle); a file that is no such archive is a one-line error naming it."""
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError):
        raise LatentflowError(f"{path} is not a statistics .npz; give an image folder, or "
                              "a file written by `latentflow fid-stats`") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise LatentflowError(f"{path} holds one array, not a statistics .npz; give an image folder, or a file "
                              "written by `latentflow fid-stats`")
    with data:
        yield data


def load_statistics(path: str | os.PathLike) -> dict[str, FeatureStatistics]:
    """Read an .npz written by `save_statistics` (no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    with _statistics_file(path) as data:
        names = sorted(key[: -len("_mu")] for key in data.files if key.endswith("_mu"))
        if not names:
            raise LatentflowError(f"{path}: no '<name>_mu' arrays; write it with `latentflow fid-stats`")
        return {
            name: FeatureStatistics(
                mu=data[f"{name}_mu"],
                sigma=data[f"{name}_sigma"],
                num_images=int(data[f"{name}_num_images"]),
                features=data[f"{name}_features"] if f"{name}_features" in data.files else None,
            )
            for name in names
        }


def statistics_resolution(path: str | os.PathLike) -> int | None:
    """The resolution an .npz's images were brought to, or None (as stored, or not recorded)."""
    with _statistics_file(path) as data:
        value = int(data["resolution"]) if "resolution" in data.files else -1
    return None if value < 0 else value


def statistics_source(path: str | os.PathLike) -> str | None:
    """What an .npz's statistics were computed from (fid-stats' `source`), or None when not recorded."""
    with _statistics_file(path) as data:
        return str(data["source"]) if "source" in data.files and str(data["source"]) else None


def folder_identity(images_dir: str | os.PathLike) -> str:
    """sha256 of an image folder's listing (each image's relative name, size and modification time): it changes
    when an image is added, removed or rewritten, and costs no image read."""
    root = Path(images_dir)
    return json_sha256([(path.relative_to(root).as_posix(), path.stat().st_size, path.stat().st_mtime_ns)
                        for path in list_images(root)])


def reference_statistics(
    reference: str | os.PathLike,
    extractors: Sequence[FeatureExtractor],
    batch_size: int = 50,
    progress: Callable[[Iterable], Iterable] | None = None,
    resolution: int | None = None,
) -> dict[str, FeatureStatistics]:
    """Statistics of a reference given as an image folder (computed, at `resolution` if given) or an .npz."""
    if Path(reference).is_dir():
        return folder_statistics(reference, extractors, batch_size, progress, resolution)
    stats = load_statistics(reference)
    missing = [extractor.name for extractor in extractors if extractor.name not in stats]
    if missing:
        raise LatentflowError(
            f"{reference}: no statistics for {', '.join(missing)} (has {', '.join(stats)}); "
            "recompute it with `latentflow fid-stats` and the same feature options"
        )
    return stats
