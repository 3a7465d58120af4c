"""`latentflow encode` end to end: real flowers through real TAEF2, a tiny stochastic VAE, odd inputs, resume
after SIGKILL, and a real 2-process `accelerate launch`."""

from __future__ import annotations

import functools
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from latentflow.cli import main as cli
from latentflow.data.cache import LatentCache, decode_raw
from latentflow.data.preprocess import PreprocessConfig, preprocess_bytes, to_model_input
from latentflow.vae import load_vae

REPO = Path(__file__).parents[1]
SHARED = REPO.parent / "shared"
TAEF2 = SHARED / "weights" / "taef2"
FLOWERS = SHARED / "data" / "tf_flowers" / "images_128" / "val"
needs_shared = pytest.mark.skipif(not (TAEF2 / "taef2_encoder.pth").exists() or not FLOWERS.exists(),
                                  reason=f"shared assets missing ({TAEF2}, {FLOWERS})")


def tiny_kl(folder: Path, scaling_factor: float = 0.7, shift_factor: float = 0.3) -> Path:
    """A tiny random AutoencoderKL (f=4, 4 channels) saved as a diffusers folder, with non-trivial factors."""
    torch.manual_seed(0)
    model = AutoencoderKL(block_out_channels=(8, 16, 16), down_block_types=("DownEncoderBlock2D",) * 3,
                          up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=8,
                          layers_per_block=1, scaling_factor=scaling_factor, shift_factor=shift_factor)
    model.save_pretrained(folder)
    return folder


def synthetic_images(folder: Path, count: int, size: tuple[int, int] = (20, 16)) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(array).save(folder / f"img{i:04d}.png")
    return folder


def all_samples(cache_dir: Path) -> list:
    cache = LatentCache(cache_dir)
    return [decode_raw(raw) for shard in cache.shards for raw in cache.read_shard(shard)]


def encode(*args: str) -> int:
    return cli(["encode", "--no-progress", *args])


# ---- real data through the real TAEF2 ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    """105 real photos (21 per class) linked into a class-folder tree, encoded at 64 px with TAEF2."""
    if not (TAEF2 / "taef2_encoder.pth").exists() or not FLOWERS.exists():
        pytest.skip(f"shared assets missing ({TAEF2}, {FLOWERS})")
    root = tmp_path_factory.mktemp("flowers")
    data = root / "data"
    for class_dir in sorted(FLOWERS.iterdir()):
        (data / class_dir.name).mkdir(parents=True)
        for photo in sorted(class_dir.glob("*.jpg"))[:21]:
            (data / class_dir.name / photo.name).symlink_to(photo)
    out = root / "cache"
    code = encode("--vae", str(TAEF2), "--data", str(data), "--out", str(out), "--resolution", "64",
                  "--shard-size", "40", "--batch-size", "16", "--num-workers", "2")
    assert code == 0
    return data, out


@needs_shared
def test_flowers_cache_decodes_to_the_input_at_22_db(flowers):
    data, out = flowers
    samples = all_samples(out)
    assert len(samples) == 105
    vae = load_vae(TAEF2)
    config = PreprocessConfig(resolution=64)
    psnrs = []
    for start in range(0, len(samples), 35):
        chunk = samples[start:start + 35]
        inputs = torch.stack([torch.from_numpy(preprocess_bytes(
            (data / json.loads(_info(out, s.key))["source"]).read_bytes(), config).pixels.copy()) for s in chunk])
        target = to_model_input(inputs)  # (n, 3, 64, 64) in [-1, 1]
        decoded = vae.decode(torch.stack([s.mean for s in chunk]).float())
        mse = ((decoded - target) / 2).square().mean(dim=(1, 2, 3))  # in [0, 1] units
        psnrs.append(10 * torch.log10(1 / mse))
    psnr = torch.cat(psnrs)
    assert psnr.mean() >= 22.0, f"mean PSNR {psnr.mean():.2f} dB"


@functools.lru_cache(maxsize=4)
def _json_members(out: Path) -> dict[str, str]:
    """key -> json member of a cache, read through the plain webdataset library (proves compatibility)."""
    import webdataset as wds

    urls = sorted(str(p) for p in out.glob("shard-*.tar"))
    return {s["__key__"]: s["json"].decode() for s in wds.WebDataset(urls, shardshuffle=False)}


def _info(out: Path, key: str) -> str:
    return _json_members(out)[key]


