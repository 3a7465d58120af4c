"""latentflow.data.cache: manifest validation, deterministic endless loader, resume, ranks, flips, posterior."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from latentflow.cli import main as cli
from latentflow.data.cache import LatentCache, _NpyDecoder, make_latent_loader
from latentflow.errors import LatentflowError

NUM_IMAGES = 26


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A real cache: 26 labelled images (2 classes) through a tiny random AutoencoderKL, with flips, 6 shards."""
    root = tmp_path_factory.mktemp("cache")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                  layers_per_block=1, scaling_factor=0.7, shift_factor=0.3).save_pretrained(root / "kl")
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        folder = root / "data" / ("even" if i % 2 == 0 else "odd")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    code = cli(["encode", "--vae", str(root / "kl"), "--data", str(root / "data"), "--out", str(root / "out"),
                "--resolution", "8", "--flip", "--shard-size", "5", "--num-workers", "0", "--no-progress"])
    assert code == 0
    return root / "out"


def take(loader, count: int) -> list[dict]:
    return [next(loader) for _ in range(count)]


def same(a: list[dict], b: list[dict]) -> bool:
    return all(x["keys"] == y["keys"] and torch.equal(x["latents"], y["latents"]) for x, y in zip(a, b))


def test_cache_attributes(cache_dir):
    cache = LatentCache(cache_dir)
    assert len(cache) == NUM_IMAGES and cache.latent_shape == (4, 4, 4)
    assert cache.num_classes == 2 and cache.label_names == ["even", "odd"]
    assert cache.channel_mean.shape == cache.channel_std.shape == (4,) and (cache.channel_std > 0).all()
    assert cache.vae_identity["class"] == "AutoencoderKL" and cache.vae_identity["shift_factor"] == 0.3
    assert len(cache.shards) == 6


def test_batches_are_deterministic_for_any_worker_count_and_resume_exactly(cache_dir):
    cache = LatentCache(cache_dir)
    reference = take(make_latent_loader(cache, 4, seed=7, shuffle_buffer=8), 20)
    workers = take(make_latent_loader(cache, 4, seed=7, shuffle_buffer=8, num_workers=2), 20)
    assert same(reference, workers)
    resumed = make_latent_loader(cache, 4, seed=7, shuffle_buffer=8, num_workers=2, start_batch=13)
    assert same(reference[13:], take(resumed, 7)) and resumed.next_batch == 20
    other_seed = take(make_latent_loader(cache, 4, seed=8, shuffle_buffer=8), 20)
    assert not same(reference, other_seed)


def test_each_epoch_covers_every_sample_once(cache_dir):
    batches = take(make_latent_loader(cache_dir, 2, seed=1, shuffle_buffer=4), NUM_IMAGES)  # two epochs
    keys = [k for batch in batches for k in batch["keys"]]
    assert len(set(keys[:NUM_IMAGES])) == NUM_IMAGES and len(set(keys[NUM_IMAGES:])) == NUM_IMAGES
    assert keys[:NUM_IMAGES] != keys[NUM_IMAGES:]  # reshuffled between epochs


@pytest.mark.parametrize("in_memory", [False, True])
def test_ranks_read_distinct_samples(cache_dir, in_memory):
    cache = LatentCache(cache_dir)
    per_rank = []
    for rank in range(2):
        loader = make_latent_loader(cache, 1, seed=3, rank=rank, world_size=2, in_memory=in_memory)
        per_rank.append([b["keys"][0] for b in take(loader, 10)])
    assert not set(per_rank[0]) & set(per_rank[1])


def test_labels_flips_and_posterior_sampling(cache_dir):
    cache = LatentCache(cache_dir)
    memory = cache.load()
    by_key = {key: i for i, key in enumerate(memory.keys)}
    batch = next(make_latent_loader(cache, NUM_IMAGES, seed=0, in_memory=True, sample_posterior=False))
    for key, label, flipped, latent in zip(batch["keys"], batch["labels"], batch["flipped"], batch["latents"]):
        i = by_key[key]
        assert int(label) == int(memory.labels[i]) == int(key.split("__")[1][:3]) % 2
        stored = memory.flip_mean[i] if flipped else memory.mean[i]
        assert torch.equal(latent, stored.float())
    assert 0 < batch["flipped"].sum() < NUM_IMAGES
    # fresh posterior samples: over many draws the mean -> stored mean and the spread -> stored std
    sampled = make_latent_loader(cache, NUM_IMAGES, seed=0, in_memory=True, random_flip=False)
    draws = {k: [] for k in memory.keys}
    for batch in take(sampled, 300):  # each batch is one epoch: every key once
        for key, latent in zip(batch["keys"], batch["latents"]):
            draws[key].append(latent)
    samples = torch.stack(draws[memory.keys[0]])  # (300, C, h, w)
    mean, std = memory.mean[0].float(), memory.std[0].float()
    assert ((samples.mean(0) - mean).abs() <= 5 * std / 300 ** 0.5 + 1e-3).all()
    assert 0.85 < (samples.std(0) / std).mean() < 1.15


def test_normalize_uses_manifest_statistics(cache_dir):
    cache = LatentCache(cache_dir)
    raw = next(make_latent_loader(cache, 8, seed=2, normalize=False))["latents"]
    normalized = next(make_latent_loader(cache, 8, seed=2, normalize=True))["latents"]
    expected = (raw - cache.channel_mean.view(1, -1, 1, 1)) / cache.channel_std.view(1, -1, 1, 1)
    torch.testing.assert_close(normalized, expected)


