"""Encode an image source into a latent cache (shards + manifest), resumably and exactly once per input.

DataLoader workers read and preprocess batches (uint8) while the main process runs the VAE and writes shards.
Under ``accelerate launch`` every process takes every world_size-th pending input, writes its own shards, and
rank 0 writes the single manifest at the end. Rank 0 holds the cache's lock (`latentflow.io.folder_lock`) for the
whole run, so a second encode into the same folder is refused at once.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from latentflow.data.manifest import (
    MANIFEST_FILE,
    SKIPPED_FILE,
    build_manifest,
    check_cache_folder,
    check_compatible,
    write_settings,
    write_skipped,
)
from latentflow.data.preprocess import PreprocessConfig, check_resolution, preprocess_bytes, to_model_input
from latentflow.data.sources import Record, Source, open_source
from latentflow.data.writer import INDEX_DIR, LatentSample, ShardWriter, read_indexes, remove_stale_temporaries
from latentflow.errors import LatentflowError, require_count
from latentflow.io import write_json_atomic
from latentflow.processes import Distributed
from latentflow.vae import FrozenVAE, load_vae


@dataclass
class EncodeConfig:
    """Settings of one ``latentflow encode`` run (see the CLI for each)."""

    vae: str
    data: str
    out: str | Path
    resolution: int = 64
    batch_size: int = 32
    num_workers: int | None = None
    flip: bool = False
    shard_size: int = 1000
    dtype: str = "fp32"
    labels: bool | None = None
    overwrite: bool = False
    split: str | None = None  # Hugging Face sources only (None: train)
    image_column: str | None = None
    label_column: str | None = None
    min_size: int = 1
    device: str | None = None
    progress: bool = True
    command: list[str] | None = None
    preprocess_extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class EncodeResult:
    """What a run did: inputs it encoded / skipped, and the cache totals (from the manifest)."""

    out: Path
    encoded: int
    skipped: int
    num_samples: int
    num_skipped: int
    already_complete: bool
    manifest: dict[str, Any] | None
    seconds: float = 0.0  # wall time of this run's read-encode-write loop (0 when nothing was pending)


class _BatchReader(Dataset):
    """Item i = batch i of `records`: uint8 pixels (n, H, W, 3), the record positions, sizes, and failures."""

    def __init__(self, source: Source, records: list[Record], batch_size: int, config: PreprocessConfig):
        self.source, self.records, self.config = source, records, config
        self.batches = [range(start, min(start + batch_size, len(records)))
                        for start in range(0, len(records), batch_size)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, item: int) -> dict[str, Any]:
        pixels, positions, sizes, failures = [], [], [], []
        for position in self.batches[item]:
            try:
                result = preprocess_bytes(self.source.read(self.records[position]), self.config)
            except Exception as error:  # any unreadable input is a skip, never a crash
                failures.append((position, f"{type(error).__name__}: {error}".strip()[:500]))
                continue
            pixels.append(torch.from_numpy(result.pixels.copy()))
            positions.append(position)
            sizes.append(result.original_size)
        resolution = self.config.resolution
        stacked = torch.stack(pixels) if pixels else torch.zeros(0, resolution, resolution, 3, dtype=torch.uint8)
        return {"pixels": stacked, "positions": positions, "sizes": sizes, "failures": failures}


def default_num_workers(device: torch.device) -> int:
    """Decoding workers: on a GPU as many as the CPUs allow (decoding is the bottleneck there); on the CPU one,
    because the VAE already keeps every core busy and more workers only preempt its threads."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus - 1)) if device.type != "cpu" else 1


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers decode images; the VAE in the main process gets the cores


def _settings(config: EncodeConfig, vae: FrozenVAE, source: Source, preprocess: PreprocessConfig) -> dict[str, Any]:
    return {"vae": vae.identity, "resolution": config.resolution, "flip": config.flip,
            "preprocessing": {**preprocess.to_dict(), **config.preprocess_extra}, "storage_dtype": "float16",
            "compute_dtype": str(vae.dtype).replace("torch.", ""), "source": source.description,
            "label_names": source.label_names}


def _prepare_out(out: Path, settings: dict[str, Any], overwrite: bool, dist: Distributed) -> None:
    out.mkdir(parents=True, exist_ok=True)
    exists = check_compatible(out, settings) if not overwrite else False
    dist.barrier()  # every rank has checked before rank 0 changes anything
    if dist.rank == 0:
        if overwrite:
            _clear_cache(out)
        if not exists:
            write_settings(out, settings)
    remove_stale_temporaries(out, dist.rank if dist.world_size > 1 else None)
    dist.barrier()


def _clear_cache(out: Path) -> None:
    for path in list(out.glob("shard-*.tar")) + list(out.glob(".shard-*")) + \
            [out / MANIFEST_FILE, out / SKIPPED_FILE]:
        path.unlink(missing_ok=True)
    shutil.rmtree(out / INDEX_DIR, ignore_errors=True)


def _pending(source: Source, out: Path) -> list[Record]:
    done = set()
    for index in read_indexes(out):
        done.update(index.keys)
        done.update(entry["key"] for entry in index.skipped)
    keys = [record.key for record in source.records]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise LatentflowError(f"--data: two inputs map to the same key {duplicate!r}")
    return [record for record in source.records if record.key not in done]


