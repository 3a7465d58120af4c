"""Sweeps: generate sample sets with a pipeline under several sampler settings and measure each against a
reference (FID, KID, FD-DINOv2), written as JSON, CSV and a plot of FID against NFE."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from latentflow.errors import LatentflowError, require_count
from latentflow.eval.features import FeatureExtractor
from latentflow.eval.floors import Floors, floor_files
from latentflow.eval.references import FeatureAccumulator, load_statistics
from latentflow.eval.statistics import FeatureStatistics, SampleMetrics, compare_statistics
from latentflow.flow.guidance import check_guidance_interval
from latentflow.flow.schedules import check_time_shift
from latentflow.flow.solvers import SHIFTABLE_SOLVERS, STEPPED_SOLVERS
from latentflow.io import PIPELINE_MARKER, check_folder_target, json_sha256, read_json, write_bytes_atomic

EVALUATION_FILE = "evaluation.json"
"""OUT/evaluation.json: every setting's FID, KID, NFE and time, the floors, and what decides them."""


@dataclass(frozen=True)
class SamplerSetting:
    """One sampler configuration of a sweep: a solver with a step count (fixed-step solvers, DDIM) or a
    tolerance (adaptive solvers, used as both atol and rtol; None keeps the pipeline's default), and for fixed-step
    ODE solvers the time shift of their grid (None keeps the pipeline's default)."""

    solver: str
    steps: int | None = None
    tolerance: float | None = None
    time_shift: float | None = None

    @property
    def label(self) -> str:
        """Short name, e.g. "euler-4", "euler-4-shift2", "dopri5", "dopri5-tol1e-03"."""
        shift = "" if self.time_shift in (None, 1) else f"-shift{self.time_shift:g}"
        if self.steps is not None:
            return f"{self.solver}-{self.steps}{shift}"
        return self.solver if self.tolerance is None else f"{self.solver}-tol{self.tolerance:.0e}"


def curve_name(row: dict) -> str:
    """The solver of a result row and its time shift, e.g. "euler", "euler shift 2": one line of a plot (rows
    written before time shifts existed have none)."""
    shift = row.get("time_shift")
    return row["solver"] if shift in (None, 1) else f"{row['solver']} shift {shift:g}"


def parse_sweep(items: Sequence[str], time_shifts: Sequence[float] | None = None) -> list[SamplerSetting]:
    """Parse sweep items: "euler:1,2,4,8" (steps), "dopri5" or "dopri5:1e-3,1e-5" (tolerances); with
    `time_shifts`, every fixed-step setting (ODE solvers, flow-map jumps) once per shift (the others keep their own
    times). A one-step grid is [0, 1] under any shift, so one-step settings appear once, evenly spaced."""
    settings = _parse_items(items)
    if not time_shifts:
        return settings
    for shift in time_shifts:
        check_time_shift(shift)
    return [replace(setting, time_shift=float(shift)) if setting.solver in SHIFTABLE_SOLVERS else setting
            for setting in settings
            for shift in _shifts_of(setting, time_shifts)]


def _shifts_of(setting: SamplerSetting, time_shifts: Sequence[float]) -> Sequence[float | None]:
    if setting.solver not in SHIFTABLE_SOLVERS:
        return [None]
    return [1.0] if setting.steps == 1 else time_shifts


