"""The training log: OUT/log.csv (fixed columns, cut back on resume) and its plot (matplotlib, Agg backend)."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from latentflow.errors import LatentflowError
from latentflow.io import append_text, write_bytes_atomic, write_text_atomic

LOG_FILE = "log.csv"
"""RUN/log.csv: one row of `LOG_COLUMNS` every `log.every` steps."""
LOG_COLUMNS = ("step", "loss", "error", "grad_norm", "lr", "images_per_s", "ot_cost", "skipped_steps",
               "straightness")
"""`error`: the unweighted squared error where the loss weights it (meanflow), else empty."""


class CsvLog:
    """Append-only metrics table at OUT/log.csv with fixed columns; resumes cut rows past the step."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        rows = self.read(path) if (resume_step is not None and path.is_file()) else []
        kept = [row for row in rows if int(row["step"]) <= (resume_step or 0)]
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(kept)
        write_text_atomic(path, buffer.getvalue())

    def append(self, row: dict[str, Any]) -> None:
        """Write one row (missing columns empty) and flush; a row the disk has no room for is not half-written."""
        buffer = io.StringIO(newline="")
        csv.DictWriter(buffer, LOG_COLUMNS).writerow({k: _format(row.get(k)) for k in LOG_COLUMNS})
        append_text(self.path, buffer.getvalue())

    @staticmethod
    def read(path: Path) -> list[dict[str, str]]:
        """The rows of a log.csv as dicts of strings."""
        with open(path, newline="") as stream:
            return list(csv.DictReader(stream))


class KeyRecord:
    """OUT/keys/rank-R.jsonl (`log.record_keys`): the keys of the samples each process trained on, per step.

    A line is {"batch": s, "rank": r, "world_size": M, "keys": [...]}, s the global batch (0-based optimizer
    step). Files of every process count the run had are kept; `cut` drops lines past a resumed step.
    """

    def __init__(self, folder: Path, rank: int, world_size: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path, self.rank, self.world_size = folder / f"rank-{rank}.jsonl", rank, world_size

    def append(self, batch: int, keys: list[str]) -> None:
        """Write one step's line and flush."""
        line = {"batch": batch, "rank": self.rank, "world_size": self.world_size, "keys": list(keys)}
        with open(self.path, "a") as stream:
            stream.write(json.dumps(line) + "\n")

    @staticmethod
    def lines(folder: Path) -> list[dict[str, Any]]:
        """Every line of every rank's file under `folder`."""
        return [json.loads(line) for path in sorted(folder.glob("rank-*.jsonl"))
                for line in path.read_text().splitlines() if line]

    @staticmethod
    def cut(folder: Path, step: int) -> None:
        """Keep only the lines of batches before `step` (a resume from the checkpoint at `step`)."""
        for path in sorted(folder.glob("rank-*.jsonl")):
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["batch"] < step]
            write_text_atomic(path, "".join(line + "\n" for line in kept))

    @staticmethod
    def read(folder: Path) -> dict[int, list[str]]:
        """Batch s -> the keys of its global batch in row order (ranks in order).

        Raises:
            LatentflowError: a batch recorded twice by one rank, or by ranks of different process counts.
        """
        by_batch: dict[int, dict[int, dict[str, Any]]] = {}
        for line in KeyRecord.lines(folder):
            ranks = by_batch.setdefault(line["batch"], {})
            if line["rank"] in ranks or any(other["world_size"] != line["world_size"] for other in ranks.values()):
                raise LatentflowError(f"{folder}: batch {line['batch']} recorded twice (rank {line['rank']})")
            ranks[line["rank"]] = line
        return {batch: [key for rank in sorted(ranks) for key in ranks[rank]["keys"]]
                for batch, ranks in sorted(by_batch.items())}


def _format(value: Any) -> str:
    if value is None:
        return ""
    return repr(float(value)) if isinstance(value, float) else str(value)


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
    log_file = run_dir / LOG_FILE
    if not log_file.is_file():
        raise FileNotFoundError(f"no training log at {log_file}; pass the output_dir of a training run")
    rows = CsvLog.read(log_file)
    if not rows:
        raise LatentflowError(f"{log_file} has no rows yet; train for at least log.every steps")
    columns = [c for c in PLOTTED if any(row.get(c) for row in rows)]
    if "step" not in rows[0] or not columns:
        raise LatentflowError(f"{log_file} is not a training log (no step column or none of {list(PLOTTED)}); pass "
                              "the output_dir of a training run")
    for number, row in enumerate(rows, start=2):  # the header is line 1
        for column in ("step", *columns):
            try:
                float(row.get(column) or 0)
            except ValueError:
                raise LatentflowError(f"{log_file}, line {number}: {column} is {row[column]!r}, not a number") from None
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
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return write_bytes_atomic(out, buffer.getvalue())
