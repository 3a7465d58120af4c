"""`latentflow ot-fit` split over processes against one process, in one run: seconds per fit and the fit's speed-up
against its limit (the processes' count, each with the threads one process had), the potentials checked equal.

Each fit is a fresh `ot-fit` of a copy of CACHE (same settings, its own --name), run as
    one process of T threads                      the reference
    one process of T x W threads                  the same cores as the split run, in one process
    W processes of T threads (accelerate launch)  `DrawSplit`: each scores 1/W of every step's draws
The limit of the split run's speed-up over the reference is W (on W cards, or W x T cores).

    python benchmarks/split_fit.py --cache runs/demo/cache --processes 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="runs/demo/cache")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per process")
    parser.add_argument("--fit", default="--class-aware --steps 300 --batch 1024 --balance-draws 100",
                        help="ot-fit options (the demo's by default)")
    return parser.parse_args()


def fit(cache: Path, name: str, options: list[str], threads: int, processes: int) -> float:
    """Seconds of one fit into CACHE/ot/NAME.*, launched as `processes` processes of `threads` threads."""
    command = [sys.executable, "-m", "latentflow.cli", "ot-fit", str(cache), "--name", name, "--no-progress",
               *options]
    if processes > 1:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "-m", *command[2:]]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    from safetensors.torch import load_file

    from latentflow.data.potential import potential_paths

    options = args.fit.split()
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder) / "cache"
        shutil.copytree(args.cache, cache, ignore=shutil.ignore_patterns("ot"))
        runs = [("reference", args.threads, 1), ("one_wide", args.threads * args.processes, 1),
                ("split", args.threads, args.processes)]
        seconds = {name: fit(cache, name, options, threads, processes) for name, threads, processes in runs}
        potentials = {name: load_file(str(potential_paths(cache, name)[0]))["potential"] for name, _, _ in runs}
        records = {name: json.loads(potential_paths(cache, name)[1].read_text()) for name, _, _ in runs}
    print(f"ot-fit {args.fit} of {args.cache} ({records['reference']['points']} points); command: the whole command's "
          "seconds (start-up included); fit: the fit's own (cache read, ascent, balance), and its speed-up")
    print(f"{'run':<44} | {'command s':>9} | {'fit s':>6} | fit speed-up (limit) | potential against the reference")
    labels = {"reference": f"1 process of {args.threads} thread(s)",
              "one_wide": f"1 process of {args.threads * args.processes} threads",
              "split": f"{args.processes} processes of {args.threads} thread(s) (DrawSplit)"}
    for name, _, _ in runs:
        limit = args.processes if name != "reference" else 1
        gap = float((potentials[name] - potentials["reference"]).abs().max())
        speedup = records["reference"]["fit_seconds"] / records[name]["fit_seconds"]
        print(f"{labels[name]:<44} | {seconds[name]:9.1f} | {records[name]['fit_seconds']:6.1f} | "
              f"{speedup:5.2f}x ({limit}x){'':<10} | "
              f"{'the same' if gap == 0 else f'max difference {gap:.3g}'}, excess "
              f"{records[name]['balance']['excess']:.4f}")


if __name__ == "__main__":
    main()
