"""The main job end to end: encode -> fit the dataset OT potential (when the config pairs over the whole cache)
-> train (OT-CFM, accelerate) -> export -> sample -> evaluate; with `few_step`, then a flow map fine-tuned from the
trained model on its own samples (couplings -> train -> export and sample in 1 and 2 steps -> evaluate).

Every stage resumes: a finished cache is not re-encoded, a finished potential is not refitted (an interrupted fit
continues), training continues from its latest checkpoint, and the later stages are cheap to redo.
"""

from __future__ import annotations

import io
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from latentflow.card import GRID_NAME
from latentflow.errors import LatentflowError
from latentflow.io import check_folder_target, write_folder_atomic
from latentflow.processes import local_device
from latentflow.train.checkpoint import checkpoint_root
from latentflow.vae import DEFAULT_VAE

if TYPE_CHECKING:
    from latentflow.flow.semidiscrete import FitSettings

DEFAULT_DATA = "hf:nelorth/oxford-flowers"


def shipped_config(name: str) -> Path:
    """A config from the repository's configs/ (source checkout or editable install), else the copy a
    wheel installs under {sys.prefix}/share/latentflow/configs; the checkout's path when neither exists."""
    checkout = Path(__file__).resolve().parents[1] / "configs" / name
    installed = Path(sys.prefix) / "share" / "latentflow" / "configs" / name
    return installed if not checkout.is_file() and installed.is_file() else checkout


DEFAULT_CONFIG = shipped_config("flowers64_demo.yaml")
FEW_STEP_CONFIG = shipped_config("flowers64_meanflow_reflow.yaml")
FEW_STEP_SWEEP = ["flowmap:1,2"]


@dataclass
class DemoSettings:
    """What `latentflow demo` runs; every field is a CLI option."""

    data: str = DEFAULT_DATA
    vae: str = DEFAULT_VAE
    out: Path = Path("runs/demo")
    config: Path = DEFAULT_CONFIG
    resolution: int = 64
    train_steps: int | None = None
    eval_images: int | None = None  # None: as many as the reference holds
    # what the grid shows, and with a guide the best 8-NFE setting measured (euler 8 against midpoint 4: 103.3 / 106.9
    # on the demo's model, 82.2 / 82.7 on the hour config's; midpoint 4 was the best with plain guidance)
    sweep: list[str] = field(default_factory=lambda: ["euler:8"])
    grid_images: int = 64
    grid_steps: int = 8
    guidance_scale: float = 4.0  # classifier-free guidance of the grids and the evaluation (class-conditional data)
    guidance_interval: tuple[float, float] | None = None  # guide only at these times (None: at every time)
    floors: bool = True
    seed: int = 0
    overrides: list[str] = field(default_factory=list)
    # ascent steps of the potential when the config pairs with dataset OT (objective.ot_scope: dataset); 300 fit
    # the demo's cache in 31 s to the same FIDs as ot-fit's default 1,000 (cpu2_flowers_dataset_ot_fit300.txt)
    ot_fit_steps: int = 300
    # few steps: a flow map fine-tuned from the trained model on `few_step_couplings` of its own samples (the
    # grid's sampler and guidance), sampled and evaluated in 1 and 2 evaluations per image; from the demo's model
    # 116.6 at 1 NFE and 106.8 at 2 for about 10 minutes more (cpu2_demo_s23_fresh.txt)
    few_step: bool = False
    few_step_config: Path = FEW_STEP_CONFIG
    few_step_couplings: int = 4000
    few_step_train_steps: int | None = None
    few_step_overrides: list[str] = field(default_factory=list)


@dataclass
class DataSplits:
    """The images to encode and the images FID compares against."""

    train: str
    reference: Path | None
    note: str


