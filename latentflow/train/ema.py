"""An exponential moving average of a model's weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """An exponential moving average of a model's weights, kept as a full fp32 model copy.

    Args:
        model: the (unwrapped) model being trained.
        decay: the target decay.
        warmup: use min(decay, (1 + n) / (10 + n)) after n updates, so short runs average sensibly.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.decay, self.warmup, self.updates = decay, warmup, 0

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights."""
        decay = self.current_decay()
        shadows = list(self.model.parameters())
        weights = [weight.detach().to(shadow.dtype) for shadow, weight in zip(shadows, model.parameters())]
        torch._foreach_lerp_(shadows, weights, 1.0 - decay)  # one fused kernel per dtype/device group
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights plus the update count (as a 0-d tensor), ready for safetensors."""
        state = {f"model.{k}": v.contiguous() for k, v in self.model.state_dict().items()}
        state["updates"] = torch.tensor(self.updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from `state_dict`'s output."""
        self.model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
        self.updates = int(state["updates"])
