"""Read a latent cache for training: :class:`LatentCache` and the endless :func:`make_latent_loader`.

Determinism. The batch sequence is a pure function of (seed, rank, world_size) and the cache:

* epoch e visits the shards in a permutation drawn from (seed, e); rank r takes every world_size-th of them
  (in-memory mode: every world_size-th sample of a permutation of all samples);
* a shuffle buffer (seeded by seed, rank, e) reorders the rank's samples; epochs are concatenated and cut
  into batches, so batch b holds stream items [b*B, (b+1)*B);
* everything random inside batch b (posterior sample, flip choice, and the generator handed to
  ``batch_transform``) comes from a generator seeded by (seed, rank, b).

So the number of workers does not change the batches (worker w builds batches b = start_batch + w (mod
workers), and the DataLoader hands them back in order), and ``start_batch=k`` gives exactly the batches k,
k+1, ... of an uninterrupted run. Skipping ahead jumps over whole epochs for free and re-reads at most one epoch
of raw bytes (without decoding).
"""

from __future__ import annotations

import inspect
import io
import json
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from latentflow.data.manifest import validate_manifest
from latentflow.errors import LatentflowError

RawSample = dict[str, Any]  # {"__key__": str, "mean.npy": bytes, ...}


@dataclass(frozen=True)
class ShardInfo:
    """A readable shard: its path and sample count."""

    path: Path
    count: int


def _split_member(name: str) -> tuple[str, str]:
    stem, _, extension = name.partition(".")
    return stem, extension


