"""Host memory of reading a cache's latents as OT points, in one run: the peak resident memory of a fresh process
that reads them each way, against the points' own float32 bytes (the floor for holding them all).

The cache is CACHE with its shards listed TILE times over (links, no copies: TILE x its latents, labels kept) and a
zero class-aware potential written for it (the pairing is not timed here, only what is held). Ways:
    whole_first     the cache decoded whole, then float32 (what `load_points` did before session 25)
    load_points     `load_points` now: shard by shard into one float32 tensor, class by class (the fit, `device`)
    dataset_cells   `load_dataset_cells` (training with `ot_dataset_on: loader` or `device`)
    cut_shard       `load_dataset_cells(...).shard(0, WORLD)`: every point read, then this process's part kept
                    (`ot_dataset_on: sharded` before session 25)
    cell_shard      `load_cell_shard(..., 0, WORLD)`: only this process's part read (`sharded` now)

    python benchmarks/points_memory.py --cache runs/demo/cache --tile 68 --world 8 [--old-tree WORKTREE]

--old-tree: a checkout of other code (e.g. `git worktree add /tmp/old <commit>`) measured too, the same ways
where it has them, marked "(old)".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WAYS = ("whole_first", "load_points", "dataset_cells", "cut_shard", "cell_shard")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="runs/demo/cache", help="a latent cache (labelled)")
    parser.add_argument("--tile", type=int, default=68, help="times its shards are listed (68: 200k latents)")
    parser.add_argument("--world", type=int, default=8, help="processes the points are sharded over")
    parser.add_argument("--old-tree", help="another checkout whose library is measured too (PYTHONPATH)")
    parser.add_argument("--measure", choices=WAYS, help=argparse.SUPPRESS)  # one way, in a fresh process
    return parser.parse_args()


def tiled_cache(source: Path, tile: int, out: Path) -> Path:
    """`source`'s shards listed `tile` times (symlinks) in `out`, with a zero class-aware potential `bench`."""
    import torch
    from safetensors.torch import save_file

    from latentflow.data.cache import LatentCache, cache_fingerprint
    from latentflow.data.potential import potential_paths
    from latentflow.io import write_json_atomic

    manifest = json.loads((source / "manifest.json").read_text())
    shards = []
    for _ in range(tile):
        for entry in manifest["shards"]:
            name = f"shard-{len(shards):06d}.tar"
            (out / name).symlink_to((source / entry["name"]).resolve())
            shards.append({**entry, "name": name})
    manifest.update(shards=shards, num_samples=sum(entry["count"] for entry in shards))
    write_json_atomic(out / "manifest.json", manifest)
    cache = LatentCache(out)
    potential_path, json_path, _ = potential_paths(out, "bench")
    potential_path.parent.mkdir()
    save_file({"potential": torch.zeros(len(cache))}, str(potential_path))
    write_json_atomic(json_path, {"cache_fingerprint": cache_fingerprint(cache), "finished": True,
                                  "points": len(cache), "normalized": True, "flips": False, "class_aware": True,
                                  "settings": {"epsilon": 0.0}, "balance": {"excess": 0.0}})
    return out


def measure(way: str, cache_path: str, world: int) -> None:
    """Read the points one way; print the peak resident MiB above the baseline after imports, and the seconds."""
    import torch

    from latentflow.data import potential
    from latentflow.data.cache import LatentCache

    cache = LatentCache(cache_path)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if way == "whole_first":
        held = cache.load().mean.float()
    elif way == "load_points":
        held = potential.load_points(cache, normalized=True, flips=False, class_aware=True).points
    elif way == "dataset_cells":
        held = potential.load_dataset_cells(cache, "bench", True, False, screen=False).points
    elif way == "cut_shard":
        cells = potential.load_dataset_cells(cache, "bench", True, False, screen=False)
        shard = cells.shard(0, world, "cpu", screen=False)
        del cells  # what the trainer keeps
        held = torch.cat([cells.points for cells in shard.cells])
    else:
        shard = potential.load_cell_shard(cache, "bench", True, False, 0, world, "cpu", screen=False)
        held = torch.cat([cells.points for cells in shard.cells])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_mib": (peak - baseline) / 1024, "held_mib": held.numel() * 4 / 2**20,
                      "seconds": seconds}))


def main() -> None:
    args = parse_args()
    if args.measure:
        measure(args.measure, args.cache, args.world)
        return
    with tempfile.TemporaryDirectory() as folder:
        cache = tiled_cache(Path(args.cache), args.tile, Path(folder))
        from latentflow.data.cache import LatentCache

        count, shape = len(LatentCache(cache)), LatentCache(cache).latent_shape
        points_mib = count * math.prod(shape) * 4 / 2**20
        print(f"{count} latents of {shape} ({points_mib:.0f} MiB as float32), {args.world} processes for the shards; "
              "peak resident MiB of a fresh process above its baseline after imports")
        print(f"{'way':<19} | {'peak MiB':>9} | {'held MiB':>9} | {'peak / float32 points':>21} | {'seconds':>7}")
        trees = [("", None)] + ([(" (old)", args.old_tree)] if args.old_tree else [])
        for way in WAYS:
            for mark, tree in trees:
                if tree and way in ("whole_first", "cell_shard"):  # the same code, or none there
                    continue
                env = {**os.environ, **({"PYTHONPATH": tree} if tree else {})}
                done = subprocess.run([sys.executable, __file__, "--measure", way, "--cache", str(cache), "--world",
                                       str(args.world)], capture_output=True, text=True, check=True, env=env)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{way + mark:<19} | {result['peak_mib']:9.0f} | {result['held_mib']:9.0f} | "
                      f"{result['peak_mib'] / points_mib:21.2f} | {result['seconds']:7.1f}")


if __name__ == "__main__":
    main()
