"""Classifier-free guidance (Ho & Salimans 2022, Eq. 6), written for any predicted field (velocity or noise)."""

from __future__ import annotations

import math
import numbers
from typing import Callable

import torch

from latentflow.errors import LatentflowError

ConditionalModel = Callable[..., torch.Tensor]
"""model(x (B, ...), t (B,), class_labels (B,) or None, *extra (B,)) -> prediction (B, ...); `extra` are further
per-sample inputs such as a flow map's end time r."""


def guided_field(model: ConditionalModel, labels: torch.Tensor | None, null_class: int, scale: float):
    """The field sampled with guidance scale w: f(x, t) = f(x, t, null) + w (f(x, t, c) - f(x, t, null)).

    w = 1 is the conditional model alone (one evaluation per call); otherwise the conditional and unconditional
    halves go through the model as one batch of 2B.

    Args:
        model: the class-conditional model.
        labels: (B,) class ids, or None for an unconditional model (then w must be 1).
        null_class: the class id meaning "no class" (what label dropout trained).
        scale: the guidance scale w >= 0.

    Returns:
        field(x (B, ...), t (B,), *extra) -> (B, ...) (a flow map's average velocity is guided the same way,
        with its end time r as `extra`).
    """
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale < 0:
        raise LatentflowError(f"guidance_scale must be >= 0 and finite (1 means no guidance), got {scale!r}")
    if scale == 1.0:
        return lambda x, t, *extra: model(x, t, labels, *extra)
    if labels is None:
        raise LatentflowError(f"guidance_scale={scale} needs a class-conditional model; use 1.0")
    null = torch.full_like(labels, null_class)

    def guided(x: torch.Tensor, t: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        doubled = [torch.cat([value, value]) for value in extra]
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]), *doubled)  # (2B, ...)
        conditional, unconditional = both.chunk(2)
        return unconditional + scale * (conditional - unconditional)

    return guided