class LatentCache:
    """A validated latent cache folder.

    Args:
        path: the folder holding ``manifest.json`` and the shards.
        skip_bad_shards: leave out shards that are missing or whose size differs from the manifest (with a
            warning) instead of raising.

    Attributes:
        manifest: the parsed manifest.
        latent_shape: (C, h, w).
        num_classes: number of classes, 0 when unlabelled.
        label_names: class names by id, or None.
        channel_mean, channel_std: (C,) float32 tensors from the manifest (std of posterior samples).
        vae_identity: the manifest's VAE identity (class, source, sha256 of weights, factors).
        shards: the shards that will be read.
    """

    def __init__(self, path: str | Path, skip_bad_shards: bool = False):
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.exists():
            hint = " (an encode run is unfinished: rerun it to resume)" if (self.path / "index").exists() else ""
            raise LatentflowError(f"{manifest_path}: not found; not a latent cache{hint}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise LatentflowError(f"{manifest_path}: invalid JSON ({error})") from error
        self.manifest = validate_manifest(manifest, manifest_path)
        self.skip_bad_shards = skip_bad_shards
        self.shards = self._check_shards()
        self.latent_shape = tuple(self.manifest["latent_shape"])
        self.num_classes = int(self.manifest["num_classes"])
        self.label_names = self.manifest.get("label_names")
        channels = self.latent_shape[0]
        self.channel_mean = torch.tensor(self.manifest["channel_mean"] or [0.0] * channels, dtype=torch.float32)
        self.channel_std = torch.tensor(self.manifest["channel_std"] or [1.0] * channels, dtype=torch.float32)
        self.vae_identity = self.manifest["vae"]
        self.has_std = bool(self.manifest["stochastic"])
        self.has_flip = bool(self.manifest["flip"])

    def _check_shards(self) -> list[ShardInfo]:
        shards = []
        for entry in self.manifest["shards"]:
            path = self.path / entry["name"]
            problem = None
            if not path.exists():
                problem = "is missing"
            elif "bytes" in entry and path.stat().st_size != entry["bytes"]:
                problem = f"has {path.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated?)"
            if problem and not self.skip_bad_shards:
                raise LatentflowError(f"shard {path} {problem}; re-encode it (rerun encode after deleting it and "
                                      f"index/{entry['name']}.json) or open the cache with skip_bad_shards=True")
            if problem:
                warnings.warn(f"skipping shard {path}: it {problem}")
                continue
            if entry["count"] > 0:
                shards.append(ShardInfo(path, int(entry["count"])))
        return shards

    def __len__(self) -> int:
        return sum(shard.count for shard in self.shards)

    def read_shard(self, shard: ShardInfo) -> Iterator[RawSample]:
        """Raw samples of `shard` in order; a truncated or corrupt shard raises LatentflowError naming it."""
        seen, current = 0, None
        try:
            with tarfile.open(shard.path, "r|") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    key, extension = _split_member(member.name)
                    if current is not None and current["__key__"] != key:
                        yield current
                        seen += 1
                    if current is None or current["__key__"] != key:
                        current = {"__key__": key}
                    current[extension] = archive.extractfile(member).read()
        except (tarfile.TarError, EOFError, OSError) as error:
            raise LatentflowError(f"shard {shard.path}: truncated or corrupt ({error}); re-encode it or open the "
                                  "cache with skip_bad_shards=True") from error
        if current is not None:
            yield current
            seen += 1
        if seen != shard.count:
            raise LatentflowError(f"shard {shard.path}: {seen} samples, the manifest says {shard.count} (truncated?)")

    def load(self) -> "InMemoryLatents":
        """Every sample decoded into memory (float16), for small caches."""
        samples = [decode_raw(raw) for shard in self.shards for raw in self.read_shard(shard)]
        return InMemoryLatents.stack(samples, self.latent_shape)


@dataclass
class DecodedSample:
    """One cached sample as tensors (C, h, w) float16; optional parts None."""

    key: str
    mean: torch.Tensor
    std: torch.Tensor | None
    flip_mean: torch.Tensor | None
    flip_std: torch.Tensor | None
    label: int | None


def _npy(raw: RawSample, extension: str) -> torch.Tensor | None:
    payload = raw.get(extension)
    return None if payload is None else torch.from_numpy(np.load(io.BytesIO(payload), allow_pickle=False))


def decode_raw(raw: RawSample) -> DecodedSample:
    """Decode a raw sample's members (npy, cls)."""
    label = int(raw["cls"].decode()) if "cls" in raw else None
    return DecodedSample(raw["__key__"], _npy(raw, "mean.npy"), _npy(raw, "std.npy"), _npy(raw, "flip.mean.npy"),
                         _npy(raw, "flip.std.npy"), label)


@dataclass
class InMemoryLatents:
    """All samples stacked: means (N, C, h, w) float16, optional stds / flips, labels (N,) or None, keys."""

    keys: list[str]
    mean: torch.Tensor
    std: torch.Tensor | None
    flip_mean: torch.Tensor | None
    flip_std: torch.Tensor | None
    labels: torch.Tensor | None

    @staticmethod
    def stack(samples: list[DecodedSample], shape: tuple[int, ...]) -> "InMemoryLatents":
        def gather(name: str) -> torch.Tensor | None:
            values = [getattr(s, name) for s in samples]
            return None if not values or values[0] is None else torch.stack(values)

        labels = [s.label for s in samples]
        return InMemoryLatents(
            keys=[s.key for s in samples],
            mean=gather("mean") if samples else torch.zeros(0, *shape, dtype=torch.float16),
            std=gather("std"), flip_mean=gather("flip_mean"), flip_std=gather("flip_std"),
            labels=None if not labels or labels[0] is None else torch.tensor(labels, dtype=torch.long))

    def sample(self, index: int) -> DecodedSample:
        def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[index]

        label = None if self.labels is None else int(self.labels[index])
        return DecodedSample(self.keys[index], self.mean[index], pick(self.std), pick(self.flip_mean),
                             pick(self.flip_std), label)


@dataclass(frozen=True)
class LoaderOptions:
    """make_latent_loader's settings (see there)."""

    batch_size: int
    seed: int
    rank: int
    world_size: int
    shuffle_buffer: int
    sample_posterior: bool
    random_flip: bool
    normalize: bool
    start_batch: int


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


def _batch_generator(seed: int, rank: int, batch_index: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, rank, batch_index, 0x6C66]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def _transform_takes_generator(transform: Callable) -> bool:
    try:
        parameters = inspect.signature(transform).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.name == "generator" or p.kind == p.VAR_KEYWORD for p in parameters)


