"""The optimizer and its learning-rate schedule."""

from __future__ import annotations

import math

import torch

from latentflow.train.config import OptimConfig


def cpu_fused_optimizer(optimizer_class: type[torch.optim.Optimizer], parameters, **settings) -> torch.optim.Optimizer:
    """`optimizer_class` (Adam, AdamW) for CPU parameters with torch's fused kernel (torch >= 2.4), else
    torch's default, which loops over the tensors one by one (the README gives the measured difference)."""
    parameters = list(parameters)
    try:
        return optimizer_class(parameters, fused=True, **settings)
    except RuntimeError:  # an older torch without the CPU kernel
        return optimizer_class(parameters, **settings)


def learning_rate(step: int, optim: OptimConfig, max_steps: int) -> float:
    """The learning rate for optimizer step `step` (0-based): linear warmup, then constant or cosine."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    progress = (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return optim.lr * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * cosine)


def make_adamw(model: torch.nn.Module, optim: OptimConfig, fused_on_cpu: bool) -> torch.optim.AdamW:
    """AdamW with `optim`'s settings; fused on CPU (see `cpu_fused_optimizer`). CUDA keeps torch's default
    (foreach), which the GPU figures were measured with."""
    settings = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if fused_on_cpu:
        return cpu_fused_optimizer(torch.optim.AdamW, model.parameters(), **settings)
    return torch.optim.AdamW(model.parameters(), **settings)