@needs_shared
def test_flowers_labels_and_manifest(flowers):
    data, out = flowers
    cache = LatentCache(out)
    manifest = cache.manifest
    assert cache.label_names == ["daisy", "dandelion", "roses", "sunflowers", "tulips"] and cache.num_classes == 5
    for sample in all_samples(out):
        folder = json.loads(_info(out, sample.key))["source"].split("/")[0]
        assert cache.label_names[sample.label] == folder
        assert sample.mean.dtype == torch.float16 and sample.mean.shape == (32, 8, 8) and sample.std is None
    assert manifest["vae"]["files"]["taef2_encoder.pth"].startswith("10a4e102")
    assert manifest["latent_shape"] == [32, 8, 8] and manifest["resolution"] == 64 and manifest["dtype"] == "float16"
    assert [s["count"] for s in manifest["shards"]] == [40, 40, 25] and manifest["num_samples"] == 105
    assert len(manifest["channel_mean"]) == 32 and all(s > 0 for s in manifest["channel_std"])
    assert manifest["members"] == ["mean.npy", "cls", "json"] and "encode" in manifest["command"]
    assert (out / "skipped.jsonl").read_text() == ""


@needs_shared
def test_finished_cache_rerun_is_a_no_op_and_other_resolution_is_refused(flowers, capsys):
    data, out = flowers
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert encode("--vae", str(TAEF2), "--data", str(data), "--out", str(out), "--resolution", "64") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before
    assert encode("--vae", str(TAEF2), "--data", str(data), "--out", str(out), "--resolution", "32") == 2
    assert "resolution=64" in capsys.readouterr().err


# ---- a tiny stochastic VAE ---------------------------------------------------------------------------------

