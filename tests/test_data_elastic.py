"""latentflow.data.elastic: global batches that are the same for any process count, and the key record."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_data_cache import NUM_IMAGES, cache_dir  # noqa: F401  (fixture: a real 6-shard cache with flips and stds)

from latentflow.data.cache import LatentCache, make_latent_loader
from latentflow.data.elastic import StepLayout, make_step_loader
from latentflow.errors import LatentflowError
from latentflow.train.logs import KeyRecord

GLOBAL, STREAMS, SEED, STEPS = 8, 2, 3, 7  # 7 steps of 8 cross the 26-sample epoch


def reference(cache: LatentCache) -> list[tuple[list[str], torch.Tensor]]:
    """Global batch s: batch s of make_latent_loader rank 0 of 2, then of rank 1 (keys, latents (8, 4, 4, 4))."""
    loaders = [make_latent_loader(cache, GLOBAL // STREAMS, seed=SEED, rank=k, world_size=STREAMS, shuffle_buffer=8)
               for k in range(STREAMS)]
    batches = [[next(loader) for loader in loaders] for _ in range(STEPS)]
    return [([key for part in parts for key in part["keys"]], torch.cat([part["latents"] for part in parts]))
            for parts in batches]


def global_batches(cache: LatentCache, world_size: int, accumulation: int, start_step: int = 0,
                   num_workers: int = 0) -> list[tuple[list[str], torch.Tensor]]:
    """What all `world_size` processes train on at steps start_step.. STEPS-1, joined in rank order."""
    per_rank = []
    for rank in range(world_size):
        layout = StepLayout(GLOBAL, STREAMS, rank, world_size, accumulation)
        loader = make_step_loader(cache, layout, seed=SEED, start_step=start_step, shuffle_buffer=8,
                                  num_workers=num_workers)
        per_rank.append([next(loader) for _ in range(start_step, STEPS)])
    joined = []
    for steps in zip(*per_rank):
        assert all(len(step.micro_batches) == accumulation for step in steps)
        micros = [micro for step in steps for micro in step.micro_batches]
        assert [key for step in steps for key in step.keys] == [key for micro in micros for key in micro["keys"]]
        joined.append(([key for micro in micros for key in micro["keys"]],
                       torch.cat([micro["latents"] for micro in micros])))
    return joined


@pytest.mark.parametrize(("world_size", "accumulation"), [(1, 1), (1, 2), (2, 1), (2, 2), (4, 1), (8, 1)])
def test_global_batches_do_not_depend_on_the_process_count(cache_dir: Path, world_size: int,  # noqa: F811
                                                           accumulation: int) -> None:
    cache = LatentCache(cache_dir)
    expected = reference(cache)
    found = global_batches(cache, world_size, accumulation)
    for (keys, latents), (want_keys, want_latents) in zip(found, expected, strict=True):
        assert keys == want_keys and torch.equal(latents, want_latents)  # same samples, flips, posterior draws
    resumed = global_batches(cache, world_size, accumulation, start_step=4, num_workers=2)
    for (keys, latents), (want_keys, want_latents) in zip(resumed, expected[4:], strict=True):
        assert keys == want_keys and torch.equal(latents, want_latents)


@pytest.mark.parametrize("world_size", [1, 2])
def test_an_epoch_of_global_batches_draws_every_sample_once(cache_dir: Path, world_size: int) -> None:  # noqa: F811
    cache = LatentCache(cache_dir)  # in memory, stream k of 2 takes every other sample of a permutation: 13 each
    loaders = [make_step_loader(cache, StepLayout(2, 2, rank, world_size, 1), seed=1, in_memory=True)
               for rank in range(world_size)]
    keys = [key for _ in range(NUM_IMAGES // 2) for loader in loaders for key in next(loader).keys]
    assert sorted(keys) == sorted(LatentCache(cache_dir).load().keys) and len(keys) == NUM_IMAGES


def test_micro_batch_draws_follow_rows_not_ranks(cache_dir: Path) -> None:  # noqa: F811
    cache = LatentCache(cache_dir)

    def draws(world_size: int, accumulation: int) -> list[torch.Tensor]:
        found = []
        for rank in range(world_size):
            loader = make_step_loader(cache, StepLayout(GLOBAL, STREAMS, rank, world_size, accumulation), seed=SEED,
                                      batch_transform=lambda batch, generator: torch.rand(3, generator=generator))
            found += next(loader).micro_batches
        return found

    two_processes = draws(2, 1)
    assert all(torch.equal(a, b) for a, b in zip(two_processes, draws(1, 2), strict=True))  # same M x A
    assert not torch.equal(two_processes[0], draws(1, 1)[0])  # other micro-batches, other draws


def test_layout_refuses_batches_that_do_not_split() -> None:
    assert StepLayout(8, 2, 2, 4, 1).stream_indices == range(1, 2)  # ranks 2, 3 share stream 1
    assert StepLayout(8, 4, 0, 1, 2).stream_indices == range(0, 4)
    with pytest.raises(LatentflowError, match=r"data.batch_size 8 must be a multiple of the run's data streams \(3"):
        StepLayout(8, 3, 0, 2, 1)
    with pytest.raises(LatentflowError, match=r"processes \(3\) x optim.grad_accumulation \(1\) = 3"):
        StepLayout(8, 2, 0, 3, 1)


def test_key_record_cuts_on_resume_and_reads_global_batches(tmp_path: Path) -> None:
    two = [KeyRecord(tmp_path, rank, 2) for rank in range(2)]
    for batch in range(3):
        for rank, record in enumerate(two):
            record.append(batch, [f"b{batch}r{rank}"])
    KeyRecord.cut(tmp_path, 2)
    KeyRecord(tmp_path, 0, 1).append(2, ["b2a", "b2b"])
    assert KeyRecord.read(tmp_path) == {0: ["b0r0", "b0r1"], 1: ["b1r0", "b1r1"], 2: ["b2a", "b2b"]}
    KeyRecord(tmp_path, 1, 2).append(2, ["again"])
    with pytest.raises(LatentflowError, match="batch 2 recorded twice"):
        KeyRecord.read(tmp_path)
