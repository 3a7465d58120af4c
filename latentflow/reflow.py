"""Reflow couplings: a trained teacher's (noise, endpoint) pairs, stored as a latent cache.

Rectified flow's reflow (Liu et al. 2022, "Flow straight and fast", Sec. 2.2, Eq. 4 with k = 1): integrate the
teacher's ODE from noise x0 to its endpoint x1 = ODE(x0), then train a new flow (the 2-rectified flow) on the
fixed pairs (x0, x1) instead of independent ones (`objective.coupling: stored`).

Sample i draws its noise x0 from a generator seeded by (seed, i) and, for a class-conditional teacher, its label
from a permutation of the classes seeded by (seed, i // C), so every block of C consecutive indices holds each
class once. Sample i is therefore the same whichever process makes it and whatever --n is. The cache is written
like `latentflow encode`'s (per-rank shards renamed into place with their index, resumable exactly once; rank r
of W makes the pending indices with i % W == r) and opens as a `LatentCache`: the endpoint (in the cache's
space) is `mean.npy`, the noise (in the teacher model's space) `noise.npy`.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from latentflow.data.manifest import MANIFEST_FILE, SETTINGS_FILE, build_manifest, write_settings
from latentflow.data.writer import (
    INDEX_DIR,
    LatentSample,
    ShardIndex,
    ShardWriter,
    read_indexes,
    remove_stale_temporaries,
)
from latentflow.errors import LatentflowError
from latentflow.export import load_pipeline, pipeline_from_run
from latentflow.flow.guidance import check_guidance_scale
from latentflow.flow.solvers import ADAPTIVE_METHODS, STEPPED_SOLVERS, check_stepping
from latentflow.io import LOCK_NAME, PIPELINE_MARKER, read_json, write_json_atomic
from latentflow.processes import Distributed, torch_device
from latentflow.train.checkpoint import CACHE_MANIFEST_FILE, CONFIG_FILE, MODEL_DIR
from latentflow.vae import identity_differences, load_vae, sha256_file, weights_sha256

REFLOW_KIND = "reflow"
NOISE_MEMBER = "noise.npy"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
# what must agree to resume or extend a couplings cache (besides the VAE): anything else, e.g. --n or the
# batch size, may change
COMPATIBILITY_FIELDS = ("teacher_class", "teacher_weights_sha256", "teacher_config", "objective", "solver", "steps",
                        "atol", "rtol", "guidance_scale", "seed", "normalized", "latent_shape", "num_classes",
                        "label_names", "channel_mean", "channel_std")


@dataclass
class ReflowConfig:
    """Settings of one `latentflow reflow` run (see the CLI for each)."""

    teacher: str | Path
    n: int
    out: str | Path
    solver: str = "dopri5"
    steps: int | None = None
    guidance_scale: float = 1.0
    batch_size: int = 64
    seed: int = 0
    shard_size: int = 1000
    device: str | None = None
    progress: bool = True
    command: list[str] | None = None


@dataclass
class ReflowResult:
    """What a run did: couplings this process made, and the cache's total (from the manifest)."""

    out: Path
    made: int
    num_samples: int
    already_complete: bool
    manifest: dict[str, Any]
    seconds: float = 0.0


@dataclass
class Teacher:
    """A teacher pipeline with what identifies it.

    Attributes:
        pipe: the LatentFlowPipeline.
        identity: path, kind ("pipeline" or "run"), transformer class, sha256 of its weight files and of its
            float32 weights, its config.
        source_manifest: the manifest of the cache the teacher was trained on, or None when a pipeline folder
            does not carry it.
        vae_identity: that cache's VAE identity (or, without it, the pipeline's VAE's).
    """

    pipe: Any
    identity: dict[str, Any]
    source_manifest: dict[str, Any] | None
    vae_identity: dict[str, Any]


# ---- one sample: its key, noise and label, a function of (seed, index) alone -----------------------------------

def coupling_key(index: int) -> str:
    """The cache key of sample `index` (zero-padded, so keys sort as the indices)."""
    return f"{index:08d}"


def noise_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of sample `index`'s noise, seeded by (seed, index)."""
    state = np.random.SeedSequence([seed, index, 0x7265]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & ((1 << 63) - 1))


