"""The processes of one command under `accelerate launch` (encode, reflow, ot-fit): rank, world size, device,
barriers, and what they share and sum. One process when launched alone."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from latentflow.errors import LatentflowError
from latentflow.io import folder_lock


def local_device(device: torch.device | str | None) -> torch.device:
    """`device` checked by `torch_device`, or for None this machine's GPU when torch sees one, else the CPU: the
    default of every command that runs in one process."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch_device(device)


def torch_device(device: torch.device | str) -> torch.device:
    """`device` as a torch.device this machine can run on. An unknown name, or a GPU this torch cannot see (a CPU
    build asked for cuda, cuda:3 on a machine with two cards), is a one-line error naming the fix, before any model
    is loaded."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise LatentflowError(f"device {str(device)!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise LatentflowError(f"device {str(device)!r}: this torch ({torch.__version__}) sees no CUDA GPU; "
                                  "use --device cpu, or a CUDA build of torch on a machine with a GPU")
        if resolved.index is not None and resolved.index >= count:
            raise LatentflowError(f"device {str(device)!r}: this machine has {count} CUDA GPU(s), "
                                  f"cuda:0 to cuda:{count - 1}")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise LatentflowError(f"device {str(device)!r}: MPS is not available here; use --device cpu")
    return resolved


def share_cpu_threads(device: torch.device, processes: int) -> None:
    """On CPU, give each of N processes 1/N of the cores: oversubscribed OpenMP threads stall each other."""
    if device.type == "cpu" and processes > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))


class Distributed:
    """Rank, world size, device and barriers: accelerate's state when launched with several processes."""

    def __init__(self, device: str | None):
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=not torch.cuda.is_available())  # gloo on CPU-only machines
            if self.state.num_processes != int(os.environ["WORLD_SIZE"]):
                raise LatentflowError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate set up "
                                      f"{self.state.num_processes} process(es); check the accelerate config")
        self.rank = self.state.process_index if self.state else 0
        self.world_size = self.state.num_processes if self.state else 1
        default = self.state.device if self.state else local_device(None)
        self.device = torch_device(device) if device else default
        if self.state is not None and self.device.type == default.type and self.device.index is None:
            self.device = default  # "cuda" under several processes: each its own card

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def share(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank (a broadcast under several processes)."""
        if self.state is None:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over the processes, on every process (on this process's device)."""
        if self.state is None:
            return tensor
        total = tensor.clone()
        torch.distributed.all_reduce(total)
        return total

    def lock(self, out: Path, owner: str, fix: str = "another --out"):
        """Context holding the lock of the output folder `out` on rank 0; every rank stops if it is refused."""
        return folder_lock(out, owner, fix, main=self.rank == 0, share=self.share)