def test_stochastic_vae_stores_std_and_flips_in_model_space(tmp_path):
    vae_dir, images = tiny_kl(tmp_path / "kl"), synthetic_images(tmp_path / "imgs", 6)
    out = tmp_path / "cache"
    assert encode("--vae", str(vae_dir), "--data", str(images), "--out", str(out), "--resolution", "16",
                  "--flip", "--num-workers", "0", "--batch-size", "4") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stochastic"] and manifest["flip"] and manifest["shift_factor"] == 0.3
    assert manifest["members"] == ["mean.npy", "std.npy", "flip.mean.npy", "flip.std.npy", "json"]
    vae = load_vae(vae_dir)
    for sample in all_samples(out):
        source = json.loads(_read_json_member(out, sample.key))["source"]
        pixels = torch.from_numpy(preprocess_bytes((images / source).read_bytes(), PreprocessConfig(16)).pixels.copy())
        image = to_model_input(pixels[None])
        with torch.no_grad():
            posterior = vae.module.encode(torch.cat([image, image.flip(-1)])).latent_dist
        expected_mean = (posterior.mean - 0.3) * 0.7  # model space: (z - shift) * scaling
        torch.testing.assert_close(sample.mean.float(), expected_mean[0], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(sample.std.float(), posterior.std[0] * 0.7, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(sample.flip_mean.float(), expected_mean[1], atol=2e-3, rtol=2e-3)
        assert (sample.std > 0).all()
        decoded = vae.decode(sample.mean[None].float())
        with torch.no_grad():
            direct = vae.module.decode(sample.mean[None].float() / 0.7 + 0.3).sample.clamp(-1, 1)
        torch.testing.assert_close(decoded, direct)


def _read_json_member(out: Path, key: str) -> str:
    import tarfile

    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as archive:
            if f"{key}.json" in archive.getnames():
                return archive.extractfile(f"{key}.json").read().decode()
    raise KeyError(key)


def test_overwrite_replaces_a_cache_made_differently(tmp_path, capsys):
    vae_dir, images = tiny_kl(tmp_path / "kl"), synthetic_images(tmp_path / "imgs", 3)
    out = tmp_path / "cache"
    common = ["--vae", str(vae_dir), "--data", str(images), "--out", str(out), "--num-workers", "0"]
    assert encode(*common, "--resolution", "16") == 0
    other_vae = tiny_kl(tmp_path / "kl2", scaling_factor=0.5)
    assert encode("--vae", str(other_vae), *common[2:], "--resolution", "16") == 2
    assert "vae=" in capsys.readouterr().err
    assert encode(*common, "--resolution", "8", "--overwrite") == 0
    assert LatentCache(out).latent_shape == (4, 2, 2) and len(LatentCache(out)) == 3


@pytest.mark.parametrize("kind", ["hf-imagefolder", "webdataset"])
def test_other_sources_encode_with_labels(tmp_path, monkeypatch, kind):
    import tarfile

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    images = synthetic_images(tmp_path / "imgs", 6)
    if kind == "hf-imagefolder":
        for i, path in enumerate(sorted(images.iterdir())):
            (images / ("a" if i < 2 else "b")).mkdir(exist_ok=True)
            path.rename(images / ("a" if i < 2 else "b") / path.name)
        data = f"hf:imagefolder:{images}"
    else:
        data = str(tmp_path / "shards" / "images-{000..001}.tar")
        (tmp_path / "shards").mkdir()
        for shard, paths in enumerate((sorted(images.iterdir())[:2], sorted(images.iterdir())[2:])):
            with tarfile.open(tmp_path / "shards" / f"images-{shard:03d}.tar", "w") as archive:
                for path in paths:
                    archive.add(path, arcname=path.name)
                    label = (tmp_path / f"{path.stem}.cls")
                    label.write_text(str(shard))
                    archive.add(label, arcname=f"{path.stem}.cls")
    out = tmp_path / "cache"
    assert encode("--vae", str(tiny_kl(tmp_path / "kl")), "--data", data, "--out", str(out), "--resolution", "8",
                  "--num-workers", "1", "--labels") == 0
    labels = sorted(sample.label for sample in all_samples(out))
    assert labels == [0, 0, 1, 1, 1, 1]
    assert LatentCache(out).num_classes == 2


# ---- odd inputs --------------------------------------------------------------------------------------------

def _odd_inputs(folder: Path) -> dict[str, str]:
    """Write odd files; returns name -> expected outcome ("ok" or "skip")."""
    folder.mkdir(parents=True)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "text.png").write_text("this is not a picture\n")
    (folder / "empty.jpg").write_bytes(b"")
    Image.new("L", (20, 10), 90).save(folder / "gray.png")
    Image.new("RGBA", (12, 12), (255, 0, 0, 0)).save(folder / "rgba.png")
    Image.new("CMYK", (12, 12), (0, 255, 0, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((9, 9), 60000, dtype=np.uint16)).save(folder / "deep16.png")
    Image.new("RGB", (1, 1), (0, 128, 255)).save(folder / "dot.png")
    Image.new("P", (8, 8), 3).save(folder / "palette.gif")
    return {"truncated.jpg": "skip", "text.png": "skip", "empty.jpg": "skip", "gray.png": "ok", "rgba.png": "ok",
            "cmyk.jpg": "ok", "deep16.png": "ok", "dot.png": "ok", "palette.gif": "ok"}


def test_odd_inputs_are_converted_or_listed_in_skipped(tmp_path):
    vae_dir, folder = tiny_kl(tmp_path / "kl"), tmp_path / "odd"
    expected = _odd_inputs(folder)
    out = tmp_path / "cache"
    assert encode("--vae", str(vae_dir), "--data", str(folder), "--out", str(out), "--resolution", "8",
                  "--num-workers", "1", "--batch-size", "3") == 0
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(entry["source"] for entry in skipped) == sorted(k for k, v in expected.items() if v == "skip")
    assert all(entry["reason"] for entry in skipped)
    encoded = {json.loads(_read_json_member(out, s.key))["source"] for s in all_samples(out)}
    assert encoded == {k for k, v in expected.items() if v == "ok"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 6 and manifest["num_skipped"] == 3


def test_nothing_encodable_exits_non_zero(tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_text("no")
    (folder / "b.jpg").write_bytes(b"\xff\xd8\xff")
    out = tmp_path / "cache"
    assert encode("--vae", str(tiny_kl(tmp_path / "kl")), "--data", str(folder), "--out", str(out),
                  "--resolution", "8", "--num-workers", "0") == 1
    assert "nothing could be encoded" in capsys.readouterr().err
    assert len((out / "skipped.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("extra, message", [
    (["--resolution", "0"], r"--resolution must be a positive multiple of the VAE downsampling factor 4, got 0; "
                            r"use e\.g\. 32"),
    (["--batch-size", "0"], r"--batch-size must be an integer >= 1, got 0"),
    (["--num-workers", "-1"], r"--num-workers must be an integer >= 0, got -1"),
    (["--min-size", "-3"], r"--min-size must be an integer >= 1, got -3"),
])
def test_bad_counts_are_refused_in_one_line_before_the_cache_is_touched(tmp_path, capsys, extra, message):
    """Found trying the command from outside: batch size 0 and -1 workers were tracebacks, resolution 0 was told
    to use 8 or 8, a negative minimum size passed."""
    out = tmp_path / "cache"
    arguments = ["--vae", str(tiny_kl(tmp_path / "kl")), "--data", str(synthetic_images(tmp_path / "img", 2)),
                 "--out", str(out), "--resolution", "8", *extra]
    assert encode(*arguments) == 2
    assert re.fullmatch(f"latentflow encode: error: {message}\n", capsys.readouterr().err)
    assert not out.exists()


def test_an_out_that_is_a_file_is_refused_naming_it(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("someone's file")
    for out in (taken, taken / "cache"):
        assert encode("--vae", str(tiny_kl(tmp_path / "kl")), "--data", str(synthetic_images(tmp_path / "img", 2)),
                      "--out", str(out), "--resolution", "8") == 2
        assert capsys.readouterr().err == (f"latentflow encode: error: latentflow encode writes a folder at {out}, "
                                           f"and {taken} is a file; choose another --out\n")
    assert taken.read_text() == "someone's file"


def test_an_out_holding_something_else_is_refused_also_with_overwrite(tmp_path, capsys):
    """Found trying the command from outside: encode wrote its shards and manifest into a pipeline folder and into a
    training run (and --overwrite would have cleared a cache's files in whatever folder it was given)."""
    vae_dir, images = tiny_kl(tmp_path / "kl"), synthetic_images(tmp_path / "img", 2)
    pipeline = tmp_path / "pipe"
    (pipeline / "transformer").mkdir(parents=True)
    for name in ("model_index.json", "README.md", "cache_manifest.json", "skipped.jsonl"):
        (pipeline / name).write_text("{}")
    before = sorted(path.name for path in pipeline.iterdir())
    for extra in ([], ["--overwrite"]):
        assert encode("--vae", str(vae_dir), "--data", str(images), "--out", str(pipeline), "--resolution", "8",
                      *extra) == 2
        assert capsys.readouterr().err == (f"latentflow encode: error: --out {pipeline} holds files that are not a "
                                           f"latent cache (README.md, cache_manifest.json, model_index.json and 1 "
                                           f"more); use a new or empty folder\n")
    assert sorted(path.name for path in pipeline.iterdir()) == before


# ---- resume after a real SIGKILL ---------------------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_mid_run_then_resume_encodes_every_key_exactly_once(tmp_path, capsys):
    vae_dir, images = tiny_kl(tmp_path / "kl"), synthetic_images(tmp_path / "imgs", 120, size=(40, 32))
    out = tmp_path / "cache"
    command = [sys.executable, "-m", "latentflow.cli", "encode", "--vae", str(vae_dir), "--data", str(images),
               "--out", str(out), "--resolution", "32", "--batch-size", "2", "--shard-size", "6",
               "--num-workers", "1", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list((out / "index").glob("shard-*.json"))) < 2 and time.monotonic() < deadline:
        assert process.poll() is None, "the encoder ended before it could be killed"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists(), "the run finished before the kill: make it longer"
    finished_before = {k for p in (out / "index").glob("shard-*.json") for k in json.loads(p.read_text())["keys"]}
    assert 0 < len(finished_before) < 120
    assert encode(*command[4:]) == 0  # resume in-process (saves a second interpreter start)
    assert f"encoded {120 - len(finished_before)}," in capsys.readouterr().out
    keys = [sample.key for sample in all_samples(out)]
    assert len(keys) == len(set(keys)) == 120
    assert not list(out.glob(".shard-*"))  # the killed run's partial shard is gone


# ---- a real 2-process accelerate launch --------------------------------------------------------------------

@needs_shared
@pytest.mark.slow
def test_two_process_accelerate_launch_matches_one_process(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for photo in sorted(FLOWERS.glob("*/*.jpg"))[::40][:18]:
        (data / photo.name).symlink_to(photo)
    single, double = tmp_path / "one", tmp_path / "two"
    common = ["--vae", str(TAEF2), "--data", str(data), "--resolution", "32", "--shard-size", "4",
              "--num-workers", "0", "--no-progress"]
    assert encode(*common, "--out", str(single)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
         str(REPO / "scripts" / "encode_latents.py"), *common, "--out", str(double)],
        capture_output=True, text=True, timeout=300, env=env)
    assert launched.returncode == 0, launched.stderr[-3000:]
    names = sorted(p.name for p in double.glob("shard-*.tar"))
    assert any(n.endswith("-r0.tar") for n in names) and any(n.endswith("-r1.tar") for n in names)
    one = {s.key: s for s in all_samples(single)}
    two = {s.key: s for s in all_samples(double)}
    assert sorted(one) == sorted(two) and len(two) == 18
    for key in one:
        torch.testing.assert_close(one[key].mean.float(), two[key].mean.float(), atol=2e-3, rtol=2e-3)
    manifest = json.loads((double / "manifest.json").read_text())
    assert manifest["num_samples"] == 18 and len(manifest["shards"]) == len(names)