class _LatentStream(IterableDataset):
    """Yields finished batches; see the module docstring for the order."""

    def __init__(self, cache: LatentCache, options: LoaderOptions, memory: InMemoryLatents | None,
                 batch_transform: Callable | None):
        self.cache, self.options, self.memory, self.batch_transform = cache, options, memory, batch_transform
        self._transform_generator = batch_transform is not None and _transform_takes_generator(batch_transform)
        if memory is None and len(cache.shards) < options.world_size:
            raise LatentflowError(f"{cache.path}: {len(cache.shards)} non-empty shards cannot give each of "
                                  f"{options.world_size} ranks distinct shards; use in_memory=True or re-encode "
                                  "with a smaller --shard-size")
        if memory is None and options.world_size > 1 and len(cache.shards) % options.world_size:
            warnings.warn(f"{cache.path}: {len(cache.shards)} shards over {options.world_size} ranks: ranks see "
                          "unequal numbers of samples per epoch")

    # -- the raw stream --------------------------------------------------------------------------------------
    def _epoch_items(self, epoch: int) -> list[Any]:
        """What rank reads in `epoch`: shards (streaming) or sample indices (in memory), in order."""
        options = self.options
        if self.memory is not None:
            order = _rng(options.seed, epoch).permutation(len(self.memory.keys))
            return list(order[options.rank::options.world_size])
        order = _rng(options.seed, epoch).permutation(len(self.cache.shards))
        return [self.cache.shards[i] for i in order[options.rank::options.world_size]]

    def _epoch_length(self, epoch: int) -> int:
        items = self._epoch_items(epoch)
        return len(items) if self.memory is not None else sum(shard.count for shard in items)

    def _epoch_stream(self, epoch: int) -> Iterator[Any]:
        items = self._epoch_items(epoch)
        if self.memory is not None:
            yield from items
            return
        rng, buffer = _rng(self.options.seed, self.options.rank, epoch, 1), []
        for shard in items:
            for raw in self.cache.read_shard(shard):
                if len(buffer) < self.options.shuffle_buffer:
                    buffer.append(raw)
                    continue
                slot = int(rng.integers(len(buffer)))
                buffer[slot], raw = raw, buffer[slot]
                yield raw
        for slot in rng.permutation(len(buffer)):
            yield buffer[slot]

    def _stream_from(self, item_offset: int) -> Iterator[Any]:
        epoch = 0
        while True:
            length = self._epoch_length(epoch)
            if length == 0 and epoch == 0:
                raise LatentflowError(f"{self.cache.path}: rank {self.options.rank} has no samples to read")
            if item_offset >= length:
                item_offset -= length  # skip a whole epoch without reading it
            else:
                stream = self._epoch_stream(epoch)
                for _ in range(item_offset):
                    next(stream)
                item_offset = 0
                yield from stream
            epoch += 1

    # -- batches ---------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        options = self.options
        stream = self._stream_from(options.start_batch * options.batch_size)
        batch_index = options.start_batch
        while True:
            items = [next(stream) for _ in range(options.batch_size)]
            if (batch_index - options.start_batch) % workers == worker:
                yield self._make_batch(items, batch_index)
            batch_index += 1

    def _decode(self, item: Any) -> DecodedSample:
        return self.memory.sample(int(item)) if self.memory is not None else decode_raw(item)

    def _make_batch(self, items: list[Any], batch_index: int) -> Any:
        options, generator = self.options, _batch_generator(self.options.seed, self.options.rank, batch_index)
        samples = [self._decode(item) for item in items]
        use_flip = options.random_flip and samples[0].flip_mean is not None
        flips = (torch.rand(len(samples), generator=generator) < 0.5) if use_flip else torch.zeros(len(samples), dtype=torch.bool)
        mean = torch.stack([s.flip_mean if f else s.mean for s, f in zip(samples, flips.tolist())]).float()  # (B, C, h, w)
        latents = mean
        if options.sample_posterior and samples[0].std is not None:
            std = torch.stack([s.flip_std if f else s.std for s, f in zip(samples, flips.tolist())]).float()
            latents = mean + std * torch.randn(mean.shape, generator=generator)  # (B, C, h, w)
        if options.normalize:
            latents = (latents - self.cache.channel_mean.view(1, -1, 1, 1)) / self.cache.channel_std.view(1, -1, 1, 1)
        labels = None if samples[0].label is None else torch.tensor([s.label for s in samples], dtype=torch.long)
        batch = {"latents": latents, "labels": labels, "keys": [s.key for s in samples], "flipped": flips,
                 "batch_index": batch_index}
        if self.batch_transform is None:
            return batch
        if self._transform_generator:
            return self.batch_transform(batch, generator)
        return self.batch_transform(batch)