def _pid_transform(batch, generator):
    return {"pid": os.getpid(), "noise": torch.randn(2, generator=generator), "n": batch["latents"].shape[0]}


def test_batch_transform_runs_in_workers_with_a_per_batch_generator(cache_dir):
    first = take(make_latent_loader(cache_dir, 4, num_workers=2, batch_transform=_pid_transform), 4)
    assert {b["pid"] for b in first} - {os.getpid()} and all(b["n"] == 4 for b in first)
    again = take(make_latent_loader(cache_dir, 4, num_workers=0, batch_transform=_pid_transform, start_batch=2), 2)
    assert all(torch.equal(a["noise"], b["noise"]) for a, b in zip(first[2:], again))
    single = next(make_latent_loader(cache_dir, 4, batch_transform=lambda batch: batch["latents"].sum()))
    assert single.ndim == 0


def test_truncated_shard_is_named_or_skipped(cache_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(cache_dir, broken)
    shard = broken / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(LatentflowError, match="shard-000002.tar"):
        LatentCache(broken)
    with pytest.warns(UserWarning, match="shard-000002.tar"):
        cache = LatentCache(broken, skip_bad_shards=True)
    assert len(cache) == NUM_IMAGES - 5
    keys = {k for b in take(make_latent_loader(cache, 3), 7) for k in b["keys"]}
    assert len(keys) == NUM_IMAGES - 5
    # a shard truncated behind the manifest's back (size check bypassed) still fails loudly, naming it
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["shards"][2]["bytes"] = 3000
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LatentflowError, match="shard-000002.tar"):
        list(LatentCache(broken).read_shard(LatentCache(broken).shards[2]))


def rewrite_shard(shard: Path, **options) -> None:
    """Re-pack `shard` with tarfile's `options`, keeping every member's name and bytes (and so its size)."""
    with tarfile.open(shard) as archive:
        members = [(member.name, archive.extractfile(member).read()) for member in archive]
    with tarfile.open(shard, "w", **options) as archive:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.pax_headers = len(payload), {"comment": "written by another tool"}
            archive.addfile(info, io.BytesIO(payload))


def test_shards_with_pax_headers_read_the_same(cache_dir, tmp_path):
    """The fast ustar walker hands archives it does not read (pax headers here) to tarfile."""
    other = tmp_path / "pax"
    shutil.copytree(cache_dir, other)
    for shard in other.glob("shard-*.tar"):
        rewrite_shard(shard, format=tarfile.PAX_FORMAT)
    manifest = json.loads((other / "manifest.json").read_text())
    for entry in manifest["shards"]:
        entry["bytes"] = (other / entry["name"]).stat().st_size
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert b"comment=written by another tool" in (other / "shard-000000.tar").read_bytes()
    assert same(take(make_latent_loader(other, 4, random_flip=True), 8),
                take(make_latent_loader(cache_dir, 4, random_flip=True), 8))


def test_corrupt_member_header_is_named(cache_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(cache_dir, broken)
    shard = broken / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[124:136] = b"not-a-size!\0"  # the first member's size field
    shard.write_bytes(bytes(data))
    with pytest.raises(LatentflowError, match="shard-000001.tar: truncated or corrupt"):
        list(LatentCache(broken).read_shard(LatentCache(broken).shards[1]))


def test_npy_decoder_matches_numpy_for_every_layout():
    decode = _NpyDecoder()
    arrays = [np.arange(24, dtype=np.float16).reshape(2, 3, 4), np.ones((2, 3, 4), np.float16) * 7,
              np.arange(6, dtype=np.float32).reshape(3, 2), np.asfortranarray(np.arange(6.0).reshape(2, 3)),
              np.arange(24, dtype=np.float16).reshape(2, 3, 4) * 2, np.array(5, dtype=np.int64)]
    for array in arrays * 2:  # the second pass reads through the remembered headers
        buffer = io.BytesIO()
        np.save(buffer, array)
        decoded = decode(buffer.getvalue())
        assert decoded.dtype == array.dtype and decoded.shape == array.shape and np.array_equal(decoded, array)


def test_manifest_validation_errors(cache_dir, tmp_path):
    with pytest.raises(LatentflowError, match="manifest.json: not found"):
        LatentCache(tmp_path)
    good = json.loads((cache_dir / "manifest.json").read_text())
    cases = {"format_version": (99, "format_version 99"), "latent_shape": ([4, 4], "latent_shape"),
             "num_samples": (3, "shard counts sum"), "format": ("other", "format is 'other'")}
    for field, (value, message) in cases.items():
        folder = tmp_path / field
        shutil.copytree(cache_dir, folder)
        (folder / "manifest.json").write_text(json.dumps({**good, field: value}))
        with pytest.raises(LatentflowError, match=message):
            LatentCache(folder)
    missing = {k: v for k, v in good.items() if k != "channel_std"}
    (tmp_path / "latent_shape" / "manifest.json").write_text(json.dumps(missing))
    with pytest.raises(LatentflowError, match="missing field 'channel_std'"):
        LatentCache(tmp_path / "latent_shape")


def test_too_few_shards_for_the_ranks_is_a_clear_error(cache_dir):
    with pytest.raises(LatentflowError, match="in_memory=True"):
        make_latent_loader(cache_dir, 2, rank=0, world_size=7)
    assert next(make_latent_loader(cache_dir, 2, rank=6, world_size=7, in_memory=True))["latents"].shape[0] == 2
