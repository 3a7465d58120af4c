#!/usr/bin/env python
"""Encode throughput: the real `latentflow encode` path beside the VAE's own limit and a naive loop.

For each VAE (the real TAEF2 from ../shared, and a full-size SD AutoencoderKL with random weights, which costs
the same as a trained one) on the tf_flowers photos at 128 px:

* pipeline: ``encode_dataset`` (DataLoader workers decode + preprocess, main process encodes and writes shards),
  images/s of its read-encode-write loop;
* limit: ``FrozenVAE.encode`` alone on the same batches, already preprocessed and in memory;
* naive: one process, for each batch open + preprocess the images, then encode (no workers, nothing written).

Usage: python benchmarks/encode_throughput.py [--vae taef2 sd] [--images 96] [--sd-images 24] [--repeats 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from latentflow.data.encoder import EncodeConfig, encode_dataset
from latentflow.data.preprocess import PreprocessConfig, preprocess_bytes, to_model_input
from latentflow.vae import FrozenVAE, load_vae

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TAEF2 = SHARED / "weights" / "taef2"
FLOWERS = SHARED / "data" / "tf_flowers" / "images_128" / "train"


@dataclass
class Throughput:
    """Images per second of the three ways to encode the same images."""

    name: str
    images: int
    pipeline: float
    limit: float
    naive: float

    def line(self) -> str:
        return (f"{self.name:<28} {self.images:>6} {self.pipeline:>10.2f} {self.limit:>10.2f} {self.naive:>10.2f} "
                f"{self.pipeline / self.limit:>14.2f} {self.pipeline / self.naive:>14.2f}")


def sd_vae_folder(folder: Path) -> Path:
    """diffusers' default-size SD AutoencoderKL (128, 256, 512, 512; 2 layers per block) with random weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                  sample_size=512).save_pretrained(folder)  # scaling factor: diffusers' SD default
    return folder


def image_subset(count: int, folder: Path) -> Path:
    """`count` flower photos (spread over the classes) linked into `folder`."""
    photos = sorted(FLOWERS.glob("*/*.jpg"))
    step = max(1, len(photos) // count)
    folder.mkdir(parents=True)
    for photo in photos[::step][:count]:
        (folder / f"{photo.parent.name}__{photo.name}").symlink_to(photo)
    return folder


def measure_limit(vae: FrozenVAE, files: list[Path], resolution: int, batch_size: int) -> float:
    config = PreprocessConfig(resolution=resolution)
    pixels = torch.stack([torch.from_numpy(preprocess_bytes(f.read_bytes(), config).pixels.copy()) for f in files])
    batches = [to_model_input(chunk) for chunk in pixels.split(batch_size)]
    vae.encode(batches[0][:2])  # warm-up
    started = time.perf_counter()
    for batch in batches:
        vae.encode(batch)
    return len(files) / (time.perf_counter() - started)


def measure_naive(vae: FrozenVAE, files: list[Path], resolution: int, batch_size: int) -> float:
    config = PreprocessConfig(resolution=resolution)
    started = time.perf_counter()
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        pixels = torch.stack([torch.from_numpy(preprocess_bytes(f.read_bytes(), config).pixels.copy()) for f in chunk])
        vae.encode(to_model_input(pixels))
    return len(files) / (time.perf_counter() - started)


def measure_pipeline(vae_source: str, data: Path, out: Path, resolution: int, batch_size: int,
                     num_workers: int | None) -> float:
    result = encode_dataset(EncodeConfig(vae=vae_source, data=str(data), out=out, resolution=resolution,
                                         batch_size=batch_size, num_workers=num_workers, shard_size=1000,
                                         labels=False, progress=False, command=["benchmark"]))
    return result.encoded / result.seconds


def run_one(name: str, vae_source: str, count: int, args: argparse.Namespace, work: Path) -> Throughput:
    """Best of `args.repeats` for each way (best-of is the least disturbed by other load on the machine)."""
    data = image_subset(count, work / f"{name}-images")
    files = sorted(data.iterdir())
    vae = load_vae(vae_source)
    limit = naive = pipeline = 0.0
    for repeat in range(args.repeats):
        limit = max(limit, measure_limit(vae, files, args.resolution, args.batch_size))
        naive = max(naive, measure_naive(vae, files, args.resolution, args.batch_size))
        pipeline = max(pipeline, measure_pipeline(vae_source, data, work / f"{name}-cache-{repeat}", args.resolution,
                                                  args.batch_size, args.num_workers))
    return Throughput(name, len(files), pipeline, limit, naive)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vae", nargs="+", default=["taef2", "sd"], choices=("taef2", "sd"))
    parser.add_argument("--images", type=int, default=96, help="photos for TAEF2")
    parser.add_argument("--sd-images", type=int, default=24, help="photos for the full-size SD VAE")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=None, help="pipeline workers (default: the CLI's)")
    parser.add_argument("--repeats", type=int, default=1, help="measure each way this many times, keep the best")
    args = parser.parse_args()
    print(f"torch threads {torch.get_num_threads()}, resolution {args.resolution}, batch {args.batch_size}")
    print(f"{'vae':<28} {'images':>6} {'pipeline':>10} {'limit':>10} {'naive':>10} {'pipeline/limit':>14} "
          f"{'pipeline/naive':>14}   (images/s)")
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        for name in args.vae:
            if name == "taef2":
                result = run_one("TAEF2 (real)", str(TAEF2), args.images, args, work)
            else:
                result = run_one("SD AutoencoderKL (random)", str(sd_vae_folder(work / "sd-vae")), args.sd_images,
                                 args, work)
            print(result.line(), flush=True)


if __name__ == "__main__":
    main()