def _parse_items(items: Sequence[str]) -> list[SamplerSetting]:
    settings: list[SamplerSetting] = []
    for item in items:
        solver, _, values = item.partition(":")
        numbers = [value for value in values.split(",") if value] if values else []
        if solver in STEPPED_SOLVERS:
            if not numbers:
                raise LatentflowError(f"sweep item {item!r}: {solver} needs step counts, e.g. {solver}:1,2,4,8")
            try:
                steps = [int(number) for number in numbers]
            except ValueError as error:
                raise LatentflowError(f"sweep item {item!r}: step counts must be integers") from error
            if min(steps) < 1:
                raise LatentflowError(f"sweep item {item!r}: step counts must be >= 1")
            settings.extend(SamplerSetting(solver, steps=count) for count in steps)
        elif numbers:
            try:
                tolerances = [float(number) for number in numbers]
            except ValueError as error:
                raise LatentflowError(f"sweep item {item!r}: tolerances must be numbers like 1e-3") from error
            if not all(0 < tolerance < float("inf") for tolerance in tolerances):
                raise LatentflowError(f"sweep item {item!r}: tolerances must be finite numbers > 0, like 1e-3")
            if max(tolerances) >= 1:  # "dopri5:8" meant as 8 steps was a tolerance of 8
                raise LatentflowError(f"sweep item {item!r}: {solver} picks its own steps, and its values are "
                                      f"tolerances below 1, like {solver}:1e-3,1e-5; for a step count pick a "
                                      f"fixed-step solver, e.g. euler:{numbers[0]}")
            settings.extend(SamplerSetting(solver, tolerance=tolerance) for tolerance in tolerances)
        else:
            settings.append(SamplerSetting(solver))
    if not settings:
        raise LatentflowError("empty sweep; give items like euler:1,2,4,8 midpoint:4 dopri5")
    return settings


@dataclass
class GeneratedBatch:
    """One batch of generated images (float (B, 3, H, W) in [0, 1]) with its NFE and class labels."""

    images: torch.Tensor
    nfe: int
    class_labels: torch.Tensor | None


def sample_labels(pipe, n: int, seed: int, class_label: int | str | None = None) -> list[int] | None:
    """Class ids for `n` images: all `class_label`, or balanced over the classes in an order seeded by `seed`
    (None for an unconditional model)."""
    scheduler = pipe.scheduler
    if scheduler.config.num_classes == 0:
        if class_label is not None:
            raise LatentflowError("a class was given, but this pipeline's model is unconditional")
        return None
    if class_label is not None:
        return [scheduler.class_id(class_label)] * n
    classes = scheduler.config.num_classes
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return (order % classes).tolist()  # balanced: every class n // C or n // C + 1 times, in a seeded order


def generate_batches(
    pipe,
    n: int,
    setting: SamplerSetting,
    batch_size: int = 50,
    seed: int = 0,
    class_label: int | str | None = None,
    guidance_scale: float = 1.0,
    eta: float | None = None,
    guidance_interval: tuple[float, float] | None = None,
) -> Iterator[GeneratedBatch]:
    """Generate `n` images in batches. Image i's noise comes from its own generator seeded `seed + i`, so a
    sample set is the same whatever the batch size, and every setting of a sweep starts from the same noise."""
    require_count("batch size", batch_size, 1, " (images per pipeline call)")
    labels = sample_labels(pipe, n, seed, class_label)
    device = pipe._execution_device
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        generators = [torch.Generator(device).manual_seed(seed + index) for index in range(start, stop)]
        output = pipe(
            batch_size=stop - start,
            num_inference_steps=setting.steps,
            solver=setting.solver,
            atol=setting.tolerance,
            rtol=setting.tolerance,
            class_labels=None if labels is None else labels[start:stop],
            guidance_scale=guidance_scale,
            guidance_interval=guidance_interval,
            eta=eta,
            time_shift=setting.time_shift,
            generator=generators,
            output_type="pt",
        )
        yield GeneratedBatch(output.images, output.nfe, output.class_labels)