def coupling_noise(seed: int, index: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Sample `index`'s noise x0 ~ N(0, I): (C, h, w) float32."""
    return torch.randn(shape, generator=noise_generator(seed, index), dtype=torch.float32)


def coupling_label(seed: int, index: int, num_classes: int) -> int:
    """Sample `index`'s class: entry index % C of a permutation of the C classes seeded by (seed, index // C), so
    any n indices from 0 hold every class n // C or n // C + 1 times."""
    block = np.random.SeedSequence([seed, index // num_classes, 0x6C62]).generate_state(1, dtype=np.uint64)[0]
    order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(int(block) & ((1 << 63) - 1)))
    return int(order[index % num_classes])


@dataclass
class Couplings:
    """A batch of couplings: noise x0 (b, C, h, w) float32 (model space), endpoints x1 (b, C, h, w) float32
    (cache space), labels (b ints or None) and the teacher's NFE for the batch."""

    noise: torch.Tensor
    endpoints: torch.Tensor
    labels: list[int] | None
    nfe: int


def teacher_endpoints(pipe, indices: list[int], seed: int, solver: str, steps: int | None,
                      guidance_scale: float) -> Couplings:
    """Integrate the teacher from the seeded noise of `indices` (t=0) to its endpoints (t=1), in one batch.

    With an adaptive solver the batch shares its step sizes, so an endpoint depends on its batch companions
    within the solver's tolerance.
    """
    config = pipe.scheduler.config
    shape = (config.latent_channels, *config.latent_size)
    noise = torch.stack([coupling_noise(seed, index, shape) for index in indices])  # (b, C, h, w)
    classes = int(config.num_classes)
    labels = [coupling_label(seed, index, classes) for index in indices] if classes else None
    output = pipe(latents=noise.to(pipe._execution_device), class_labels=labels, solver=solver,
                  num_inference_steps=steps, guidance_scale=guidance_scale, eta=0.0, output_type="latent")
    return Couplings(noise, output.images.float().cpu(), labels, int(output.nfe))


# ---- the teacher ---------------------------------------------------------------------------------------------

def _weight_files(folder: Path) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in sorted(folder.iterdir()) if path.suffix in _WEIGHT_SUFFIXES}


def _plain(value: Any) -> Any:
    """`value` as JSON would give it back (tuples become lists), for comparing with what was stored."""
    return json.loads(json.dumps(value))


def load_teacher(path: str | Path, device: torch.device | str = "cpu") -> Teacher:
    """Load a pipeline folder (`model_index.json`) or a finished training run (`model/`, `config.yaml`,
    `cache_manifest.json`) as a teacher on `device`."""
    device = torch_device(device)
    folder = Path(path)
    if (folder / PIPELINE_MARKER).is_file():
        pipe, kind, weights = load_pipeline(folder, device, progress=False), "pipeline", folder / "transformer"
        manifest_path = folder / CACHE_MANIFEST_FILE
        manifest = read_json(manifest_path, "cache manifest of the pipeline") if manifest_path.is_file() else None
    elif all((folder / name).exists() for name in (MODEL_DIR, CONFIG_FILE, CACHE_MANIFEST_FILE)):
        pipe, kind, weights = pipeline_from_run(folder, where="reflow").to(device), "run", folder / MODEL_DIR
        manifest = read_json(folder / CACHE_MANIFEST_FILE, "cache manifest of the run")
    else:
        raise LatentflowError(f"teacher {folder}: neither a pipeline folder ({PIPELINE_MARKER}) nor a finished "
                              f"training run ({MODEL_DIR}/, {CONFIG_FILE}, {CACHE_MANIFEST_FILE}); pass one of "
                              f"those")
    pipe.set_progress_bar_config(disable=True)
    model_config = {key: value for key, value in dict(pipe.transformer.config).items() if not key.startswith("_")}
    identity = {"path": str(folder.resolve()), "kind": kind, "class": type(pipe.transformer).__name__,
                "files": _weight_files(weights), "weights_sha256": weights_sha256(pipe.transformer),
                "config": _plain(model_config)}
    vae = manifest["vae"] if manifest else load_vae(folder / "vae").identity
    return Teacher(pipe, identity, manifest, vae)


# ---- settings, and the folder they go into -----------------------------------------------------------------------

def _statistics(teacher: Teacher) -> tuple[list[float] | None, list[float] | None]:
    """The channel statistics the teacher was trained with: its normalisation, else its cache's (None: unknown,
    the endpoints' own are used)."""
    config = teacher.pipe.scheduler.config
    if config.latent_mean is not None:
        return list(config.latent_mean), list(config.latent_std)
    if teacher.source_manifest:
        return teacher.source_manifest["channel_mean"], teacher.source_manifest["channel_std"]
    return None, None


def resolved_steps(pipe, solver: str, steps: int | None) -> int | None:
    """The step count a solver uses (the pipeline's default when not given; None for adaptive solvers)."""
    if solver not in STEPPED_SOLVERS:
        return None
    return int(pipe.scheduler.config.num_inference_steps if steps is None else steps)


def couplings_settings(teacher: Teacher, config: ReflowConfig) -> dict[str, Any]:
    """What a couplings cache is made of (`index/settings.json`): the encode settings' fields plus `couplings`."""
    scheduler = teacher.pipe.scheduler.config
    channels, (height, width) = scheduler.latent_channels, scheduler.latent_size
    classes = int(scheduler.num_classes)
    mean, std = _statistics(teacher)
    adaptive = config.solver in ADAPTIVE_METHODS
    couplings = {
        "teacher": teacher.identity, "objective": scheduler.objective, "prediction_type": scheduler.prediction_type,
        "solver": config.solver, "steps": resolved_steps(teacher.pipe, config.solver, config.steps),
        "atol": scheduler.atol if adaptive else None, "rtol": scheduler.rtol if adaptive else None,
        "guidance_scale": float(config.guidance_scale), "seed": config.seed,
        "normalized": scheduler.latent_mean is not None, "noise_space": "model", "noise_dtype": "float32",
        "labels": "balanced: each block of num_classes indices holds each class once" if classes else None,
        "latent_shape": [channels, height, width], "num_classes": classes, "channel_mean": mean, "channel_std": std,
    }
    vae = teacher.vae_identity
    source = teacher.source_manifest or {}
    return _plain({
        "vae": vae, "resolution": vae["downsampling_factor"] * height, "flip": False,
        "preprocessing": source.get("preprocessing"), "storage_dtype": "float16",
        "compute_dtype": str(teacher.pipe.transformer.dtype).replace("torch.", ""),
        "source": {"kind": REFLOW_KIND, "teacher": teacher.identity["path"], "labels": classes > 0},
        "label_names": list(scheduler.label_names) if classes and scheduler.label_names else None,
        "couplings": couplings,
    })


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    couplings = settings["couplings"]
    teacher = couplings["teacher"]
    values = {"teacher_class": teacher["class"], "teacher_weights_sha256": teacher["weights_sha256"],
              "teacher_config": teacher["config"], "label_names": settings["label_names"]}
    return {**values, **{key: couplings.get(key) for key in COMPATIBILITY_FIELDS if key not in values}}


def _holds_something(out: Path) -> bool:
    """Whether `out` holds anything but (an empty `index/` with) temporaries of an interrupted first write."""
    if not out.exists():
        return False
    if not out.is_dir():
        return True
    for entry in out.iterdir():
        if entry.name == LOCK_NAME:
            continue  # the lock of this run, or of a writer that `folder_lock` names
        inside = list(entry.iterdir()) if entry.name == INDEX_DIR and entry.is_dir() else None
        if inside is None or any(not item.name.startswith(".") for item in inside):
            return True
    return False


def existing_couplings(out: Path) -> dict[str, Any] | None:
    """The settings of the couplings `out` holds, or None when it holds nothing; raise LatentflowError when it
    holds anything else."""
    path = out / INDEX_DIR / SETTINGS_FILE
    if not path.is_file():
        if _holds_something(out):
            raise LatentflowError(f"--out {out} holds files that are not reflow couplings; use a new or empty folder")
        return None
    existing = json.loads(path.read_text())
    if existing.get("source", {}).get("kind") != REFLOW_KIND:
        raise LatentflowError(f"--out {out} holds a latent cache written by `latentflow encode`, not reflow "
                              "couplings; use a new or empty folder")
    return existing


def check_couplings_folder(out: Path, settings: dict[str, Any]) -> bool:
    """Whether `out` already holds couplings made like `settings` (True) or nothing (False); raise
    LatentflowError when it holds couplings of another teacher or settings, or anything else."""
    existing = existing_couplings(out)
    if existing is None:
        return False
    differing = identity_differences(existing["vae"], settings["vae"])
    if differing:
        raise LatentflowError(f"--out {out} holds couplings of another VAE ({sorted(differing)} differ); use "
                              "another --out")
    old, new = _comparable(existing), _comparable(settings)
    for field in COMPATIBILITY_FIELDS:
        if old[field] != new[field]:
            raise LatentflowError(f"--out {out} holds couplings made with {field}={json.dumps(old[field])}, this run "
                                  f"has {field}={json.dumps(new[field])}; use another --out, or the same teacher and "
                                  "settings to resume")
    return True


def _done_indices(out: Path, n: int) -> set[int]:
    """Indices already in finished shards; raise when some lie at or beyond `n`."""
    done = {int(key) for index in read_indexes(out) for key in index.keys}
    beyond = sorted(index for index in done if index >= n)
    if beyond:
        raise LatentflowError(f"--out {out} already holds {len(done)} couplings, up to index {beyond[-1]}; "
                              f"use --n {beyond[-1] + 1} or more")
    return done


# ---- the run ---------------------------------------------------------------------------------------------------

def _check_arguments(config: ReflowConfig) -> None:
    for name, value, least in (("--n", config.n, 1), ("--batch-size", config.batch_size, 1),
                               ("--seed", config.seed, 0), ("--shard-size", config.shard_size, 1)):
        if value < least:
            raise LatentflowError(f"{name} must be >= {least}, got {value}")
    if config.steps is not None and config.steps < 1:
        raise LatentflowError(f"--steps must be >= 1, got {config.steps}")


def _check_teacher_settings(pipe, config: ReflowConfig) -> None:
    pipe.check_solver(config.solver)
    check_stepping(config.solver, config.steps, None, "--steps")
    check_guidance_scale(config.guidance_scale)
    if config.guidance_scale != 1.0 and not pipe.scheduler.config.num_classes:
        raise LatentflowError(f"--guidance-scale {config.guidance_scale} needs a class-conditional teacher; "
                              "this one is unconditional: use 1")


def _prepare_out(out: Path, settings: dict[str, Any], n: int, dist: Distributed) -> set[int]:
    """Check `out` on every rank, then create it (rank 0); returns the indices already done."""
    exists = check_couplings_folder(out, settings)
    done = _done_indices(out, n) if exists else set()
    dist.barrier()  # every rank has checked before rank 0 writes anything
    if dist.rank == 0 and not exists:
        write_settings(out, settings)
    dist.barrier()
    remove_stale_temporaries(out, dist.rank if dist.world_size > 1 else None)  # a killed run's unfinished shards
    return done


def _make(teacher: Teacher, indices: list[int], config: ReflowConfig, dist: Distributed, out: Path) -> int:
    """Make and write the couplings of `indices` (this rank's share), in batches; returns how many."""
    writer = ShardWriter(out, config.shard_size, dist.rank, dist.world_size, info_totals=("nfe",))
    steps = resolved_steps(teacher.pipe, config.solver, config.steps)
    bar = tqdm(total=len(indices), unit="pair", dynamic_ncols=True, disable=not config.progress or dist.rank != 0,
               desc=f"reflow rank {dist.rank}/{dist.world_size}" if dist.world_size > 1 else "reflow")
    for start in range(0, len(indices), config.batch_size):
        chunk = indices[start:start + config.batch_size]
        batch = teacher_endpoints(teacher.pipe, chunk, config.seed, config.solver, steps, config.guidance_scale)
        for row, index in enumerate(chunk):
            label = None if batch.labels is None else batch.labels[row]
            writer.add(LatentSample(key=coupling_key(index), mean=batch.endpoints[row], noise=batch.noise[row],
                                    label=label, info={"index": index, "seed": config.seed, "nfe": batch.nfe}))
        bar.update(len(chunk))
    writer.finish_shard()
    bar.close()
    return len(indices)


def _check_exactly_once(indexes: list[ShardIndex], n: int, out: Path) -> None:
    keys = [key for index in indexes for key in index.keys]
    missing = sorted(set(map(coupling_key, range(n))) - set(keys))
    if len(keys) != len(set(keys)) or missing:
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        raise LatentflowError(f"--out {out}: couplings {missing[:3]} missing, {repeated[:3]} repeated; were two runs "
                              "writing at once? Delete the folder and run again")


def couplings_manifest(settings: dict[str, Any], indexes: list[ShardIndex], n: int, command: str) -> dict[str, Any]:
    """The manifest of a complete couplings cache: an encode manifest whose channel statistics are the teacher's,
    with its endpoints' own statistics, the NFE per sample and n in the `couplings` section."""
    manifest = build_manifest(settings, indexes, settings["label_names"], command)
    couplings = dict(settings["couplings"])
    endpoints = {"endpoint_channel_mean": manifest.pop("channel_mean"),
                 "endpoint_channel_std": manifest.pop("channel_std")}
    manifest.pop("channel_std_of_mean")
    samples = manifest["num_samples"]
    nfe = sum(index.info_sums.get("nfe", 0) for index in indexes) / samples
    members = ["mean.npy", NOISE_MEMBER] + (["cls"] if couplings["num_classes"] else []) + ["json"]
    manifest.update(stochastic=False, members=members, num_classes=couplings["num_classes"],
                    channel_mean=couplings["channel_mean"] or endpoints["endpoint_channel_mean"],
                    channel_std=couplings["channel_std"] or endpoints["endpoint_channel_std"],
                    couplings={**couplings, **endpoints, "n": n, "nfe_per_sample": nfe})
    return manifest


def _finish(out: Path, settings: dict[str, Any], n: int, command: str) -> dict[str, Any]:
    indexes = read_indexes(out)
    _check_exactly_once(indexes, n, out)
    manifest = couplings_manifest(settings, indexes, n, command)
    write_json_atomic(out / MANIFEST_FILE, manifest, indent=1)
    return manifest


def make_couplings(config: ReflowConfig) -> ReflowResult:
    """Make the couplings of indices 0..n-1 into `config.out`; resumes a partial cache, extends one made with a
    smaller n, leaves a complete one alone, and refuses a folder holding anything else (before writing).

    Returns:
        ReflowResult.
    """
    _check_arguments(config)
    dist = Distributed(config.device)
    out = Path(config.out)
    existing_couplings(out)  # a folder holding something else is refused before the teacher loads
    with dist.lock(out, "latentflow reflow"):
        return _make_couplings_locked(config, dist, out)


def _make_couplings_locked(config: ReflowConfig, dist: Distributed, out: Path) -> ReflowResult:
    """`make_couplings` once the lock of `out` is held."""
    teacher = load_teacher(config.teacher, dist.device)
    _check_teacher_settings(teacher.pipe, config)
    settings = couplings_settings(teacher, config)
    done = _prepare_out(out, settings, config.n, dist)
    if len(done) == config.n and (out / MANIFEST_FILE).exists():
        manifest = read_json(out / MANIFEST_FILE, "couplings manifest")
        if manifest["num_samples"] == config.n:
            return ReflowResult(out, 0, config.n, True, manifest)
    mine = [index for index in range(config.n) if index not in done and index % dist.world_size == dist.rank]
    started = time.perf_counter()
    made = _make(teacher, mine, config, dist, out)
    seconds = time.perf_counter() - started
    dist.barrier()
    command = shlex.join(config.command if config.command is not None else sys.argv)
    if dist.rank == 0:
        _finish(out, settings, config.n, command)
    dist.barrier()
    manifest = read_json(out / MANIFEST_FILE, "couplings manifest")
    return ReflowResult(out, made, manifest["num_samples"], False, manifest, seconds)
