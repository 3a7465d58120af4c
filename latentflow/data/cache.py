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
of shards (read and decoded shard by shard, which is cheap).
"""

from __future__ import annotations

import hashlib
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

from latentflow.data.manifest import MANIFEST_FILE, validate_manifest
from latentflow.data.writer import INDEX_DIR
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


def cache_fingerprint(cache: LatentCache) -> str:
    """sha256 of the cache's manifest.json: any re-encode, extension or edit changes it."""
    return hashlib.sha256((cache.path / MANIFEST_FILE).read_bytes()).hexdigest()


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
        has_std, has_flip: samples carry posterior stds / flipped variants.
        has_noise: samples carry the noise x0 paired with them (a couplings cache from `latentflow reflow`).
    """

    def __init__(self, path: str | Path, skip_bad_shards: bool = False):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST_FILE
        if not manifest_path.exists():
            hint = " (an encode run is unfinished: rerun it to resume)" if (self.path / INDEX_DIR).exists() else ""
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
        self.has_noise = "noise.npy" in (self.manifest.get("members") or [])

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
                warnings.warn(f"skipping shard {path}: it {problem}", stacklevel=2)
                continue
            if entry["count"] > 0:
                shards.append(ShardInfo(path, int(entry["count"])))
        return shards

    def __len__(self) -> int:
        return sum(shard.count for shard in self.shards)

    def read_shard(self, shard: ShardInfo) -> Iterator[RawSample]:
        """Raw samples of `shard` in order; a truncated or corrupt shard raises LatentflowError naming it.

        The shard is read in one go and its plain ustar headers are walked directly (much faster than
        `tarfile` on our small members; README, reader figures); archives with pax or GNU headers go through `tarfile`.
        """
        try:
            data = shard.path.read_bytes()
            try:
                members = [(name, data[start:end]) for name, start, end in _ustar_members(data)]
            except _NotPlainUstar:
                members = _tarfile_members(data)
        except (tarfile.TarError, EOFError, OSError, ValueError, UnicodeDecodeError) as error:
            raise LatentflowError(f"shard {shard.path}: truncated or corrupt ({error}); re-encode it or open the "
                                  "cache with skip_bad_shards=True") from error
        samples: list[RawSample] = []
        for name, payload in members:
            key, extension = _split_member(name)
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key})
            samples[-1][extension] = payload
        if len(samples) != shard.count:
            raise LatentflowError(f"shard {shard.path}: {len(samples)} samples, the manifest says {shard.count} "
                                  "(truncated?)")
        yield from samples

    def load(self) -> "LatentArrays":
        """Every sample decoded into memory (float16), for small caches."""
        return LatentArrays.decode([raw for shard in self.shards for raw in self.read_shard(shard)],
                                   self.latent_shape)

    def shard_arrays(self) -> Iterator["LatentArrays"]:
        """Each shard's samples decoded (float16), shard after shard in load order: what `load` returns, without
        holding every shard's bytes and arrays at once (a caller keeping part of each holds only that)."""
        for shard in self.shards:
            yield LatentArrays.decode(list(self.read_shard(shard)), self.latent_shape)

    def labels(self) -> torch.Tensor | None:
        """(N,) long: every sample's label in load order (only the labels decoded), or None when unlabelled."""
        labels = [raw.get("cls") for shard in self.shards for raw in self.read_shard(shard)]
        if not labels or labels[0] is None:
            return None
        return torch.tensor([int(label) for label in labels], dtype=torch.long)


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR, _DIRECTORY = ord("0"), ord("5")


class _NotPlainUstar(Exception):
    """The archive uses headers the fast path does not read (pax, GNU long names)."""