def find_splits(data: str) -> DataSplits:
    """Use DATA/{train,val} (or DATA/*/{train,val}) when present; else all of DATA for both."""
    if data.startswith("hf:"):
        return DataSplits(data, None, f"{data} split 'train' (reference: the same images)")
    root = Path(data)
    if not root.exists():
        raise FileNotFoundError(f"--data {data} does not exist; give an image folder, .tar shards or hf:NAME")
    for base in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if (base / "train").is_dir() and (base / "val").is_dir():
            return DataSplits(str(base / "train"), base / "val", f"{base}/train (reference: {base}/val)")
    return DataSplits(data, None, f"{data} (reference: the same images)")


def write_reference_images(data: str, folder: Path, limit: int) -> Path:
    """Copy up to `limit` source images to `folder` as files (for sources that are not folders)."""
    from latentflow.data.sources import open_source

    if folder.is_dir() and any(folder.iterdir()):
        return folder
    source = open_source(data)

    def fill(staging: Path) -> None:
        staging.mkdir(parents=True)
        for record in source.records[:limit]:
            try:
                image = Image.open(io.BytesIO(source.read(record))).convert("RGB")
            except (OSError, ValueError):
                continue  # unreadable inputs are listed by the encoder's skipped.jsonl
            image.save(staging / f"{record.key}.png")

    return write_folder_atomic(folder, fill)


class Stages:
    """Numbered stage headers ("== 2/6 ..."); `start` prints one and returns a function that prints its time."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def start(self, name: str):
        self.done += 1
        print(f"\n== {self.done}/{self.total} {name}", flush=True)
        start = time.perf_counter()
        return lambda: print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)


def encode_stage(settings: DemoSettings, stages: Stages, splits: DataSplits, cache: Path) -> None:
    from latentflow.data.encoder import EncodeConfig, encode_dataset

    done = stages.start(f"encode {splits.note} with {settings.vae} at {settings.resolution} px")
    result = encode_dataset(EncodeConfig(vae=settings.vae, data=splits.train, out=cache,
                                         resolution=settings.resolution, command=["latentflow", "demo"]))
    print(f"   cache: {cache} ({result.encoded} newly encoded, {result.skipped} skipped)")
    done()


def demo_config(settings: DemoSettings, cache: Path):
    """The training config: the demo's file with the cache, the run folder, the VAE and the overrides set."""
    from latentflow.train.config import load_config

    overrides = [f"data.cache={cache}", f"output_dir={settings.out / 'run'}", f"sample.vae={settings.vae}",
                 *settings.overrides]
    if settings.train_steps is not None:
        overrides.append(f"train.max_steps={settings.train_steps}")
    return load_config(settings.config, overrides)


def ot_fit_stage(stages: Stages, config, fit: FitSettings) -> Path:
    """Fit (or reuse) the potential that `objective.ot_scope: dataset` pairs through, as `latentflow ot-fit` would
    with `fit` (class-aware when the objective is; the flip variants when training flips a cache that holds them)."""
    from latentflow.data.cache import LatentCache
    from latentflow.data.potential import OTFitConfig, fit_cache_potential

    objective, cache = config.objective, config.data.cache
    flips = config.data.random_flip and LatentCache(cache).has_flip
    done = stages.start(f"fit the dataset OT potential {objective.ot_potential!r} of the cache "
                        f"({'one per class, ' if objective.class_aware else ''}{fit.steps} steps)")
    result = fit_cache_potential(OTFitConfig(cache=cache, name=objective.ot_potential,
                                             fit=fit,
                                             class_aware=objective.class_aware, flips=flips,
                                             normalized=config.data.normalize, progress=False))
    balance = result.report["balance"]
    print(f"   potential: {result.path} ({result.points} points{', reused' if result.already_complete else ''}; "
          f"balance excess {balance['excess']:.4f}; pairs' mean squared distance "
          f"{balance['pair_cost'] / balance['independent_cost']:.3f}x independent pairing's)")
    done()
    return result.path


