"""Global batches that any number of processes can share, so that a run resumes on another process count.

The global batch of optimizer step s (G = data.batch_size samples) is drawn from K data streams, K fixed when a
run first starts (`data.streams`, by default that start's process count) and kept in its checkpoints. Stream k
is exactly what ``make_latent_loader(rank=k, world_size=K, batch_size=G/K)`` reads (in each epoch the shards
order_e[k::K] through its own shuffle buffer; flips and posterior draws from (seed, k, s)), and the global batch
of step s is batch s of stream 0, then batch s of stream 1, and so on: rows [k*G/K, (k+1)*G/K) come from stream k.

With M processes and A accumulation steps, rank r trains on rows [r*G/M, (r+1)*G/M), cut into A micro-batches of
b = G/(M*A) rows. It reads only the streams those rows come from: its own when M == K, K/M of them when M < K,
and when M > K one stream it shares with other ranks (each keeps its part; the stream is read M/K times).

So the samples of every step, with their flips and posterior draws, do not depend on M: a checkpoint written by
N processes resumes on M, and every sample of an epoch is still drawn exactly once. The batch_transform (noise
pairing) of a micro-batch draws from a generator seeded by (seed, s, its first row, b): when M*A is the same
after the change (2 processes -> 1 process with twice the accumulation), the micro-batches and every draw in
them are the same too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from latentflow.data.cache import LatentCache, LatentStream, LoaderOptions, as_built, batch_generator, seeded_generator
from latentflow.errors import LatentflowError

_TRANSFORM_TAG = 0x7466  # keeps the transform's seeds apart from the streams' batch generators


@dataclass(frozen=True)
class StepLayout:
    """Which rows of each global batch one process trains on, and the streams they come from.

    Attributes:
        global_batch: G, samples per optimizer step over all processes.
        streams: K, the data streams of the run (G/K rows each).
        rank: r, this process.
        world_size: M, the processes now.
        accumulation: A, micro-batches per optimizer step and process.

    Raises:
        LatentflowError: G is not a multiple of K or of M*A (naming the values and the config fields).
    """

    global_batch: int
    streams: int
    rank: int
    world_size: int
    accumulation: int

    def __post_init__(self) -> None:
        split = self.world_size * self.accumulation
        if self.streams < 1 or self.global_batch % self.streams:
            raise LatentflowError(f"data.batch_size {self.global_batch} must be a multiple of the run's data streams "
                                  f"({self.streams}; data.streams, or the process count of the run's first start)")
        if split < 1 or self.global_batch % split or not 0 <= self.rank < self.world_size:
            raise LatentflowError(f"data.batch_size {self.global_batch} must be a multiple of processes "
                                  f"({self.world_size}) x optim.grad_accumulation ({self.accumulation}) = {split}")

    @property
    def chunk(self) -> int:
        """G/K: the rows each stream gives a global batch."""
        return self.global_batch // self.streams

    @property
    def micro_batch(self) -> int:
        """b = G/(M*A): the rows of one micro-batch."""
        return self.global_batch // (self.world_size * self.accumulation)

    @property
    def rows(self) -> range:
        """This process's rows of the global batch."""
        share = self.global_batch // self.world_size
        return range(self.rank * share, (self.rank + 1) * share)

    @property
    def stream_indices(self) -> range:
        """The streams this process reads (those its rows come from)."""
        return range(self.rows.start // self.chunk, (self.rows.stop - 1) // self.chunk + 1)


@dataclass
class StepBatch:
    """One process's data of one optimizer step.

    Attributes:
        step: s, the index of the global batch (the optimizer step it trains).
        micro_batches: A items, each the batch_transform's output for b rows (without one: the batch dict of
            make_latent_loader, latents (b, C, h, w)).
        keys: the A*b sample keys, micro-batch after micro-batch.
    """

    step: int
    micro_batches: list[Any]
    keys: list[str]

    def pin_memory(self) -> "StepBatch":
        """A copy with page-locked tensors; the DataLoader calls this when made with ``pin_memory=True``."""
        return StepBatch(self.step, [_pin(micro) for micro in self.micro_batches], self.keys)


def _pin(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _pin(item) for key, item in value.items()}
    return value.pin_memory() if hasattr(value, "pin_memory") else value


def _concatenate(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch dicts one after another: tensors (B_i, ...) -> (sum B_i, ...), key lists joined."""
    joined = {}
    for name, first in parts[0].items():
        values = [part[name] for part in parts]
        if isinstance(first, torch.Tensor):
            joined[name] = torch.cat(values)
        elif isinstance(first, list):
            joined[name] = [item for value in values for item in value]
        else:
            joined[name] = first
    return joined


def _rows(batch: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Rows [start, stop) of a batch dict (tensors and lists; other entries as they are)."""
    return {name: value[start:stop] if isinstance(value, (torch.Tensor, list)) else value
            for name, value in batch.items()}


class StepStream(IterableDataset):
    """Yields this process's StepBatch of every step from `start_step` on; see the module docstring.

    Args:
        streams: the LatentStreams of `layout.stream_indices`, in order, each starting at batch `start_step`.
        layout: this process's rows.
        seed: the run's seed.
        start_step: the first step to yield (resume).
        transform: called as ``transform(batch, generator)`` on each micro-batch dict, or None.
    """

    def __init__(self, streams: list[LatentStream], layout: StepLayout, seed: int, start_step: int,
                 transform: Callable[[dict[str, Any], torch.Generator], Any] | None) -> None:
        self.streams, self.layout, self.seed = streams, layout, seed
        self.start_step, self.transform = start_step, transform

    def __iter__(self) -> Iterator[StepBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        sources = [stream.item_batches() for stream in self.streams]
        step = self.start_step
        while True:
            items = [next(source)[1] for source in sources]
            if (step - self.start_step) % workers == worker:
                yield self.make_step(step, items)
            step += 1

    def make_step(self, step: int, items: list[list[Any]]) -> StepBatch:
        """This process's micro-batches of step `step` from each of its streams' stream items."""
        layout = self.layout
        chunks = [stream.build_batch(chunk, step, batch_generator(self.seed, stream.options.rank, step))
                  for stream, chunk in zip(self.streams, items)]
        joined = _concatenate(chunks)  # global rows [first stream * G/K, (last stream + 1) * G/K)
        offset = layout.stream_indices.start * layout.chunk
        micro_batches, keys = [], []
        for first in range(layout.rows.start, layout.rows.stop, layout.micro_batch):
            micro = _rows(joined, first - offset, first - offset + layout.micro_batch)
            keys += micro["keys"]
            if self.transform is not None:
                generator = seeded_generator(self.seed, step, first, layout.micro_batch, _TRANSFORM_TAG)
                micro = self.transform(micro, generator)
            micro_batches.append(micro)
        return StepBatch(step, micro_batches, keys)


def make_step_loader(cache: LatentCache, layout: StepLayout, seed: int = 0, start_step: int = 0,
                     shuffle_buffer: int = 1000, sample_posterior: bool = True, random_flip: bool = True,
                     normalize: bool = False, in_memory: bool = False, num_workers: int = 0,
                     batch_transform: Callable[[dict[str, Any], torch.Generator], Any] | None = None,
                     pin_memory: bool = False) -> Iterator[StepBatch]:
    """An endless iterator of this process's StepBatch for steps `start_step`, `start_step` + 1, ...

    The options are make_latent_loader's (each stream k is that loader with rank k of `layout.streams`); the
    batches are the same for any `num_workers` (worker w makes the steps start_step + w (mod workers)).

    Raises:
        LatentflowError: an empty cache, or fewer shards than streams when streaming.
    """
    if len(cache) == 0:
        raise LatentflowError(f"{cache.path}: the cache holds no samples")
    memory = cache.load() if in_memory else None
    streams = [LatentStream(cache, LoaderOptions(layout.chunk, seed, k, layout.streams, shuffle_buffer,
                                                 sample_posterior, random_flip, normalize, start_step), memory, None)
               for k in layout.stream_indices]
    dataset = StepStream(streams, layout, seed, start_step, batch_transform)
    return iter(DataLoader(dataset, batch_size=None, collate_fn=as_built, num_workers=num_workers,
                           pin_memory=pin_memory, prefetch_factor=4 if num_workers else None))