# ----------------------------------------------------------------------------------------------------------------
# Sweeps: metrics against NFE
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """Metrics of one sampler setting. `nfe` is the mean over batches (exact and constant for fixed-step
    solvers; adaptive solvers may differ per batch, listed in `nfe_per_batch`)."""

    setting: SamplerSetting
    nfe: float
    nfe_per_batch: list[int]
    metrics: SampleMetrics
    seconds: float

    def row(self) -> dict[str, Any]:
        """Flat dict for CSV/JSON."""
        return {
            "setting": self.setting.label,
            "solver": self.setting.solver,
            "steps": self.setting.steps,
            "tolerance": self.setting.tolerance,
            "time_shift": self.setting.time_shift,
            "nfe": self.nfe,
            "fid": self.metrics.fid,
            "kid": self.metrics.kid,
            "kid_std": self.metrics.kid_std,
            "fd_dinov2": self.metrics.fd_dinov2,
            "num_samples": self.metrics.num_samples,
            "seconds": self.seconds,
        }

    def record(self) -> dict[str, Any]:
        """`row()` with the NFE of every batch: one entry of evaluation.json's results."""
        return {**self.row(), "nfe_per_batch": self.nfe_per_batch}


def evaluate_setting(
    pipe,
    setting: SamplerSetting,
    reference: dict[str, FeatureStatistics],
    extractors: Sequence[FeatureExtractor],
    n: int,
    batch_size: int = 50,
    seed: int = 0,
    guidance_scale: float = 1.0,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    guidance_interval: tuple[float, float] | None = None,
) -> SweepResult:
    """Generate `n` images with one setting and measure them against the reference."""
    import time

    began = time.perf_counter()
    accumulator = FeatureAccumulator(extractors)
    nfes: list[int] = []
    for batch in generate_batches(pipe, n, setting, batch_size, seed, guidance_scale=guidance_scale,
                                  guidance_interval=guidance_interval):
        accumulator.update(batch.images)
        nfes.append(batch.nfe)
    metrics = compare_statistics(accumulator.statistics(), reference, kid_subsets, kid_subset_size, seed)
    return SweepResult(setting, float(np.mean(nfes)), nfes, metrics, time.perf_counter() - began)


def write_sweep_results(results: Sequence[dict[str, Any]], out_dir: str | os.PathLike, info: dict[str, Any],
                        floors: Floors | None = None) -> dict:
    """Write evaluation.json, evaluation.csv and fid_vs_nfe.png to `out_dir` (the floors beside the results when
    given); `results` are `SweepResult.record()`s; returns the paths."""
    import csv
    import io
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{key: value for key, value in record.items() if key != "nfe_per_batch"} for record in results]
    floor_rows = floors.rows() if floors is not None else []
    document = {**info, "results": list(results), "floors": floor_rows}
    paths = {"json": out / EVALUATION_FILE, "csv": out / "evaluation.csv", "png": out / "fid_vs_nfe.png"}
    write_bytes_atomic(paths["json"], json.dumps(document, indent=2).encode() + b"\n")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), restval="")
    writer.writeheader()
    writer.writerows([*rows, *floor_rows])
    write_bytes_atomic(paths["csv"], buffer.getvalue().encode())
    write_bytes_atomic(paths["png"], plot_evaluations([(None, document)], title=str(info.get("pipeline", ""))))
    return paths


def check_evaluation(document: Any, where: str) -> None:
    """Refuse what is no evaluation.json of `latentflow evaluate`: `results` and `floors` lists of rows with a
    setting and a finite FID (results also their solver), naming `where` and the first row that is not."""
    if not isinstance(document, dict) or not isinstance(document.get("results"), list):
        raise LatentflowError(f"{where}: not an evaluation of `latentflow evaluate` (no list of results)")
    for part, needed in (("results", ("setting", "solver", "fid")), ("floors", ("setting", "fid"))):
        rows = document.get(part, [])
        for number, row in enumerate(rows if isinstance(rows, list) else [rows]):
            if not isinstance(row, dict) or any(key not in row for key in needed) \
                    or not isinstance(row["fid"], (int, float)):
                raise LatentflowError(f"{where}: {part}[{number}] is not a row with {', '.join(needed)} (a number)")