def train_stage(stages: Stages, config) -> Path:
    from latentflow.train.trainer import train

    run_dir = Path(config.output_dir)
    done = stages.start(f"train {config.model.name} with {config.objective.name}"
                        f"{' over the whole cache (dataset OT)' if config.objective.ot_scope == 'dataset' else ''}"
                        f" for {config.train.max_steps} steps")
    resume = "latest" if checkpoint_root(run_dir).is_dir() else None
    train(config, resume=resume)
    print(f"   run: {run_dir} (log.csv, samples/, model/)")
    done()
    return run_dir


def few_step_config(settings: DemoSettings, couplings: Path, run_dir: Path):
    """The flow map's training config: the few-step file fine-tuning `run_dir` on `couplings`, its overrides set."""
    from latentflow.train.config import load_config

    overrides = [f"data.cache={couplings}", f"output_dir={settings.out / 'flow_map_run'}", f"train.init={run_dir}",
                 f"sample.vae={settings.vae}", *settings.few_step_overrides]
    if settings.few_step_train_steps is not None:
        overrides.append(f"train.max_steps={settings.few_step_train_steps}")
    return load_config(settings.few_step_config, overrides)


def export_stage(settings: DemoSettings, stages: Stages, run_dir: Path, name: str = "pipeline") -> Path:
    from latentflow.export import export_run

    done = stages.start(f"export {run_dir}'s EMA model and the VAE as a diffusers pipeline")
    pipe_dir = export_run(run_dir, settings.out / name, vae=settings.vae,
                          grid_images=0)  # the sample stage writes the card's grid
    guide = pipe_dir / "guide"
    print(f"   pipeline: {pipe_dir}" + (f" (guidance's unconditional branch from {guide}: the run's EMA at "
                                        f"train.guide_step)" if guide.is_dir() else ""))
    done()
    return pipe_dir


def demo_guidance(settings: DemoSettings, pipe) -> float:
    """The guidance the demo samples `pipe` with: its scale for class-conditional models, else 1."""
    return settings.guidance_scale if pipe.scheduler.config.num_classes else 1.0


def write_grids(settings: DemoSettings, pipe, pipe_dir: Path, solver: str, steps: int, guidance: float,
                name: str) -> Path:
    """`OUT/NAME.png` (`grid_images` samples; also the model card's picture) and, for a class-conditional model,
    `OUT/NAME_by_class.png` (a row of 8 per class)."""
    import torch

    from latentflow.eval.sweep import SamplerSetting, generate_batches
    from latentflow.io import image_grid, save_image

    setting = SamplerSetting(solver, steps, None)
    batches = generate_batches(pipe, settings.grid_images, setting, 16, settings.seed, None, guidance, None,
                               settings.guidance_interval)
    picture = image_grid(torch.cat([torch.as_tensor(batch.images) for batch in batches]))
    grid = save_image(picture, settings.out / f"{name}.png")
    save_image(picture, pipe_dir / GRID_NAME)
    print(f"   grid: {grid}")
    if pipe.scheduler.config.num_classes:
        rows = [torch.cat([batch.images for batch in generate_batches(pipe, 8, setting, 8, settings.seed, label,
                                                                        guidance, None, settings.guidance_interval)])
                for label in range(pipe.scheduler.config.num_classes)]
        by_class = save_image(image_grid(torch.cat(rows), columns=8), settings.out / f"{name}_by_class.png")
        names = pipe.scheduler.config.label_names or []
        print(f"   one row per class ({', '.join(names)}), guidance {guidance:g}: {by_class}")
    return grid


def sample_stage(settings: DemoSettings, stages: Stages, pipe_dir: Path) -> Path:
    from latentflow.export import load_pipeline

    done = stages.start(f"sample a grid of {settings.grid_images} images, euler {settings.grid_steps} steps, "
                        f"guidance {settings.guidance_scale:g} (class-conditional models)")
    pipe = load_pipeline(pipe_dir, local_device(None), progress=False)
    grid = write_grids(settings, pipe, pipe_dir, "euler", settings.grid_steps, demo_guidance(settings, pipe),
                       "samples")
    done()
    return grid