def _ustar_members(data: bytes) -> list[tuple[str, int, int]]:
    """(name, start, end) of each regular file in an uncompressed ustar archive held in memory.

    Fields are read in place (no header copies): name [0, 100), size [124, 136) in octal, type at 156,
    magic [257, 262), name prefix [345, 500).
    """
    members, offset, total = [], 0, len(data)
    while offset + _BLOCK <= total:
        if data[offset] == 0 and data[offset:offset + _BLOCK] == _ZERO_BLOCK:  # end-of-archive marker
            return members
        if data[offset + 257:offset + 262] != b"ustar":
            raise _NotPlainUstar
        kind = data[offset + 156]
        size = int(data[offset + 124:offset + 136].rstrip(b"\0 ") or b"0", 8)
        start = offset + _BLOCK
        if start + size > total:
            raise EOFError(f"member at byte {offset} runs past the end of the file")
        if kind in (_REGULAR, 0):
            name = data[offset:offset + 100].split(b"\0", 1)[0].decode()
            if data[offset + 345]:
                name = data[offset + 345:offset + 500].split(b"\0", 1)[0].decode() + "/" + name
            members.append((name, start, start + size))
        elif kind != _DIRECTORY:  # directories carry nothing; anything else needs tarfile
            raise _NotPlainUstar
        offset = start + -(-size // _BLOCK) * _BLOCK
    if offset != total:
        raise EOFError(f"archive ends inside a header at byte {offset}")
    return members


def _tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    """(name, payload) of each regular file, read with tarfile."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as archive:
        return [(member.name, archive.extractfile(member).read()) for member in archive if member.isfile()]


class _NpyDecoder:
    """Decodes .npy payloads, parsing each distinct header once (a cache's arrays all share one or two)."""

    def __init__(self) -> None:
        self._layouts: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}

    def __call__(self, payload: bytes) -> np.ndarray:
        """The array of one .npy payload (read-only when it views `payload`)."""
        if payload[:6] == b"\x93NUMPY":
            length_bytes = 2 if payload[6] == 1 else 4
            offset = 8 + length_bytes + int.from_bytes(payload[8:8 + length_bytes], "little")
            layout = self._layouts.get(payload[:offset])
            if layout is not None:
                dtype, shape, count = layout
                return np.frombuffer(payload, dtype, count, offset).reshape(shape)
        array = np.load(io.BytesIO(payload), allow_pickle=False)
        if payload[:6] == b"\x93NUMPY" and array.flags.c_contiguous and not array.dtype.hasobject:
            self._layouts[payload[:offset]] = (array.dtype, array.shape, array.size)
        return array


_decode_npy = _NpyDecoder()


@dataclass
class DecodedSample:
    """One cached sample as tensors (C, h, w) float16 (the noise of a coupling float32); optional parts None."""

    key: str
    mean: torch.Tensor
    std: torch.Tensor | None
    flip_mean: torch.Tensor | None
    flip_std: torch.Tensor | None
    label: int | None
    noise: torch.Tensor | None = None


def decode_raw(raw: RawSample) -> DecodedSample:
    """Decode a raw sample's members (npy, cls)."""
    arrays = LatentArrays.decode([raw], None)

    def first(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor[0]

    return DecodedSample(raw["__key__"], arrays.mean[0], first(arrays.std), first(arrays.flip_mean),
                         first(arrays.flip_std), None if arrays.labels is None else int(arrays.labels[0]),
                         first(arrays.noise))


_PARTS = {"mean": "mean.npy", "std": "std.npy", "flip_mean": "flip.mean.npy", "flip_std": "flip.std.npy",
          "noise": "noise.npy"}


@dataclass
class LatentArrays:
    """Samples stacked: mean (N, C, h, w) float16, optional std / flip_mean / flip_std alike, labels (N,) long
    or None, keys, and the couplings' noise x0 (N, C, h, w) float32 or None."""

    keys: list[str]
    mean: torch.Tensor
    std: torch.Tensor | None
    flip_mean: torch.Tensor | None
    flip_std: torch.Tensor | None
    labels: torch.Tensor | None
    noise: torch.Tensor | None = None

    @staticmethod
    def decode(raws: list[RawSample], shape: tuple[int, ...] | None) -> "LatentArrays":
        """Stack raw samples; `shape` (C, h, w) gives the empty result its shape."""
        def stack(extension: str) -> torch.Tensor | None:
            if not raws or extension not in raws[0]:
                return None
            return torch.from_numpy(np.stack([_decode_npy(raw[extension]) for raw in raws]))

        mean = stack(_PARTS["mean"])
        if mean is None:
            mean = torch.zeros(0, *(shape or ()), dtype=torch.float16)
        labels = None
        if raws and "cls" in raws[0]:
            labels = torch.tensor([int(raw["cls"]) for raw in raws], dtype=torch.long)
        return LatentArrays([raw["__key__"] for raw in raws], mean, stack(_PARTS["std"]),
                            stack(_PARTS["flip_mean"]), stack(_PARTS["flip_std"]), labels, stack(_PARTS["noise"]))

    @staticmethod
    def concatenate(parts: list["LatentArrays"]) -> "LatentArrays":
        """The samples of `parts`, one after another (all with the same members)."""
        def join(name: str) -> torch.Tensor | None:
            values = [getattr(part, name) for part in parts]
            return None if values[0] is None else torch.cat(values)

        return LatentArrays([key for part in parts for key in part.keys], join("mean"), join("std"),
                            join("flip_mean"), join("flip_std"), join("labels"), join("noise"))

    def take(self, index: torch.Tensor) -> "LatentArrays":
        """The samples at `index` (B,) long, in that order."""
        def pick(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[index]

        return LatentArrays([self.keys[i] for i in index.tolist()], self.mean[index], pick(self.std),
                            pick(self.flip_mean), pick(self.flip_std), pick(self.labels), pick(self.noise))


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


def seeded_generator(*words: int) -> torch.Generator:
    """A torch generator seeded by mixing `words` (non-negative integers) through numpy's SeedSequence."""
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def batch_generator(seed: int, rank: int, batch_index: int) -> torch.Generator:
    """The generator of batch `batch_index` of `rank`: flips, posterior draws, then the batch_transform's draws."""
    return seeded_generator(seed, rank, batch_index, 0x6C66)


def _transform_takes_generator(transform: Callable) -> bool:
    try:
        parameters = inspect.signature(transform).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.name == "generator" or p.kind == p.VAR_KEYWORD for p in parameters)


class LatentStream(IterableDataset):
    """Yields finished batches; see the module docstring for the order. `options.rank` and `world_size` pick the
    stream (the trainer's `latentflow.data.elastic` reads streams k of K whatever its own process count)."""

    def __init__(self, cache: LatentCache, options: LoaderOptions, memory: LatentArrays | None,
                 batch_transform: Callable | None):
        self.cache, self.options, self.memory, self.batch_transform = cache, options, memory, batch_transform
        self._transform_generator = batch_transform is not None and _transform_takes_generator(batch_transform)
        if memory is None and len(cache.shards) < options.world_size:
            raise LatentflowError(f"{cache.path}: {len(cache.shards)} non-empty shards cannot give each of "
                                  f"{options.world_size} ranks distinct shards; use in_memory=True or re-encode "
                                  "with a smaller --shard-size")
        if memory is None and options.world_size > 1 and len(cache.shards) % options.world_size:
            warnings.warn(f"{cache.path}: {len(cache.shards)} shards over {options.world_size} ranks: ranks see "
                          "unequal numbers of samples per epoch", stacklevel=2)

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

    def _epoch_stream(self, epoch: int) -> Iterator[tuple[LatentArrays, int]]:
        """The rank's samples of `epoch` in order, each as (arrays, row); a streamed shard is decoded whole."""
        items = self._epoch_items(epoch)
        if self.memory is not None:
            for row in items:
                yield self.memory, int(row)
            return
        rng, buffer = _rng(self.options.seed, self.options.rank, epoch, 1), []
        for shard in items:
            arrays = LatentArrays.decode(list(self.cache.read_shard(shard)), self.cache.latent_shape)
            for row in range(len(arrays.keys)):
                item = (arrays, row)
                if len(buffer) < self.options.shuffle_buffer:
                    buffer.append(item)
                    continue
                slot = int(rng.integers(len(buffer)))
                buffer[slot], item = item, buffer[slot]
                yield item
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
        for batch_index, items in self.item_batches():
            if (batch_index - self.options.start_batch) % workers == worker:
                yield self._make_batch(items, batch_index)

    def item_batches(self) -> Iterator[tuple[int, list[tuple[LatentArrays, int]]]]:
        """(batch index, its B stream items) from `start_batch` on, endlessly; nothing decoded beyond the shards."""
        options = self.options
        stream = self._stream_from(options.start_batch * options.batch_size)
        batch_index = options.start_batch
        while True:
            yield batch_index, [next(stream) for _ in range(options.batch_size)]
            batch_index += 1

    @staticmethod
    def _gather(items: list[tuple[LatentArrays, int]]) -> LatentArrays:
        """Stack the (arrays, row) items in order, with one gather per source (a shard, or the whole cache)."""
        sources: dict[int, tuple[LatentArrays, list[int], list[int]]] = {}
        for position, (arrays, row) in enumerate(items):
            _, positions, rows = sources.setdefault(id(arrays), (arrays, [], []))
            positions.append(position)
            rows.append(row)
        parts = [arrays.take(torch.tensor(rows)) for arrays, _, rows in sources.values()]
        if len(parts) == 1:
            return parts[0]
        order = torch.tensor([position for _, positions, _ in sources.values() for position in positions])
        return LatentArrays.concatenate(parts).take(torch.argsort(order))

    def _make_batch(self, items: list[Any], batch_index: int) -> Any:
        generator = batch_generator(self.options.seed, self.options.rank, batch_index)
        batch = self.build_batch(items, batch_index, generator)
        if self.batch_transform is None:
            return batch
        if self._transform_generator:
            return self.batch_transform(batch, generator)
        return self.batch_transform(batch)

    def build_batch(self, items: list[tuple[LatentArrays, int]], batch_index: int,
                    generator: torch.Generator) -> dict[str, Any]:
        """The batch dict of `items` (see make_latent_loader), flips and posterior draws taken from `generator`."""
        options = self.options
        arrays = self._gather(items)
        count = len(items)
        use_flip = options.random_flip and arrays.flip_mean is not None
        flips = (torch.rand(count, generator=generator) < 0.5) if use_flip else torch.zeros(count, dtype=torch.bool)
        chosen = flips.view(-1, *([1] * (arrays.mean.dim() - 1)))  # (B, 1, 1, 1)
        mean = (torch.where(chosen, arrays.flip_mean, arrays.mean) if use_flip else arrays.mean).float()
        latents = mean  # (B, C, h, w)
        if options.sample_posterior and arrays.std is not None:
            std = (torch.where(chosen, arrays.flip_std, arrays.std) if use_flip else arrays.std).float()
            latents = mean + std * torch.randn(mean.shape, generator=generator)  # (B, C, h, w)
        if options.normalize:
            latents = (latents - self.cache.channel_mean.view(1, -1, 1, 1)) / self.cache.channel_std.view(1, -1, 1, 1)
        batch = {"latents": latents, "labels": arrays.labels, "keys": arrays.keys, "flipped": flips,
                 "batch_index": batch_index}
        if arrays.noise is not None:
            batch["noise"] = arrays.noise.float()  # (B, C, h, w) the couplings' x0, in the model's space as stored
        return batch


def as_built(batch: Any) -> Any:
    """The DataLoader's collate step: batches leave the workers as they were made (the default would walk
    every key string)."""
    return batch


class LatentLoader:
    """An endless iterator of batches (see :func:`make_latent_loader`).

    Attributes:
        next_batch: index of the batch the next ``next()`` returns; save it and pass it as ``start_batch``.
    """

    def __init__(self, dataset: LatentStream, num_workers: int, pin_memory: bool):
        self.dataset, self.next_batch = dataset, dataset.options.start_batch
        self._loader = DataLoader(dataset, batch_size=None, collate_fn=as_built, num_workers=num_workers,
                                  pin_memory=pin_memory,
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
        "flipped": (B,) bool, "batch_index": int}``, plus ``"noise": (B, C, h, w) float32`` (never normalised)
        from a couplings cache (or whatever batch_transform returns).
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
    return LatentLoader(LatentStream(cache, options, memory, batch_transform), num_workers, pin_memory)
