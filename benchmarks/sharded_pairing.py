"""Dataset OT with the points sharded over processes (`objective.ot_dataset_on: sharded`) against every process
holding them all (`device`), in one run: time per micro-batch and the points' bytes per process.

Each size N builds N points of D dimensions (the demo's latents' scale: standard normal, shifted) and a zero
potential; every process pairs micro-batches of B fresh noise rows, first against all N points on its own, then
with the points split between the processes (its share, the gathered noise of every process, and the merge). The
pairs are checked equal. Run it under accelerate (it launches itself with 2 processes when run plainly):

    python benchmarks/sharded_pairing.py --sizes 2934,20000,80000
    accelerate launch --num_processes 8 benchmarks/sharded_pairing.py --sizes 1281167 --dim 4096 --batch 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2934,20000,80000", help="numbers of points, comma-separated")
    parser.add_argument("--dim", type=int, default=2048, help="dimensions of a point (the demo's latents: 2,048)")
    parser.add_argument("--batch", type=int, default=32, help="noise rows per process and micro-batch")
    parser.add_argument("--repeats", type=int, default=20, help="timed micro-batches per setting (after 3 warmup)")
    parser.add_argument("--processes", type=int, default=2, help="processes to launch when run without accelerate")
    return parser.parse_args()


def timed(work, repeats: int, barrier) -> float:
    """Median seconds of `work()` over `repeats` calls after 3 warmup calls, every process in step."""
    for _ in range(3):
        work()
    seconds = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        work()
        barrier()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def compare(size: int, args: argparse.Namespace, accelerator) -> str:
    """One table row: N = `size` points paired by every process alone and sharded over the processes."""
    from latentflow.data.potential import DatasetCells
    from latentflow.flow.semidiscrete import LaguerreCells
    from latentflow.train.pairing import dataset_pairing, sharded_dataset_pairing

    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    points = torch.randn(size, args.dim, generator=torch.Generator().manual_seed(size)) * 0.8 + 0.1
    potential = torch.zeros(size)
    cells = DatasetCells([LaguerreCells(points, potential, screen=False)], [torch.arange(size)], None,
                         points.view(size, 1, args.dim), None, potential, {}, screen=True)
    whole = cells.to(device, screen=True)  # every point on this process, screened where it pays
    shard = cells.shard(rank, world, device, screen=True)
    x0 = torch.randn(args.batch, 1, args.dim, generator=torch.Generator().manual_seed(1000 + rank)).to(device)

    def alone() -> torch.Tensor:
        return dataset_pairing(whole, x0, None).x1_index

    def sharded() -> torch.Tensor:
        return sharded_dataset_pairing(shard, x0, None, accelerator.gather,
                                       lambda tensor: accelerator.reduce(tensor, "sum"), rank).x1_index

    alone_s = timed(alone, args.repeats, accelerator.wait_for_everyone)
    sharded_s = timed(sharded, args.repeats, accelerator.wait_for_everyone)
    same = accelerator.reduce(torch.tensor(float(torch.equal(alone(), sharded())), device=device), "sum")
    held_all = whole.points.numel() * 4 / 2**20
    held_share = sum(c.points.numel() * 4 for c in shard.cells if c is not None) / 2**20
    return (f"{size:>7} | {held_all:8.1f} MiB, {held_share:8.1f} MiB | {alone_s * 1e3:7.2f}, {sharded_s * 1e3:7.2f} | "
            f"{alone_s / sharded_s:5.2f}x | {'equal' if float(same) == world else 'DIFFER'}")


def main() -> None:
    args = parse_args()
    if "LOCAL_RANK" not in os.environ:  # run plainly: launch this script on several processes
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(args.processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   *(["--multi_gpu"] if args.processes > 1 else []), __file__, *sys.argv[1:]]
        raise SystemExit(subprocess.call(command))
    from accelerate import Accelerator

    from latentflow.processes import share_cpu_threads

    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # a CPU job joins its processes only so
    share_cpu_threads(accelerator.device, accelerator.num_processes)
    accelerator.print(f"{accelerator.num_processes} processes on {accelerator.device} ({torch.get_num_threads()} "
                      f"threads each), micro-batch {args.batch} rows per process, D = {args.dim}")
    accelerator.print("points | float32 points per process: all, share | ms per micro-batch: all, sharded | "
                      "all / sharded | pairs")
    for size in [int(text) for text in args.sizes.split(",")]:
        accelerator.print(compare(size, args, accelerator))


if __name__ == "__main__":
    main()
