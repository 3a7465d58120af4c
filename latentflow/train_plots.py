"""Training curves from OUT/log.csv to a PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path

from latentflow.errors import LatentflowError
from latentflow.train_utils import LOG_COLUMNS, CsvLog

PLOTTED = tuple(column for column in LOG_COLUMNS if column != "step")


def plot_log(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw every logged metric against the step, one panel each; returns the PNG path.

    Raises:
        FileNotFoundError: no log.csv in `run_dir`.
        LatentflowError: the log has no rows yet.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    log_file = run_dir / "log.csv"
    if not log_file.is_file():
        raise FileNotFoundError(f"no training log at {log_file}; pass the output_dir of a training run")
    rows = CsvLog.read(log_file)
    if not rows:
        raise LatentflowError(f"{log_file} has no rows yet; train for at least log.every steps")
    columns = [c for c in PLOTTED if any(row.get(c) for row in rows)]
    grid_columns = min(3, len(columns))
    figure, axes = plt.subplots(math.ceil(len(columns) / grid_columns), grid_columns,
                                figsize=(4.5 * grid_columns, 3.2 * math.ceil(len(columns) / grid_columns)),
                                squeeze=False)
    for axis, column in zip(axes.flat, columns):
        points = [(int(row["step"]), float(row[column])) for row in rows if row.get(column)]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        axis.set_title(column)
        axis.set_xlabel("step")
        if column in ("loss", "grad_norm") and all(p[1] > 0 for p in points):
            axis.set_yscale("log")
    for axis in list(axes.flat)[len(columns):]:
        axis.set_visible(False)
    figure.suptitle(str(run_dir))
    figure.tight_layout()
    out = Path(out) if out else run_dir / "log.png"
    temporary = out.with_name(f".{out.name}.tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    temporary.replace(out)
    return out