def plot_evaluations(evaluations: Sequence[tuple[str | None, dict[str, Any]]], title: str = "") -> bytes:
    """PNG bytes of FID against NFE: one line per run and solver, ticks at the NFEs used, each run's floors as
    horizontal lines (floors several runs share, same name and value, are drawn once), the legend outside the axes.

    Args:
        evaluations: (label or None, the contents of an evaluation.json) per run.
        title: the figure's title.
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    figure, axes = plt.subplots(figsize=(8.4, 4.2), dpi=120)
    ticks: set[float] = set()
    drawn_floors: set[tuple[str, float]] = set()
    for label, document in evaluations:
        rows = [row for row in document.get("results", []) if row.get("nfe") is not None]
        for solver in dict.fromkeys(curve_name(row) for row in rows):
            points = sorted((row["nfe"], row["fid"]) for row in rows if curve_name(row) == solver)
            ticks.update(point[0] for point in points)
            name = solver if label is None else f"{label}: {solver}"
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        for row, style in zip(document.get("floors", []), ("--", ":")):
            if (row["setting"], round(row["fid"], 6)) in drawn_floors:
                continue
            drawn_floors.add((row["setting"], round(row["fid"], 6)))
            shared = len(evaluations) > 1 and all(
                any(other["setting"] == row["setting"] and round(other["fid"], 6) == round(row["fid"], 6)
                    for other in doc.get("floors", [])) for _, doc in evaluations)
            name = row["setting"] if label is None or shared else f"{label}: {row['setting']}"
            axes.axhline(row["fid"], linestyle=style, color="grey", linewidth=1, label=f"{name} ({row['fid']:.1f})")
    axes.set_xscale("log")
    if ticks:
        axes.set_xticks(sorted(ticks), [f"{tick:g}" for tick in sorted(ticks)])
        axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("NFE (velocity evaluations per sample)")
    axes.set_ylabel("FID")
    axes.set_title(title, fontsize=9)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# A whole evaluation
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class EvaluationSettings:
    """What `latentflow evaluate` (and the demo) measures: `n` images per sampler setting of `sweep` against the
    reference (an image folder, resized to `reference_resolution` or the samples' size, or a .npz of fid-stats)."""

    reference: Path
    n: int = 2000
    sweep: list[str] = field(default_factory=lambda: ["euler:1,2,4,8", "midpoint:4", "dopri5"])
    batch_size: int = 50
    seed: int = 0
    guidance_scale: float = 1.0
    guidance_interval: tuple[float, float] | None = None
    device: str = "cpu"
    dinov2: Path | None = None
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    reference_resolution: int | None = None
    floors: Path | None = None
    time_shifts: list[float] | None = None

    def check(self) -> list[SamplerSetting]:
        """Refuse settings that cannot work before any work; returns the parsed sweep."""
        if self.n < 2:
            raise LatentflowError(f"--n must be at least 2, got {self.n}")
        if not Path(self.reference).exists():
            raise LatentflowError(f"reference not found: {self.reference}; give an image folder or an .npz from "
                                  "`latentflow fid-stats`")
        if not Path(self.reference).is_dir():
            load_statistics(self.reference)  # a file that is no statistics .npz: refused before any sampling
        if self.floors is not None and not Path(self.floors).is_dir():
            raise LatentflowError(f"--floors {self.floors}: no such image folder; give the training images' folder, "
                                  "or leave --floors out")
        if self.floors is not None:
            floor_files(self.floors, self.n)  # enough training images for n: refused before the sweep, not after
        require_count("--kid-subsets", self.kid_subsets, 1)
        require_count("--kid-subset-size", self.kid_subset_size, 2)
        if self.reference_resolution is not None:
            require_count("--ref-resolution", self.reference_resolution, 1)
            if Path(self.reference).is_file():
                raise LatentflowError(f"--ref-resolution resizes the images of a folder --ref; {self.reference} "
                                      f"holds statistics computed already (fid-stats --resolution): leave it out")
        check_guidance_interval(self.guidance_interval)
        return parse_sweep(self.sweep, self.time_shifts)


def evaluate_pipeline(pipe, pipe_dir: str | os.PathLike, settings: EvaluationSettings,
                      out_dir: str | os.PathLike) -> dict[str, Path]:
    """Measure a loaded pipeline over the sweep and write evaluation.json/.csv and fid_vs_nfe.png to `out_dir`.

    Each setting's result is kept in `out_dir/settings/` as soon as it is measured, under a key of everything that
    decides it (`evaluation_context`): a rerun after an interruption, or with more settings, measures only what is
    not there yet."""
    from tqdm.auto import tqdm

    from latentflow.eval.features import make_extractors
    from latentflow.eval.references import reference_statistics, statistics_source
    from latentflow.train.checkpoint import check_holds_no_work

    check_folder_target(out_dir, what="folder for the evaluation")  # a file there was found after the first setting
    check_holds_no_work(out_dir, "the evaluation")
    default_shift = float(pipe.scheduler.config.time_shift)
    sweep = [replace(setting, time_shift=default_shift) if setting.time_shift is None
             and setting.solver in SHIFTABLE_SOLVERS else setting for setting in settings.check()]
    for setting in sweep:  # refuse e.g. euler for a ddpm model before any work
        pipe.check_solver(setting.solver)
    extractors = make_extractors(settings.device, settings.dinov2)
    image_size = pipe.image_size()[0]
    reference = Path(settings.reference)
    resolution = (settings.reference_resolution or image_size) if reference.is_dir() else None
    if resolution is None:
        _check_reference_resolution(reference, image_size)
    statistics = functools.cache(lambda: reference_statistics(  # computed only when something is measured
        reference, extractors, settings.batch_size, lambda it: tqdm(it, desc="reference"), resolution))
    context = evaluation_context(pipe, pipe_dir, settings, extractors, resolution)
    store = SettingStore(Path(out_dir) / "settings", context)
    results = []
    for setting in tqdm(sweep, desc="settings"):
        record = store.load(setting)
        if record is None:
            record = evaluate_setting(pipe, setting, statistics(), extractors, settings.n, settings.batch_size,
                                      settings.seed, settings.guidance_scale, settings.kid_subsets,
                                      settings.kid_subset_size, settings.guidance_interval).record()
            store.save(setting, record)
        else:
            tqdm.write(f"{setting.label}: measured before, {store.path(setting)}")
        results.append(record)
        tqdm.write(format_row(record))
    floors = None
    if settings.floors is not None:
        floors = evaluation_floors(pipe, settings, statistics, extractors, image_size,
                                   reference.parent if reference.is_file() else Path(out_dir))
        for row in floors.rows():
            tqdm.write(format_row({**row, "nfe": None}))
    info = {"pipeline": str(pipe_dir), "reference": str(reference), "n": settings.n, "seed": settings.seed,
            "image_size": image_size, "reference_resolution": resolution,
            "guidance_scale": settings.guidance_scale, "sweep": list(settings.sweep),
            "guide": context["guided"]}
    source = statistics_source(reference) if reference.is_file() else None
    if source:
        info["reference_source"] = source
    if settings.guidance_interval is not None:
        info["guidance_interval"] = list(settings.guidance_interval)
    return write_sweep_results(results, out_dir, info, floors)


def evaluation_context(pipe, pipe_dir: str | os.PathLike, settings: EvaluationSettings,
                       extractors: Sequence[FeatureExtractor], reference_resolution: int | None) -> dict[str, Any]:
    """Everything a setting's result depends on besides the setting: the pipeline's files (sha256; the guide's
    only when guidance uses it), the reference (an .npz by sha256, a folder by its images' names, sizes and
    modification times, and the size it is brought to), the sample count, seed, guidance, KID's subsets, the
    feature extractors and latentflow's version."""
    import latentflow
    from latentflow.eval.references import folder_identity
    from latentflow.vae import sha256_file

    folder = Path(pipe_dir)
    guided = getattr(pipe, "guide", None) is not None and settings.guidance_scale != 1.0
    components = [name for name in read_json(folder / PIPELINE_MARKER, "pipeline index")
                  if not name.startswith("_") and (guided or name != "guide")]
    parts = [path for name in sorted(components) if (folder / name).is_dir()
             for path in sorted((folder / name).iterdir()) if path.is_file()]
    reference = Path(settings.reference)
    if reference.is_dir():
        reference_id: Any = {"folder": str(reference.resolve()), "images": folder_identity(reference),
                             "resolution": reference_resolution}
    else:
        reference_id = {"statistics": sha256_file(reference)}
    return {"pipeline": {path.relative_to(folder).as_posix(): sha256_file(path) for path in parts}, "guided": guided,
            "reference": reference_id, "n": settings.n, "seed": settings.seed,
            "guidance_scale": settings.guidance_scale,
            "guidance_interval": list(settings.guidance_interval) if settings.guidance_interval else None,
            "kid_subsets": settings.kid_subsets, "kid_subset_size": settings.kid_subset_size,
            "features": [extractor.name for extractor in extractors], "latentflow": latentflow.__version__}


class SettingStore:
    """One JSON file per measured setting, `folder/LABEL.json`, holding its result and the key of the context it
    was measured in; a file of another context is measured again (and replaced)."""

    def __init__(self, folder: Path, context: dict[str, Any]):
        self.folder, self.key = folder, json_sha256(context)

    def path(self, setting: SamplerSetting) -> Path:
        return self.folder / f"{setting.label}.json"

    def load(self, setting: SamplerSetting) -> dict[str, Any] | None:
        import json

        path = self.path(setting)
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):  # absent, or unreadable: measure it (again)
            return None
        return stored.get("result") if isinstance(stored, dict) and stored.get("context") == self.key else None

    def save(self, setting: SamplerSetting, record: dict[str, Any]) -> None:
        import json

        self.folder.mkdir(parents=True, exist_ok=True)
        document = {"context": self.key, "result": record}
        write_bytes_atomic(self.path(setting), json.dumps(document, indent=2).encode() + b"\n")


