"""Classifier-free guidance (Ho & Salimans 2022, Eq. 6), written for any predicted field (velocity or noise), and its
guide-model form: the unconditional branch taken from a weaker model (an early checkpoint of the same run), which
adds autoguidance's correction (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself") to
the class direction at no extra cost per evaluation."""

from __future__ import annotations

import math
import numbers
from typing import Callable, Sequence

import torch

from latentflow.errors import LatentflowError

ConditionalModel = Callable[..., torch.Tensor]
"""model(x (B, ...), t (B,), class_labels (B,) or None, *extra (B,)) -> prediction (B, ...); `extra` are further
per-sample inputs such as a flow map's end time r."""


def check_guidance_scale(scale: float) -> None:
    """Raise LatentflowError unless `scale` is a guidance scale w: a finite number >= 0."""
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale < 0:
        raise LatentflowError(f"guidance_scale must be >= 0 and finite (1 means no guidance), got {scale!r}")


def check_guidance_interval(interval: Sequence[float] | None) -> tuple[float, float] | None:
    """The guidance interval (t_low, t_high) as floats, or None; raises LatentflowError unless 0 <= low < high <= 1."""
    if interval is None:
        return None
    values = tuple(interval)
    if (len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in values)
            or not 0.0 <= values[0] < values[1] <= 1.0):
        raise LatentflowError(f"guidance_interval must be two times 0 <= low < high <= 1 (t=0 noise, t=1 data), "
                              f"got {interval!r}")
    return float(values[0]), float(values[1])


def guided_field(model: ConditionalModel, labels: torch.Tensor | None, null_class: int, scale: float,
                 interval: Sequence[float] | None = None, guide: ConditionalModel | None = None):
    """The field sampled with guidance scale w: f(x, t) = f(x, t, null) + w (f(x, t, c) - f(x, t, null)).

    With a `guide` model, the unconditional branch is the guide's: f = g(x, t, null) + w (f(x, t, c) - g(x, t, null)).
    A weaker guide (fewer steps, or fewer parameters, on the same latents) makes the guided direction point away
    from its errors as well as towards the class; the model and the guide then run as two batches of B.

    w = 1 is the conditional model alone (one evaluation per call); otherwise the conditional and unconditional
    halves go through the model as one batch of 2B. With `interval` = (low, high), guidance applies only where
    low <= t <= high (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval"; in our time, t=0 noise):
    elsewhere the field is the conditional model alone, and a call whose times all lie outside runs the
    conditional half only.

    Args:
        model: the class-conditional model.
        labels: (B,) class ids, or None for an unconditional model (then w must be 1).
        null_class: the class id meaning "no class" (what label dropout trained).
        scale: the guidance scale w >= 0.
        interval: (t_low, t_high) or None, see above.
        guide: model(x, t, class_labels, *extra) for the unconditional branch (called with the null class), or
            None for the model itself. Not used at w = 1.

    Returns:
        field(x (B, ...), t (B,), *extra) -> (B, ...) (a flow map's average velocity is guided the same way,
        with its end time r as `extra`).
    """
    check_guidance_scale(scale)
    interval = check_guidance_interval(interval)
    if scale == 1.0:
        return lambda x, t, *extra: model(x, t, labels, *extra)
    if labels is None:
        raise LatentflowError(f"guidance_scale={scale} needs a class-conditional model; use 1.0")
    null = torch.full_like(labels, null_class)

    def branches(x: torch.Tensor, t: torch.Tensor, extra: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if guide is not None:
            return model(x, t, labels, *extra), guide(x, t, null, *extra)
        doubled = [torch.cat([value, value]) for value in extra]
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]), *doubled)  # (2B, ...)
        return both.chunk(2)

    def guided(x: torch.Tensor, t: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        inside = None if interval is None else (t >= interval[0]) & (t <= interval[1])  # (B,)
        if inside is not None and not bool(inside.any()):
            return model(x, t, labels, *extra)
        conditional, unconditional = branches(x, t, extra)
        guided_output = unconditional + scale * (conditional - unconditional)
        if inside is None or bool(inside.all()):
            return guided_output
        return torch.where(inside.view(-1, *([1] * (x.ndim - 1))), guided_output, conditional)

    return guided
