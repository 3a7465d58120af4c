"""An exponential moving average of a model's weights, whole or sharded like an FSDP2 model's parameters."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from latentflow.errors import LatentflowError


@dataclass(frozen=True)
class ShardLayout:
    """How one FSDP2 parameter (a DTensor) is laid out: its mesh, placements, global shape and stride."""

    mesh: Any
    placements: tuple[Any, ...]
    shape: torch.Size
    stride: tuple[int, ...]


class EMA:
    """An exponential moving average of a model's weights, kept in fp32.

    Whole (DDP, one process): `model` is a full fp32 copy, updated in place. Sharded (FSDP2, after `shard`):
    each process keeps the average of only its shard of each parameter (the local part of the parameter's
    DTensor, the same rows FSDP gives it), updated from the local shards without communication;
    `state_dict` and `gather` assemble full tensors with one all-gather per parameter, so they must run on
    every process; the full `model` is kept (and refreshed by `gather`) only where `shard` was told to keep it.

    Args:
        model: the (unwrapped) model being trained, before any sharding.
        decay: the target decay.
        warmup: use min(decay, (1 + n) / (10 + n)) after n updates, so short runs average sensibly.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.model: nn.Module | None = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.shards: list[torch.Tensor] | None = None
        self.layouts: list[ShardLayout] = []
        self.names = [name for name, _ in self.model.named_parameters()]  # the shards' order

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def shard(self, sharded_model: nn.Module, keep_full: bool) -> None:
        """Keep only this process's shards, laid out like `sharded_model`'s DTensor parameters (FSDP2).

        Every process must hold the same full weights now (the model before sharding); no communication.
        `keep_full`: keep the full fp32 model here (the main process: previews, export).
        """
        from torch.distributed.tensor import distribute_tensor

        names = [name for name, _ in sharded_model.named_parameters()]
        if names != self.names:
            raise LatentflowError(f"EMA.shard: the sharded model's parameters {names[:3]}... are not the model's "
                                  f"{self.names[:3]}... in the same order")
        parameters = list(sharded_model.parameters())
        self.layouts = [ShardLayout(p.device_mesh, tuple(p.placements), p.shape, p.stride()) for p in parameters]
        self.shards = [distribute_tensor(shadow.to(p.to_local().device), layout.mesh, layout.placements,
                                         src_data_rank=None).to_local().clone()
                       for shadow, p, layout in zip(self.model.parameters(), parameters, self.layouts)]
        if not keep_full:
            self.model = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights (on the local shards when sharded)."""
        decay = self.current_decay()
        if self.shards is not None:
            shadows, weights = self.shards, [p.to_local().detach().float() for p in model.parameters()]
        else:
            shadows = list(self.model.parameters())
            weights = [weight.detach().to(shadow.dtype) for shadow, weight in zip(shadows, model.parameters())]
        torch._foreach_lerp_(shadows, weights, 1.0 - decay)  # one fused kernel per dtype/device group
        self.updates += 1

    @torch.no_grad()
    def gather(self) -> nn.Module | None:
        """The full EMA model (sharded: all-gathered into it where kept; call on every process), or None."""
        if self.shards is not None:
            full = self._full_tensors()
            if self.model is not None:
                for shadow, tensor in zip(self.model.parameters(), full):
                    shadow.copy_(tensor)
        return self.model

    def _full_tensors(self) -> list[torch.Tensor]:
        from torch.distributed.tensor import DTensor

        return [DTensor.from_local(shard, layout.mesh, layout.placements, shape=layout.shape,
                                   stride=layout.stride).full_tensor()
                for shard, layout in zip(self.shards, self.layouts)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights plus the update count (as a 0-d tensor), ready for safetensors (sharded: on every process)."""
        model = self.gather()
        state = {} if model is None else {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
        state["updates"] = torch.tensor(self.updates, dtype=torch.int64)
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from `state_dict`'s output (full weights; re-sliced into this process's shards when sharded)."""
        weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        if self.model is not None:
            self.model.load_state_dict(weights)
        if self.shards is not None:
            from torch.distributed.tensor import distribute_tensor

            for shard, name, layout in zip(self.shards, self.names, self.layouts):
                local = distribute_tensor(weights[name].float().to(shard.device), layout.mesh, layout.placements,
                                          src_data_rank=None).to_local()
                shard.copy_(local)
        self.updates = int(state["updates"])
