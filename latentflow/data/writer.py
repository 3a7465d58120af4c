"""Write latent shards atomically, with a per-shard index that makes resume exact.

A shard is written as ``.NAME.tmp-rRANK`` and renamed to ``NAME`` once complete. Just before the rename its
index ``index/NAME.json`` (keys, skipped inputs, per-channel sums) is written atomically, so a finished shard
always has its index; an index without its shard is a leftover of a killed run and is ignored. Resuming reads
the indexes: every key in a finished shard (or skipped by one) is done, everything else is encoded again. A write
that fails (a full disk: `DiskFullError`) removes the unfinished shard at once, so the finished ones are all
that stays.

Sample layout (webdataset: key, then extensions): ``KEY.mean.npy`` (C,h,w) float16, ``KEY.std.npy`` when the VAE
is stochastic, ``KEY.flip.mean.npy`` / ``KEY.flip.std.npy`` with flips, ``KEY.noise.npy`` (C,h,w) float32 in a
couplings cache (the noise x0 a teacher integrated to ``mean``), ``KEY.cls`` (ASCII int) when labelled,
``KEY.json`` (source, original size; in a couplings cache the index, seed and NFE).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentflow.errors import LatentflowError
from latentflow.io import write_json_atomic, writing

INDEX_DIR = "index"
_SHARD_RE = re.compile(r"shard-(\d{6})(?:-r(\d+))?\.tar")


def shard_name(index: int, rank: int, world_size: int) -> str:
    """``shard-000000.tar`` for one process, ``shard-000000-r1.tar`` per rank under several."""
    return f"shard-{index:06d}.tar" if world_size == 1 else f"shard-{index:06d}-r{rank}.tar"


def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy file bytes of `array`."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


@dataclass
class ShardIndex:
    """What one finished shard holds (its ``index/NAME.json``)."""

    name: str
    keys: list[str]
    skipped: list[dict[str, Any]]
    bytes: int
    channel_sum: list[float]
    channel_sumsq: list[float]
    channel_var_sum: list[float]
    positions: int
    max_label: int = -1
    info_sums: dict[str, float] = field(default_factory=dict)  # totals of the info fields the writer was told to sum

    @property
    def count(self) -> int:
        return len(self.keys)


def read_indexes(out: Path) -> list[ShardIndex]:
    """Indexes of finished shards in `out` (sorted by name); checks each shard exists with the recorded size."""
    indexes = []
    for path in sorted((out / INDEX_DIR).glob("shard-*.json")):
        shard = out / path.name[: -len(".json")]
        if not shard.exists():
            continue  # the run was killed between writing the index and renaming the shard
        try:
            index = ShardIndex(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as error:
            raise LatentflowError(f"{path}: unreadable shard index ({error}); rerun with --overwrite") from error
        if shard.stat().st_size != index.bytes:
            raise LatentflowError(f"{shard}: {shard.stat().st_size} bytes but its index records {index.bytes}; "
                                  "the shard was modified or truncated: delete it and its index to re-encode it")
        indexes.append(index)
    return indexes


def remove_stale_temporaries(out: Path, rank: int | None) -> None:
    """Delete unfinished shards left by a killed run (only this rank's under several processes)."""
    pattern = ".shard-*.tar.tmp-r*" if rank is None else f".shard-*.tar.tmp-r{rank}"
    for path in out.glob(pattern):
        path.unlink(missing_ok=True)


def next_shard_number(out: Path, rank: int, world_size: int) -> int:
    """The first shard number not used by this rank's naming."""
    used = [-1]
    for path in out.glob("shard-*.tar"):
        match = _SHARD_RE.fullmatch(path.name)
        if match and ((match.group(2) is None) == (world_size == 1)) and \
                (world_size == 1 or int(match.group(2)) == rank):
            used.append(int(match.group(1)))
    return max(used) + 1


@dataclass
class LatentSample:
    """One encoded image: latents (C,h,w) float32 tensors (std/flip ones optional) and metadata; or one coupling:
    the teacher's endpoint as `mean` and its noise x0 (C,h,w) as `noise`."""

    key: str
    mean: torch.Tensor
    std: torch.Tensor | None = None
    flip_mean: torch.Tensor | None = None
    flip_std: torch.Tensor | None = None
    label: int | None = None
    info: dict[str, Any] = field(default_factory=dict)
    noise: torch.Tensor | None = None


class ShardWriter:
    """Append samples to size-limited shards in `out`; finished shards are renamed into place with their index.

    Args:
        out: cache folder.
        shard_size: samples per shard.
        rank, world_size: this process and how many write at once (names differ per rank when > 1).
        info_totals: numeric fields of the samples' `info` whose totals each shard's index records (`info_sums`).
    """

    def __init__(self, out: Path, shard_size: int, rank: int = 0, world_size: int = 1,
                 info_totals: tuple[str, ...] = ()):
        if shard_size < 1:
            raise LatentflowError(f"--shard-size must be >= 1, got {shard_size}")
        self.out, self.shard_size, self.rank, self.world_size = out, shard_size, rank, world_size
        self.info_totals = info_totals
        self.number = next_shard_number(out, rank, world_size)
        self._archive: tarfile.TarFile | None = None
        self._reset()

    def _reset(self) -> None:
        self.keys: list[str] = []
        self.skipped: list[dict[str, Any]] = []
        self._sum = self._sumsq = self._var = None
        self._positions, self._max_label = 0, -1
        self._info_sums: dict[str, float] = {}

    @property
    def _name(self) -> str:
        return shard_name(self.number, self.rank, self.world_size)

    @property
    def _temporary(self) -> Path:
        return self.out / f".{self._name}.tmp-r{self.rank}"

    def _writing(self):
        """Context of a write to the current shard: on failure the unfinished shard is dropped (see `io.writing`)."""
        return writing(self.out, f"shard {self._name}", self._bytes_written, self.discard, partial=True)

    def _bytes_written(self) -> int:
        return self._temporary.stat().st_size if self._temporary.exists() else 0

    def discard(self) -> None:
        """Drop the unfinished shard (its file and what it has collected); finished shards stay."""
        if self._archive is not None:
            try:
                self._archive.close()
            except OSError:
                pass  # its last block could not be written either: the file goes anyway
            self._archive = None
        self._temporary.unlink(missing_ok=True)
        self._reset()

    def _add_member(self, name: str, payload: bytes) -> None:
        with self._writing():
            if self._archive is None:
                self._archive = tarfile.open(self._temporary, "w", format=tarfile.USTAR_FORMAT)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(payload), 0o644, 0
            self._archive.addfile(info, io.BytesIO(payload))

    def add(self, sample: LatentSample) -> None:
        """Append one sample (its latents are stored as float16, its noise as float32)."""
        members = {"mean.npy": sample.mean, "std.npy": sample.std, "flip.mean.npy": sample.flip_mean,
                   "flip.std.npy": sample.flip_std}
        for extension, tensor in members.items():
            if tensor is not None:
                self._add_member(f"{sample.key}.{extension}", npy_bytes(tensor.to(torch.float16).cpu().numpy()))
        if sample.noise is not None:
            self._add_member(f"{sample.key}.noise.npy", npy_bytes(sample.noise.to(torch.float32).cpu().numpy()))
        if sample.label is not None:
            self._add_member(f"{sample.key}.cls", str(int(sample.label)).encode())
            self._max_label = max(self._max_label, int(sample.label))
        self._add_member(f"{sample.key}.json", json.dumps(sample.info, sort_keys=True).encode())
        self._accumulate(sample)
        self.keys.append(sample.key)
        if len(self.keys) >= self.shard_size:
            self.finish_shard()

    def _accumulate(self, sample: LatentSample) -> None:
        mean = sample.mean.to(torch.float16).double()  # statistics of what is stored, (C, h, w)
        variance = sample.std.to(torch.float16).double().square() if sample.std is not None else torch.zeros_like(mean)
        if self._sum is None:
            self._sum = self._sumsq = self._var = torch.zeros(mean.shape[0], dtype=torch.float64)
        self._sum = self._sum + mean.sum(dim=(1, 2))
        self._sumsq = self._sumsq + mean.square().sum(dim=(1, 2))
        self._var = self._var + variance.sum(dim=(1, 2))
        self._positions += mean.shape[1] * mean.shape[2]
        for name in self.info_totals:
            self._info_sums[name] = self._info_sums.get(name, 0) + sample.info[name]

    def skip(self, key: str, origin: str, reason: str) -> None:
        """Record an input that could not be encoded; committed with the current shard."""
        self.skipped.append({"key": key, "source": origin, "reason": reason})

    def finish_shard(self) -> None:
        """Close the current shard (even an empty one that only records skips), index it, rename it into place."""
        if not self.keys and not self.skipped:
            return
        with self._writing():
            self._close_and_index()
        self.number += 1
        self._reset()

    def _close_and_index(self) -> None:
        if self._archive is None:
            self._archive = tarfile.open(self._temporary, "w", format=tarfile.USTAR_FORMAT)
        self._archive.close()
        self._archive = None
        with open(self._temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        zeros = [0.0] * (0 if self._sum is None else len(self._sum))
        index = ShardIndex(
            name=self._name, keys=self.keys, skipped=self.skipped, bytes=self._temporary.stat().st_size,
            channel_sum=zeros if self._sum is None else self._sum.tolist(),
            channel_sumsq=zeros if self._sumsq is None else self._sumsq.tolist(),
            channel_var_sum=zeros if self._var is None else self._var.tolist(),
            positions=self._positions, max_label=self._max_label, info_sums=self._info_sums)
        write_json_atomic(self.out / INDEX_DIR / f"{self._name}.json", index.__dict__, indent=1)
        os.replace(self._temporary, self.out / self._name)
