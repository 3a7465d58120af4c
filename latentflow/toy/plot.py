"""The lab's picture: source, target and the paths between them, one panel per run."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from latentflow.io import write_bytes_atomic


@dataclass
class Panel:
    """One panel: trajectories (S, N, 2) from source to generated points, and reference target points (M, 2)."""

    title: str
    trajectory: torch.Tensor
    target: torch.Tensor


def draw_panel(axis, panel: Panel, max_paths: int = 300) -> None:
    """Draw paths (olive), start points (black), true target (light blue) and generated points (blue)."""
    paths = panel.trajectory[:, :max_paths].numpy()
    axis.scatter(panel.target[:, 0], panel.target[:, 1], s=2, c="lightskyblue", alpha=0.4, label="target samples")
    axis.plot(paths[:, :, 0], paths[:, :, 1], c="olive", alpha=0.25, linewidth=0.6)
    axis.scatter(paths[0, :, 0], paths[0, :, 1], s=3, c="black", label="source x0 (t=0)")
    axis.scatter(paths[-1, :, 0], paths[-1, :, 1], s=3, c="tab:blue", label="generated x1 (t=1)")
    axis.set_title(panel.title, fontsize=10)
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_aspect("equal")


def save_panels(panels: list[Panel], path: Path) -> None:
    """Save panels side by side as a PNG, atomically."""
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.4 * rows), squeeze=False)
    for axis, panel in zip(axes.flat, panels):
        draw_panel(axis, panel)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    axes[0][0].legend(loc="lower left", fontsize=7, markerscale=3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    write_bytes_atomic(path, buffer.getvalue())