def evaluation_floors(pipe, settings: EvaluationSettings, reference: Callable[[], dict[str, FeatureStatistics]],
                      extractors: Sequence[FeatureExtractor], image_size: int, cache_dir: Path) -> Floors:
    """Real-against-real and the VAE floor at the evaluation's n, cached in `cache_dir` (`reference()` gives the
    reference's statistics when they are computed)."""
    from latentflow.eval.floors import cached_floors, compute_floors, floor_files, floors_cache_key, vae_round_trip
    from latentflow.vae import weights_sha256

    key = floors_cache_key(settings.floors, settings.n, settings.seed, image_size, weights_sha256(pipe.vae),
                           settings.reference, settings.kid_subset_size)
    files = floor_files(settings.floors, settings.n, settings.seed)
    return cached_floors(cache_dir / f"floors-{key}.json", lambda: compute_floors(
        files, reference(), extractors, vae_round_trip(pipe.vae), image_size, settings.batch_size,
        settings.kid_subsets, settings.kid_subset_size, settings.seed))


def _check_reference_resolution(reference: Path, image_size: int) -> None:
    import sys

    from latentflow.eval.references import statistics_resolution

    stored = statistics_resolution(reference)
    if stored != image_size:
        print(f"warning: {reference} was computed at resolution {stored or 'as stored'}, the samples are "
              f"{image_size} px; FID compares like with like only at equal resolution (fid-stats --resolution)",
              file=sys.stderr)


def format_row(row: dict) -> str:
    """One console line of a sweep result."""
    kid = "" if row["kid"] is None else f"  KID {row['kid']:.4f} +- {row['kid_std']:.4f}"
    dino = "" if row["fd_dinov2"] is None else f"  FD-DINOv2 {row['fd_dinov2']:.2f}"
    nfe = "" if row["nfe"] is None else f"{row['nfe']:7.1f}"
    return f"{row['setting']:>20}  NFE {nfe:>7}  FID {row['fid']:8.2f}{kid}{dino}"