def few_step_sample_stage(settings: DemoSettings, stages: Stages, pipe_dir: Path) -> Path:
    """Grids of the flow map in 1 and 2 steps (guidance 1: the couplings carry the teacher's); the card shows 2."""
    from latentflow.export import load_pipeline

    done = stages.start(f"sample grids of {settings.grid_images} images from the flow map in 1 and 2 steps")
    pipe = load_pipeline(pipe_dir, local_device(None), progress=False)
    grids = [write_grids(settings, pipe, pipe_dir, "flowmap", steps, 1.0, f"samples_flow_map_{steps}step")
             for steps in (1, 2)]
    done()
    return grids[-1]


def couplings_stage(settings: DemoSettings, stages: Stages, pipe_dir: Path) -> Path:
    """`few_step_couplings` of the model's own samples, made as the grid is (euler `grid_steps`, the demo's
    guidance; at every time, whatever `guidance_interval` says: reflow has none), as a couplings cache
    (`latentflow reflow`) for the flow map to learn."""
    from latentflow.export import load_pipeline
    from latentflow.reflow import ReflowConfig, make_couplings

    guidance = demo_guidance(settings, load_pipeline(pipe_dir, local_device(None), progress=False))
    done = stages.start(f"few steps: {settings.few_step_couplings} samples of the model (euler {settings.grid_steps}"
                        f" steps, guidance {guidance:g}) as the flow map's couplings")
    result = make_couplings(ReflowConfig(teacher=pipe_dir, n=settings.few_step_couplings, out=settings.out /
                                         "couplings", solver="euler", steps=settings.grid_steps,
                                         guidance_scale=guidance, seed=settings.seed, progress=False,
                                         command=["latentflow", "demo", "--few-step"]))
    print(f"   couplings: {result.out} ({result.made} made{', reused' if result.already_complete else ''})")
    done()
    return result.out


def reference_statistics_file(settings: DemoSettings, reference: Path) -> Path:
    """The reference folder's feature statistics at the demo's resolution, computed once into
    `OUT/reference_statistics/` under a key of the folder's listing: the demo's evaluations share them, and with
    them the floors' cache, which lies beside them."""
    from tqdm.auto import tqdm

    from latentflow.eval.features import make_extractors
    from latentflow.eval.references import folder_identity, write_folder_statistics

    path = settings.out / "reference_statistics" / f"{folder_identity(reference)[:16]}-{settings.resolution}px.npz"
    if not path.is_file():
        write_folder_statistics(reference, path, make_extractors(local_device(None)),
                                progress=lambda it: tqdm(it, desc="reference"), resolution=settings.resolution)
    return path


def evaluate_stage(settings: DemoSettings, stages: Stages, pipe_dir: Path, splits: DataSplits,
                   sweep: list[str] | None = None, guidance: float | None = None, name: str = "evaluation") -> Path:
    """FID and KID of `pipe_dir` at the `sweep` settings (default the demo's), with the floors, into `OUT/NAME`;
    `guidance` None: the demo's guidance for class-conditional models."""
    from latentflow.card import write_model_card
    from latentflow.eval.references import list_images
    from latentflow.eval.sweep import EvaluationSettings, evaluate_pipeline
    from latentflow.export import load_pipeline

    sweep = list(sweep or settings.sweep)
    reference = splits.reference or write_reference_images(splits.train, settings.out / "reference", 2000)
    n = settings.eval_images or len(list_images(reference))
    train_folder = Path(splits.train) if Path(splits.train).is_dir() else None
    floors = train_folder if settings.floors else None
    done = stages.start(f"FID against {reference} with {n} images per setting: {' '.join(sweep)}"
                        + (f", floors from {n} images of {train_folder}" if floors else ""))
    out = settings.out / name
    pipe = load_pipeline(pipe_dir, local_device(None), progress=False)
    evaluation = EvaluationSettings(reference=reference_statistics_file(settings, reference), n=n, sweep=sweep,
                                    seed=settings.seed, device=str(local_device(None)),
                                    kid_subset_size=min(1000, n), floors=floors,
                                    guidance_scale=demo_guidance(settings, pipe) if guidance is None else guidance,
                                    guidance_interval=settings.guidance_interval)
    paths = evaluate_pipeline(pipe, pipe_dir, evaluation, out)
    write_model_card(pipe_dir, evaluation_file=paths["json"])
    done()
    return out