def _encode_batch(vae: FrozenVAE, pixels: torch.Tensor, flip: bool, device: torch.device) -> list[dict[str, Any]]:
    images = to_model_input(pixels.to(device, non_blocking=True))  # (n, 3, H, W) in [-1, 1]
    count = images.shape[0]
    if flip:
        images = torch.cat([images, images.flip(-1)])  # (2n, 3, H, W)
    encoded = vae.encode(images)
    mean, std = encoded.mean.cpu(), None if encoded.std is None else encoded.std.cpu()
    outputs = []
    for j in range(count):
        item = {"mean": mean[j], "std": None if std is None else std[j]}
        if flip:
            item.update(flip_mean=mean[count + j], flip_std=None if std is None else std[count + j])
        outputs.append(item)
    return outputs


def _run_loop(config: EncodeConfig, vae: FrozenVAE, source: Source, records: list[Record],
              preprocess: PreprocessConfig, dist: Distributed, out: Path) -> tuple[int, int]:
    writer = ShardWriter(out, config.shard_size, dist.rank, dist.world_size)
    workers = config.num_workers if config.num_workers is not None else default_num_workers(dist.device)
    loader = DataLoader(_BatchReader(source, records, config.batch_size, preprocess), batch_size=None,
                        num_workers=workers, worker_init_fn=_worker_init if workers else None,
                        prefetch_factor=4 if workers else None, pin_memory=dist.device.type == "cuda")
    encoded = skipped = 0
    bar = tqdm(total=len(records), unit="img", dynamic_ncols=True, disable=not config.progress or dist.rank != 0,
               desc=f"encode rank {dist.rank}/{dist.world_size}" if dist.world_size > 1 else "encode")
    for batch in loader:
        for position, reason in batch["failures"]:
            record = records[position]
            writer.skip(record.key, record.origin, reason)
        skipped += len(batch["failures"])
        if batch["positions"]:
            latents = _encode_batch(vae, batch["pixels"], config.flip, dist.device)
            for position, size, item in zip(batch["positions"], batch["sizes"], latents):
                record = records[position]
                info = {"source": record.origin, "original_size": list(size)}
                writer.add(LatentSample(key=record.key, label=record.label, info=info, **item))
            encoded += len(batch["positions"])
        bar.update(len(batch["positions"]) + len(batch["failures"]))
    writer.finish_shard()
    bar.close()
    return encoded, skipped


def _finish(out: Path, settings: dict[str, Any], command: str) -> dict[str, Any]:
    indexes = read_indexes(out)
    manifest = build_manifest(settings, indexes, settings.get("label_names"), command)
    write_skipped(out, indexes)
    write_json_atomic(out / MANIFEST_FILE, manifest, indent=1)
    return manifest


def encode_dataset(config: EncodeConfig) -> EncodeResult:
    """Encode `config.data` into the cache `config.out`; resumes a partial cache, skips a finished one.

    Returns:
        EncodeResult; ``num_samples == 0`` means nothing could be encoded (the CLI exits non-zero).
    """
    _check_counts(config)
    out = Path(config.out)
    check_cache_folder(out)  # also with --overwrite, which replaces a cache, not what else the folder holds
    dist = Distributed(config.device)
    with dist.lock(out, "latentflow encode"):
        return _encode_locked(config, dist, out)


def _check_counts(config: EncodeConfig) -> None:
    """Refuse batch, worker and size counts that cannot work, before the VAE is loaded or the cache touched (the
    shard size is the writer's to check)."""
    for name, value, least in (("batch-size", config.batch_size, 1), ("num-workers", config.num_workers, 0),
                               ("min-size", config.min_size, 1)):
        if value is not None:
            require_count(f"--{name}", value, least)


def _encode_locked(config: EncodeConfig, dist: Distributed, out: Path) -> EncodeResult:
    """`encode_dataset` once the lock of `out` is held."""
    vae = load_vae(config.vae, dtype=config.dtype, device=dist.device)
    check_resolution(config.resolution, vae.downsampling_factor)
    preprocess = PreprocessConfig(resolution=config.resolution, min_size=config.min_size)
    source = open_source(config.data, config.labels, config.split, config.image_column, config.label_column)
    settings = _settings(config, vae, source, preprocess)
    _prepare_out(out, settings, config.overwrite, dist)
    pending = _pending(source, out)
    dist.barrier()  # all ranks computed the same pending list before anyone writes
    command = shlex.join(config.command if config.command is not None else sys.argv)
    if not pending and (out / MANIFEST_FILE).exists():
        manifest = _read_manifest(out)
        return EncodeResult(out, 0, 0, manifest["num_samples"], manifest["num_skipped"], True, manifest)
    started = time.perf_counter()
    encoded, skipped = _run_loop(config, vae, source, pending[dist.rank::dist.world_size], preprocess, dist, out)
    seconds = time.perf_counter() - started
    dist.barrier()
    manifest = _finish(out, settings, command) if dist.rank == 0 else None
    dist.barrier()
    manifest = manifest or _read_manifest(out)
    return EncodeResult(out, encoded, skipped, manifest["num_samples"], manifest["num_skipped"], False, manifest,
                        seconds)


def _read_manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / MANIFEST_FILE).read_text())