class LatentLoader:
    """An endless iterator of batches (see :func:`make_latent_loader`).

    Attributes:
        next_batch: index of the batch the next ``next()`` returns; save it and pass it as ``start_batch``.
    """

    def __init__(self, dataset: _LatentStream, num_workers: int, pin_memory: bool):
        self.dataset, self.next_batch = dataset, dataset.options.start_batch
        self._loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                                  prefetch_factor=4 if num_workers else None, persistent_workers=False)
        self._iterator: Iterator[Any] | None = None

    def __iter__(self) -> "LatentLoader":
        return self

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = iter(self._loader)
        batch = next(self._iterator)
        self.next_batch += 1
        return batch


def make_latent_loader(cache: LatentCache | str | Path, batch_size: int, seed: int = 0, rank: int = 0,
                       world_size: int = 1, shuffle_buffer: int = 1000, sample_posterior: bool = True,
                       random_flip: bool = True, normalize: bool = False, in_memory: bool = False,
                       num_workers: int = 0, batch_transform: Callable | None = None, start_batch: int = 0,
                       pin_memory: bool = False) -> LatentLoader:
    """An endless, deterministic iterator of latent batches.

    Args:
        cache: a LatentCache or its folder.
        batch_size: samples per batch B.
        seed: base seed; with (rank, world_size) it fixes every batch.
        rank, world_size: this process among several; each rank reads distinct shards (or samples in memory).
        shuffle_buffer: samples held for shuffling in streaming mode (shards are also shuffled per epoch).
        sample_posterior: draw z ~ N(mean, std) afresh each time (stochastic caches); False uses the mean.
        random_flip: pick the stored flip variant with probability 1/2 (caches encoded with --flip).
        normalize: subtract the manifest's channel_mean and divide by channel_std.
        in_memory: decode the whole cache once into memory (small caches; any shard count).
        num_workers: DataLoader worker processes; batches are identical for any value.
        batch_transform: runs in the workers on each batch dict; called as ``f(batch, generator)`` when it takes
            two positional arguments (or a ``generator`` keyword), else ``f(batch)``. The generator is seeded per
            batch, so e.g. noise pairing / OT stays exactly reproducible on resume.
        start_batch: index of the first batch to produce (resume).
        pin_memory: pin batches for fast host-to-GPU copies.

    Returns:
        LatentLoader yielding ``{"latents": (B, C, h, w) float32, "labels": (B,) long or None, "keys": list[str],
        "flipped": (B,) bool, "batch_index": int}`` (or whatever batch_transform returns).
    """
    if not isinstance(cache, LatentCache):
        cache = LatentCache(cache)
    if batch_size < 1 or shuffle_buffer < 1 or not 0 <= rank < world_size or start_batch < 0:
        raise LatentflowError(f"make_latent_loader: need batch_size >= 1 (got {batch_size}), shuffle_buffer >= 1 "
                              f"(got {shuffle_buffer}), 0 <= rank < world_size (got {rank}, {world_size}), "
                              f"start_batch >= 0 (got {start_batch})")
    if len(cache) == 0:
        raise LatentflowError(f"{cache.path}: the cache holds no samples")
    options = LoaderOptions(batch_size, seed, rank, world_size, shuffle_buffer, sample_posterior, random_flip,
                            normalize, start_batch)
    memory = cache.load() if in_memory else None
    return LatentLoader(_LatentStream(cache, options, memory, batch_transform), num_workers, pin_memory)
