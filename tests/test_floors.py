"""The floors beside every FID/KID (real against real, the VAE floor), KID's spread, balanced labels, the plot."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from latentflow.errors import LatentflowError
from latentflow.eval.features import InceptionFeatures
from latentflow.eval.floors import Floors, cached_floors, compute_floors, floor_files, vae_round_trip
from latentflow.eval.references import FeatureAccumulator, iterate_image_batches, list_images
from latentflow.eval.statistics import SampleMetrics, kernel_inception_distance
from latentflow.eval.sweep import plot_evaluations, sample_labels

FLOWERS = Path(__file__).parents[2] / "shared" / "data" / "tf_flowers" / "images_128" / "val"
needs_flowers = pytest.mark.skipif(not FLOWERS.is_dir(), reason=f"shared photos missing: {FLOWERS}")


class IdentityAutoencoder(torch.nn.Module):
    """An autoencoder whose latents are the pixels: its round trip changes nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(latents=x)

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(sample=z)


@pytest.fixture(scope="module")
def inception() -> InceptionFeatures:
    return InceptionFeatures()


def statistics_of(files, extractor) -> dict:
    accumulator = FeatureAccumulator([extractor])
    for batch in iterate_image_batches(files, 8, 64):
        accumulator.update(batch)
    return accumulator.statistics()


@needs_flowers
@pytest.mark.slow
def test_floors_of_a_set_against_itself_are_zero_and_identity_vae_equals_real(inception) -> None:
    files = sorted(list_images(FLOWERS / "daisy"))[:12]
    reference = statistics_of(files, inception)
    floors = compute_floors(files, reference, [inception], vae_round_trip(IdentityAutoencoder()), 64, 8,
                            kid_subsets=10, kid_subset_size=6)
    assert floors.n == 12
    assert floors.real.fid == pytest.approx(0.0, abs=1e-3)  # the set against itself
    assert floors.vae.fid == pytest.approx(floors.real.fid, abs=1e-3)  # identity autoencoder: VAE floor = real
    assert floors.vae.kid == pytest.approx(floors.real.kid, abs=1e-9)


@needs_flowers
@pytest.mark.slow
def test_real_against_real_on_two_halves_is_finite_and_positive(inception) -> None:
    files = sorted(list_images(FLOWERS / "roses"))[:16]
    reference = statistics_of(files[::2], inception)
    floors = compute_floors(files[1::2], reference, [inception], vae_round_trip(IdentityAutoencoder()), 64, 8,
                            kid_subsets=10, kid_subset_size=4)
    assert np.isfinite(floors.real.fid) and floors.real.fid > 1.0
    assert floors.real.kid_std > 0


def test_floor_files_are_seeded_and_refuse_too_few(tmp_path: Path) -> None:
    for index in range(5):
        Image.new("RGB", (4, 4)).save(tmp_path / f"{index}.png")
    assert floor_files(tmp_path, 3, seed=1) == floor_files(tmp_path, 3, seed=1)
    assert len(set(floor_files(tmp_path, 5))) == 5
    with pytest.raises(LatentflowError, match="floors need 6 training images"):
        floor_files(tmp_path, 6)


def test_floors_are_cached(tmp_path: Path) -> None:
    metrics = SampleMetrics(fid=51.4, kid=0.01, kid_std=0.001, fd_dinov2=None, num_samples=736)
    calls = []
    compute = lambda: calls.append(1) or Floors(736, metrics, metrics)  # noqa: E731
    first = cached_floors(tmp_path / "floors.json", compute)
    second = cached_floors(tmp_path / "floors.json", compute)
    assert calls == [1] and first == second and second.real.fid == 51.4
    assert [row["setting"] for row in first.rows()] == ["floor: real vs real", "floor: VAE round trip"]


def test_kid_has_a_spread_when_n_is_below_the_subset_size() -> None:
    rng = np.random.default_rng(0)
    result = kernel_inception_distance(rng.normal(size=(40, 8)), rng.normal(size=(40, 8)), 20, subset_size=1000)
    assert result.subset_size == 20 and result.std > 0


def test_class_conditional_models_sample_balanced_labels() -> None:
    pipe = SimpleNamespace(scheduler=SimpleNamespace(config=SimpleNamespace(num_classes=5)))
    for n in (10, 12, 736):
        counts = Counter(sample_labels(pipe, n, seed=0))
        assert sorted(counts) == [0, 1, 2, 3, 4] and max(counts.values()) - min(counts.values()) <= 1
    assert sample_labels(pipe, 12, seed=0) == sample_labels(pipe, 12, seed=0)
    assert sample_labels(pipe, 12, seed=0) != sample_labels(pipe, 12, seed=1)


def test_plot_of_several_runs_with_floors(tmp_path: Path) -> None:
    document = {"results": [{"solver": "euler", "nfe": n, "fid": 300 / n} for n in (1, 2, 4, 8)],
                "floors": [{"setting": "floor: real vs real", "fid": 51.4}, {"setting": "floor: VAE", "fid": 65.8}]}
    png = plot_evaluations([("a", document), ("b", json.loads(json.dumps(document)))], "two runs")
    path = tmp_path / "plot.png"
    path.write_bytes(png)
    assert Image.open(path).size[0] > 300