def run_demo(settings: DemoSettings) -> dict[str, Path]:
    """Run the stages; returns where each result lies."""
    from latentflow.eval.sweep import parse_sweep
    from latentflow.flow.guidance import check_guidance_interval, check_guidance_scale
    from latentflow.flow.objectives import make_objective
    from latentflow.flow.solvers import check_solver
    from latentflow.train.config import validate_config

    if (settings.eval_images is not None and settings.eval_images < 2) or settings.grid_images < 1:
        raise LatentflowError("--eval-images must be >= 2 and --grid-images >= 1")
    if settings.few_step and settings.few_step_couplings < 1:
        raise LatentflowError(f"--few-step-couplings must be >= 1, got {settings.few_step_couplings}")
    if Path(settings.vae).exists():  # record local VAEs by absolute path, so later stages find them anywhere
        settings.vae = str(Path(settings.vae).resolve())
    splits = find_splits(settings.data)
    check_folder_target(settings.out, what="demo folder")
    cache = settings.out / "cache"
    config = demo_config(settings, cache)  # read before encoding: a bad config or override fails at once
    validate_config(config)
    if settings.few_step:  # likewise the flow map's
        validate_config(few_step_config(settings, settings.out / "couplings", Path(config.output_dir)))
    check_guidance_scale(settings.guidance_scale)  # and the evaluation's settings, which come last
    check_guidance_interval(settings.guidance_interval)
    prediction = make_objective(config.objective.name).prediction
    for setting in parse_sweep(settings.sweep):
        check_solver(setting.solver, prediction)
    settings.out.mkdir(parents=True, exist_ok=True)
    fit = None
    if config.objective.ot_scope == "dataset":
        from latentflow.flow.semidiscrete import FitSettings

        fit = FitSettings(steps=settings.ot_fit_steps)
        fit.validate()  # the fit's own check (steps >= 1), before any encoding
    stages = Stages((5 if fit is None else 6) + (5 if settings.few_step else 0))
    encode_stage(settings, stages, splits, cache)
    potential = None if fit is None else ot_fit_stage(stages, config, fit)
    run_dir = train_stage(stages, config)
    pipe_dir = export_stage(settings, stages, run_dir)
    grid = sample_stage(settings, stages, pipe_dir)
    evaluation = evaluate_stage(settings, stages, pipe_dir, splits)
    results = {"cache": cache, **({"potential": potential} if potential else {}), "run": run_dir,
               "pipeline": pipe_dir, "samples": grid, "evaluation": evaluation}
    if settings.few_step:
        couplings = couplings_stage(settings, stages, pipe_dir)
        flow_map_run = train_stage(stages, few_step_config(settings, couplings, run_dir))
        flow_map_pipe = export_stage(settings, stages, flow_map_run, "flow_map_pipeline")
        flow_map_grid = few_step_sample_stage(settings, stages, flow_map_pipe)
        flow_map_evaluation = evaluate_stage(settings, stages, flow_map_pipe, splits, FEW_STEP_SWEEP, 1.0,
                                             "flow_map_evaluation")
        results.update(couplings=couplings, flow_map_run=flow_map_run, flow_map_pipeline=flow_map_pipe,
                       flow_map_samples=flow_map_grid, flow_map_evaluation=flow_map_evaluation)
    return results
