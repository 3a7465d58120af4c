"""The accelerate training loop for DiT / U-Net velocity fields on cached latents.

`Trainer(config).fit(resume=None)` runs a whole job: DDP over the launched processes,
mixed precision with a guard that skips non-finite steps, gradient accumulation and
clipping, AdamW with warmup and optional cosine decay, EMA weights, atomic checkpoints
with exact resume, fixed-noise sample grids, metrics to trackers and OUT/log.csv, and
the EMA model exported in diffusers format at the end. The main process holds the lock of
the output folder while `fit` runs (a second trainer into it is refused; a killed one's lock
is taken over, so `--resume` works), and a checkpoint the disk has no room for is removed
whole, naming the folder and its size.

The pieces are public so tests and benchmarks can drive them: `batches()` yields the
prepared micro-batches of one optimizer step and `train_step(...)` performs that step.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, set_seed
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from latentflow.data.cache import cache_fingerprint
from latentflow.errors import LatentflowError
from latentflow.flow.objectives import (
    FLOW_MAP_OBJECTIVES,
    Objective,
    TrainingBatch,
    TrainingModels,
    default_time_sampler,
    make_objective,
)
from latentflow.flow.screening import native_bf16
from latentflow.io import folder_lock, tree_size, write_folder_atomic, write_json_atomic, write_text_atomic, writing
from latentflow.models import make_model
from latentflow.processes import share_cpu_threads
from latentflow.train import checkpoint as ckpt
from latentflow.train.checkpoint import EMA_FILE, GUIDE_DIR, MODEL_CONFIG_FILE, STATE_FILE
from latentflow.train.config import Config, ObjectiveConfig, flat_config, save_config, validate_config
from latentflow.train.ema import EMA
from latentflow.train.init import (
    InitialModel,
    check_same_latents,
    load_initial_model,
    load_initial_weights,
    merged_settings,
    new_flow_map_settings,
)
from latentflow.train.logs import LOG_FILE, CsvLog, KeyRecord
from latentflow.train.optim import learning_rate, make_adamw
from latentflow.train.pairing import (
    PairingTransform,
    check_coupling,
    dataset_cells_for,
    drop_labels,
    global_ot_pairing,
    pair_with_dataset,
    paired_batch,
    seed_for,
    sharded_dataset_pairing,
)
from latentflow.train.previews import load_preview_vae, preview_latents, write_preview

if TYPE_CHECKING:
    from latentflow.data.elastic import StepBatch, StepLayout


@dataclass
class TrainState:
    """Counters that a checkpoint restores besides the weights."""

    step: int = 0
    nonfinite_in_a_row: int = 0
    skipped_steps: int = 0
    data_streams: int = 1  # K, the streams the global batches are drawn from (latentflow.data.elastic)
    cache_fingerprint: str | None = None  # the cache trained on (None: a checkpoint from before it was recorded)


@dataclass
class StepResult:
    """One optimizer step, reduced over processes.

    Attributes:
        loss: mean loss over the global batch (nan/inf when the step was skipped for it).
        grad_norm: total gradient norm before clipping.
        skipped: the step was not applied because the loss or gradients were not finite.
        lr: the learning rate used.
        ot_cost: mean squared noise-data distance of the pairs over all processes, or None.
        error: mean unweighted squared error over the global batch where the loss weights it (meanflow's
            adaptive weight), else None.
    """

    loss: float
    grad_norm: float
    skipped: bool
    lr: float
    ot_cost: float | None = None
    error: float | None = None


@dataclass
class FitResult:
    """The end of `fit`: final step, the per-step losses seen, and where the model went."""

    step: int
    losses: list[float] = field(default_factory=list)
    model_dir: Path | None = None


def _open_cache(path: str):
    from latentflow.data.cache import LatentCache

    return LatentCache(path)


def check_model_matches_cache(model_config: dict[str, Any], cache_shape: tuple[int, ...], num_classes: int,
                              cache_path: str, source: str) -> None:
    """Refuse a model whose input shape or classes disagree with the cache.

    Raises:
        LatentflowError: naming both shapes and where the model's came from.
    """
    channels, height, width = cache_shape
    if height != width:
        raise LatentflowError(f"cache {cache_path}: latents {tuple(cache_shape)} are not square; models need h == w")
    model_shape = (model_config.get("in_channels"), model_config.get("sample_size"), model_config.get("sample_size"))
    if model_shape != (channels, height, width):
        raise LatentflowError(
            f"cache {cache_path} holds latents of shape {tuple(cache_shape)} but the model ({source}) takes "
            f"{model_shape}; encode a matching cache or drop in_channels/sample_size from model.settings"
        )
    if model_config.get("num_classes", 0) != num_classes:
        raise LatentflowError(
            f"cache {cache_path} has {num_classes} classes but the model ({source}) has "
            f"num_classes={model_config.get('num_classes')}"
        )


def objective_from_config(objective: ObjectiveConfig) -> Objective:
    """The objective the `objective:` section of a config describes."""
    time_settings = {key: value for key, value in (("mean", objective.time_mean), ("std", objective.time_std))
                     if value is not None}
    sampler = objective.time_sampler
    if sampler == "uniform" or (sampler is None and default_time_sampler(objective.name)[0] == "uniform"):
        time_settings = {}
    return make_objective(objective.name, sigma=objective.sigma, reg=objective.reg, class_aware=objective.class_aware,
                          time_sampler=sampler, ot_solver=objective.ot_solver,
                          flow_map_share=objective.flow_map_share, flow_map_velocity=objective.flow_map_velocity,
                          flow_map_guidance=objective.flow_map_guidance,
                          flow_map_weight_power=objective.flow_map_weight_power,
                          flow_map_pairing=objective.flow_map_pairing, **time_settings)


def _with_end_time(model: torch.nn.Module):
    """model(x, t, labels[, r=r]) as the objectives call it: f(x, t, r, labels), r None for a plain field."""
    def call(x: torch.Tensor, t: torch.Tensor, r: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor:
        return model(x, t, labels) if r is None else model(x, t, labels, r=r)

    return call


def resolve_precision(name: str, cuda: bool | None = None) -> str:
    """The accelerate precision for `train.mixed_precision`: "auto" is "bf16" where the device has native bf16
    kernels (a CUDA GPU that supports it; on CPU, oneDNN's bf16 support: AVX512-BF16 or AMX) and "no" elsewhere,
    where emulated bf16 would be slower than float32. Other names pass through."""
    if name != "auto":
        return name
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return "bf16" if native_bf16(torch.device("cuda" if cuda else "cpu")) else "no"


def make_accelerator(config: Config) -> Accelerator:
    """The run's Accelerator: CPU (gloo) without a GPU, precision from the config, FSDP when launched with it.

    accelerate keeps one precision per process: a training before this one in the process (the demo's model in
    bf16, then its flow map in float32) is forgotten, the process group kept."""
    precision = resolve_precision(config.train.mixed_precision)
    if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        AcceleratorState._reset_state()
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        log_with=[t for t in config.log.trackers if t != "csv"] or None,
        project_dir=config.output_dir,
    )


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the model is sharded with FSDP2 (accelerate's FSDP plugin, fsdp_version 2).

    Raises:
        LatentflowError: FSDP version 1, which the EMA and checkpoints here do not handle.
    """
    if accelerator.distributed_type != DistributedType.FSDP:
        return False
    if not accelerator.is_fsdp2:
        raise LatentflowError("FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate config "
                              "(configs/accelerate/fsdp_8gpu.yaml)")
    return True


def check_same_model(saved: dict[str, Any], built: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume `checkpoint` (model settings `saved`) into a model built with other settings (`built`),
    naming each differing setting, where torch would raise its missing/unexpected state-dict keys or shape
    mismatches (or, for a setting without weights, resume a different model silently)."""
    def plain(config: dict[str, Any]) -> dict[str, Any]:
        return json.loads(json.dumps({key: value for key, value in config.items()
                                      if key == "_class_name" or not key.startswith("_")}, default=list))

    saved, built = plain(saved), plain(built)
    differing = {key: (saved[key], built.get(key)) for key in sorted(saved)  # a key it lacks: an older version's
                 if saved[key] != built.get(key)}
    if differing:
        listed = ", ".join(f"{key} {had!r} (this config: {has!r})" for key, (had, has) in differing.items())
        raise LatentflowError(f"checkpoint {checkpoint} holds a model with {listed}; resume with the run's own "
                              f"model settings ({checkpoint.parent.parent / ckpt.CONFIG_FILE}) or train a new "
                              f"run in another output_dir")


def check_same_task(run_config: Path, config: Config, checkpoint: Path) -> None:
    """Refuse to resume `checkpoint` with settings that change what its model computes: what it predicts (velocity,
    noise, a flow map's average velocity: its objective) or the latents' scale (`data.normalize`), as the run's
    saved config (`run_config`, when there is one) records them. Other settings (lr, steps, pairing) may change."""
    if not run_config.is_file():
        return
    import yaml

    saved = yaml.safe_load(run_config.read_text()) or {}  # read as YAML: a config of an older version may not load
    objective = (saved.get("objective") or {}).get("name", config.objective.name)
    normalize = (saved.get("data") or {}).get("normalize", config.data.normalize)
    changes = []
    if make_objective(objective).prediction != make_objective(config.objective.name).prediction:
        changes.append(f"objective.name {objective!r} (this config: {config.objective.name!r})")
    if normalize != config.data.normalize:
        changes.append(f"data.normalize {normalize!r} (this config: {config.data.normalize!r})")
    if changes:
        raise LatentflowError(f"checkpoint {checkpoint} was trained with {', '.join(changes)}, which changes what "
                              f"its model computes; resume with the run's settings ({run_config}) or start a new "
                              f"run from these weights with --init")


class Trainer:
    """Everything for one training job; see the module docstring.

    Args:
        config: the validated run configuration.
        accelerator: an existing Accelerator (default: one built from the config).
    """

    def __init__(self, config: Config, accelerator: Accelerator | None = None) -> None:
        self.config = config
        self.accelerator = accelerator or make_accelerator(config)
        validate_config(config, self.accelerator.num_processes)
        share_cpu_threads(self.accelerator.device, self.accelerator.num_processes)
        self.output_dir = Path(config.output_dir)
        self.cache = _open_cache(config.data.cache)
        check_coupling(config, self.cache)
        accelerator = self.accelerator
        part = (accelerator.process_index, accelerator.num_processes, accelerator.device)
        sharded = config.objective.ot_dataset_on == "sharded"  # each process reads its part of the points alone
        self.dataset_cells = dataset_cells_for(config, self.cache, part if sharded else None)
        if self.dataset_cells is not None and config.objective.ot_dataset_on == "device":
            self.dataset_cells = self.dataset_cells.to(self.accelerator.device, config.objective.ot_screen)
        self.num_classes = int(self.cache.num_classes)
        self.micro_batch = config.data.batch_size // (self.accelerator.num_processes * config.optim.grad_accumulation)
        self.objective: Objective = objective_from_config(config.objective)
        self.state = TrainState(data_streams=config.data.streams or self.accelerator.num_processes,
                                cache_fingerprint=cache_fingerprint(self.cache))
        self.layout()  # refuse a batch the streams cannot split before any work
        self._build_model()

    # ----------------------------------------------------------------- setup
    def _build_model(self) -> None:
        config, cache_shape = self.config, tuple(self.cache.latent_shape)
        flow_map = config.objective.name in FLOW_MAP_OBJECTIVES
        initial = load_initial_model(config.train.init) if config.train.init else None
        if initial is None:
            name = config.model.name
            settings = {"in_channels": cache_shape[0], "sample_size": cache_shape[1], "num_classes": self.num_classes,
                        **config.model.settings}
            if flow_map:
                settings.update(new_flow_map_settings(config.model.settings))
        else:
            check_same_latents(initial, self.cache.manifest, config.data.normalize, config.data.cache)
            name, settings = initial.class_name.lower(), merged_settings(initial, config.model.settings, flow_map)
            config.model.name, config.model.settings = name, settings  # the run's saved config names the model
        check_model_matches_cache(settings, cache_shape, self.num_classes, config.data.cache,
                                  initial.source if initial else "model.settings")
        set_seed(config.train.seed)
        model = make_model(name, **settings)
        if initial is not None:
            load_initial_weights(model, initial)
        self.teacher = self._teacher(initial)
        if config.model.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.ema = EMA(model, config.train.ema_decay, config.train.ema_warmup)
        optimizer = make_adamw(model, config.optim, fused_on_cpu=self.accelerator.device.type == "cpu")
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if is_sharded(self.accelerator):  # FSDP2: each process averages its own shards
            self.ema.shard(self.unwrapped, keep_full=self.accelerator.is_main_process)
        if self.ema.model is not None:
            self.ema.model.to(self.accelerator.device)
        self.forward = torch.compile(self.model) if config.model.compile else self.model
        self.models = TrainingModels(student=_with_end_time(self.forward), tangent=_with_end_time(self.unwrapped),
                                     teacher=None if self.teacher is None else _with_end_time(self.teacher),
                                     null_class=self.num_classes if self.num_classes else None)

    def _teacher(self, initial: InitialModel | None) -> torch.nn.Module | None:
        """The frozen start model when a flow map learns from its velocity (objective.flow_map_velocity teacher)."""
        objective = self.config.objective
        if objective.name not in FLOW_MAP_OBJECTIVES or objective.flow_map_velocity != "teacher":
            return None
        if initial is None:
            raise LatentflowError("objective.flow_map_velocity 'teacher' learns from the velocity of the run given "
                                  "with --init (train.init); give one, or use flow_map_velocity 'data'")
        teacher = initial.model.to(self.accelerator.device).requires_grad_(False)
        return teacher.eval()

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The bare model (no DDP / compile wrappers)."""
        return self.accelerator.unwrap_model(self.model)

    def layout(self) -> StepLayout:
        """This process's rows of each global batch, from the run's data streams (`state.data_streams`)."""
        from latentflow.data.elastic import StepLayout

        return StepLayout(self.config.data.batch_size, self.state.data_streams, self.accelerator.process_index,
                          self.accelerator.num_processes, self.config.optim.grad_accumulation)

    def steps(self) -> Iterator[StepBatch]:
        """Endless iterator over this process's data of each optimizer step (`latentflow.data.elastic`).

        Starts at the data position of `self.state.step`, which is global: a run resumed on another number of
        processes trains on the samples an uninterrupted run would have.
        """
        from latentflow.data.elastic import make_step_loader

        config = self.config
        transform = PairingTransform(
            self.objective, config.train.seed, self.accelerator.process_index, self.num_classes,
            config.objective.label_dropout, pair=self._pairs_in_loader(), keep_endpoints=False,
            stored_noise=config.objective.coupling == "stored",
            dataset_cells=self.dataset_cells if self._pairs_in_loader() else None,
        )
        return make_step_loader(
            self.cache, self.layout(), seed=config.train.seed, start_step=self.state.step,
            shuffle_buffer=config.data.shuffle_buffer, sample_posterior=config.data.sample_posterior,
            random_flip=config.data.random_flip, normalize=config.data.normalize, in_memory=config.data.in_memory,
            num_workers=config.data.num_workers, batch_transform=transform,
            pin_memory=self.accelerator.device.type == "cuda",
        )

    def batches(self) -> Iterator[list[TrainingBatch | dict[str, Any]]]:
        """Endless iterator over optimizer steps, each a list of `grad_accumulation` micro-batches (see `steps`)."""
        return (step.micro_batches for step in self.steps())

    # ------------------------------------------------------------------ step
    def _pairs_in_loader(self) -> bool:
        """Whether the loader workers pair noise with data (else the step does: global OT, or dataset OT on the
        training device)."""
        objective = self.config.objective
        return objective.ot_scope == "local" or (objective.ot_scope == "dataset" and objective.ot_dataset_on ==
                                                 "loader")

    def _to_training_batch(self, micro: TrainingBatch | dict[str, Any], position: int) -> tuple[TrainingBatch,
                                                                                                float | None]:
        """Move a micro-batch to the device; in global OT mode pair it across processes first, in dataset OT
        mode on the device against the whole cache.

        `position` (the micro-batch's index in the run) seeds the plan identically on every process.
        """
        device = self.accelerator.device
        if isinstance(micro, TrainingBatch):
            return micro.to(device, non_blocking=True), micro.ot_cost
        labels = micro["labels"].to(device) if micro.get("labels") is not None else None
        if self.dataset_cells is not None:
            return self._pair_with_dataset(micro, labels)
        shared = torch.Generator().manual_seed(seed_for(self.config.train.seed, position, 2))
        result = global_ot_pairing(
            micro["latents"].to(device), labels, self.objective.coupling, self.accelerator.gather,
            self.accelerator.process_index, torch.Generator().manual_seed(micro["seed"]), shared,
        )
        generator = torch.Generator().manual_seed(micro["seed"] + 1)
        batch = self.objective.prepare_paired(result.pairing, generator)
        batch.labels = drop_labels(batch.labels, self.config.objective.label_dropout, self.num_classes, generator)
        batch.x0 = batch.x1 = None  # the step needs only x_t, t, target and labels
        return batch.to(device), result.global_cost

    def _pair_with_dataset(self, micro: dict[str, Any], labels: torch.Tensor | None) -> tuple[TrainingBatch, float]:
        """Dataset OT on the training device: fresh noise from the micro-batch's seed, each row paired with its
        optimal cached latent by one chunked matrix product against the whole cache."""
        from latentflow.data.potential import CellShard

        generator = torch.Generator().manual_seed(micro["seed"])
        x0 = torch.randn(micro["latents"].shape, generator=generator).to(self.accelerator.device)
        if isinstance(self.dataset_cells, CellShard):  # its own Gumbel stream: the step's draws stay the same
            gumbel = torch.Generator().manual_seed(seed_for(micro["seed"], 3))
            pairing = sharded_dataset_pairing(self.dataset_cells, x0, labels, self.accelerator.gather,
                                              lambda t: self.accelerator.reduce(t, "sum"),
                                              self.accelerator.process_index, gumbel)
            batch = paired_batch(pairing, self.objective, self.config.objective.label_dropout, self.num_classes,
                                 generator)
        else:
            batch = pair_with_dataset(self.dataset_cells, x0, labels, self.objective,
                                      self.config.objective.label_dropout, self.num_classes, generator)
        batch.x0 = batch.x1 = None  # the step needs only x_t, t, target and labels
        return batch, batch.ot_cost

    def train_step(self, micro_batches: list[TrainingBatch | dict[str, Any]]) -> StepResult:
        """One optimizer step over `grad_accumulation` micro-batches, with the non-finite guard."""
        accelerator, config = self.accelerator, self.config
        lr = learning_rate(self.state.step, config.optim, config.train.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        losses, errors, costs = [], [], []
        for index, micro in enumerate(micro_batches):
            batch, cost = self._to_training_batch(micro, self.state.step * len(micro_batches) + index)
            costs.append(cost)
            last = index == len(micro_batches) - 1
            with (nullcontext() if last else accelerator.no_sync(self.model)), accelerator.autocast():
                loss, error = self.objective.loss_and_error(self.models, batch)
                loss = loss.mean()
            accelerator.backward(loss / len(micro_batches))
            losses.append(loss.detach().float())
            if error is not None:
                errors.append(error.mean().float())
        loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean")
        error = float(accelerator.reduce(torch.stack(errors).mean(), reduction="mean")) if errors else None
        max_norm = config.optim.grad_clip if config.optim.grad_clip > 0 else float("inf")
        grad_norm = accelerator.clip_grad_norm_(self.model.parameters(), max_norm)
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(torch.as_tensor(grad_norm)))
        self._apply_or_skip(finite)
        ot_cost = None if costs[0] is None else float(sum(costs) / len(costs))
        if ot_cost is not None and accelerator.num_processes > 1:  # over every process's pairs, as the loss is
            mean = accelerator.reduce(torch.tensor(ot_cost, dtype=torch.float64, device=accelerator.device), "mean")
            ot_cost = float(mean)
        return StepResult(float(loss), float(grad_norm), not finite, lr, ot_cost, error)

    def _apply_or_skip(self, finite: bool) -> None:
        """Step optimizer and EMA, or skip a non-finite step and stop after too many in a row."""
        if finite:
            self.optimizer.step()
            self.ema.update(self.unwrapped)
            self.state.nonfinite_in_a_row = 0
        else:
            if self.accelerator.scaler is not None:
                self.accelerator.scaler.update()  # fp16: lower the loss scale as a skipped scaler step would
            self.state.nonfinite_in_a_row += 1
            self.state.skipped_steps += 1
            self.accelerator.print(
                f"step {self.state.step + 1}: loss or gradients not finite, step skipped "
                f"({self.state.nonfinite_in_a_row} in a row)"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        limit = self.config.train.max_nonfinite_steps
        if self.state.nonfinite_in_a_row >= limit:
            raise LatentflowError(
                f"training stopped at step {self.state.step}: {limit} steps in a row had a non-finite loss or "
                f"gradient norm (train.max_nonfinite_steps={limit}); lower optim.lr, enable optim.grad_clip, use "
                f"bf16 instead of fp16, or check the cache {self.config.data.cache} for NaN latents"
            )

    # ----------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint at the current step atomically; returns its folder on the main process.

        Raises:
            DiskFullError: the disk filled up; the unfinished checkpoint is removed, older ones stay.
        """
        accelerator, step = self.accelerator, self.state.step
        temporary = ckpt.temporary_dir(self.output_dir, step)
        if accelerator.is_main_process and temporary.exists():
            shutil.rmtree(temporary)
        accelerator.wait_for_everyone()
        with writing(temporary.parent, f"checkpoint {ckpt.checkpoint_name(step)}", lambda: tree_size(temporary),
                     lambda: self._drop_unfinished(temporary), partial=True):
            final = self._write_checkpoint(temporary, step)
        accelerator.wait_for_everyone()
        return final

    def _drop_unfinished(self, temporary: Path) -> None:
        if self.accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)

    def _write_checkpoint(self, temporary: Path, step: int) -> Path | None:
        """accelerate's state (every process), then the EMA, counters and model config (main), then publish."""
        accelerator = self.accelerator
        accelerator.save_state(str(temporary))
        ema_state = self.ema.state_dict()  # sharded (FSDP): gathered by every process
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return None
        save_file(ema_state, temporary / EMA_FILE)
        write_text_atomic(temporary / STATE_FILE, json.dumps(self.state.__dict__))
        write_text_atomic(temporary / MODEL_CONFIG_FILE, json.dumps(dict(self.unwrapped.config), default=list))
        return ckpt.publish(temporary, step, self.config.checkpoint.keep)

    def load_checkpoint(self, which: str) -> ckpt.CheckpointInfo:
        """Restore model, optimizer, RNG, EMA and counters from 'latest' or a checkpoint folder."""
        info = ckpt.find_checkpoint(self.output_dir, which)
        for problem in info.skipped:
            self.accelerator.print(f"warning: {problem}; falling back to an older checkpoint")
        model_config = json.loads((info.path / MODEL_CONFIG_FILE).read_text())
        check_model_matches_cache(model_config, tuple(self.cache.latent_shape), self.num_classes,
                                  self.config.data.cache, f"checkpoint {info.path}")
        check_same_model(model_config, dict(self.unwrapped.config), info.path)
        check_same_task(info.path.parent.parent / ckpt.CONFIG_FILE, self.config, info.path)
        self._check_same_cache(info.path)  # all three before anything loads
        self.accelerator.load_state(str(info.path))
        # read on the CPU and copied into the EMA's tensors: safetensors refuses the 'cpu:0' of a gloo process
        self.ema.load_state_dict(load_file(info.path / EMA_FILE))
        self.state = self._saved_state(info.path)
        self.layout()  # the checkpoint's streams must split the batch over this run's processes
        return info

    def _saved_state(self, folder: Path) -> TrainState:
        """The checkpoint's counters and data streams (before data_streams was saved: its process count)."""
        saved = json.loads((folder / STATE_FILE).read_text())
        saved.setdefault("data_streams", len(list(folder.glob("random_states_*.pkl"))) or 1)
        wanted = self.config.data.streams
        if wanted and wanted != saved["data_streams"]:
            raise LatentflowError(
                f"data.streams {wanted} differs from checkpoint {folder}'s {saved['data_streams']}: the data "
                f"position would not carry over; set data.streams: {saved['data_streams']} or leave it unset")
        return TrainState(**{**saved, "cache_fingerprint": self.state.cache_fingerprint})

    def _check_same_cache(self, folder: Path) -> None:
        """Refuse a checkpoint that recorded another cache's fingerprint than data.cache's."""
        trained_on = json.loads((folder / STATE_FILE).read_text()).get("cache_fingerprint")
        if trained_on is not None and trained_on != self.state.cache_fingerprint:
            raise LatentflowError(
                f"checkpoint {folder} was trained on another cache than data.cache {self.config.data.cache} (or on "
                f"it before it was re-encoded or extended: its manifest differs), so neither the data position nor "
                f"the latents' normalisation would carry over; resume on the cache it trained on, or start a new "
                f"run from these weights with --init")

    # --------------------------------------------------------------- samples
    def sample_latents(self) -> tuple[torch.Tensor, float | None]:
        """Fixed-noise samples from the EMA model: (N, C, h, w) latents in the model's space and path straightness."""
        return preview_latents(self.ema.model, self.config.sample, tuple(self.cache.latent_shape), self.num_classes,
                               self.objective.prediction, self.accelerator.device)

    def write_samples(self, vae) -> float | None:
        """Decode the fixed-noise samples to OUT/samples/step-XXXXXX.png; returns path straightness."""
        latents, straightness = self.sample_latents()
        normalized = self.config.data.normalize
        write_preview(vae, latents, self.cache.channel_mean if normalized else None,
                      self.cache.channel_std if normalized else None,
                      self.output_dir / "samples" / f"step-{self.state.step:06d}.png")
        return straightness

    # ------------------------------------------------------------------- fit
    def fit(self, resume: str | None = None) -> FitResult:
        """Train to `train.max_steps`, resuming from 'latest' or a checkpoint folder if given.

        Raises:
            LatentflowError: another live trainer writes to `output_dir` (before any work).
        """
        with folder_lock(self.output_dir, "latentflow train", "another output_dir",
                         main=self.accelerator.is_main_process, share=self._from_main):
            return self._fit(resume)

    def _from_main(self, value: Any) -> Any:
        """The main process's `value`, on every process."""
        if self.accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def _fit(self, resume: str | None) -> FitResult:
        accelerator, config = self.accelerator, self.config
        if not resume:  # the main process looks (output_dir may be its own disk), every process raises
            problem = None
            if accelerator.is_main_process:
                try:
                    ckpt.check_fresh_output(self.output_dir)
                except LatentflowError as error:
                    problem = str(error)
            if (problem := self._from_main(problem)) is not None:
                raise LatentflowError(problem)
        if resume:
            info = self.load_checkpoint(resume)
            accelerator.print(f"resumed from {info.path} at step {info.step}")
            guide_step = config.train.guide_step
            if guide_step is not None and info.step >= guide_step and not (self.output_dir / GUIDE_DIR).is_dir():
                accelerator.print(f"train.guide_step={guide_step} is behind this resume (step {info.step}) and "
                                  f"{self.output_dir / GUIDE_DIR} was not written: the run will have no guide; "
                                  f"export with --guide RUN_OR_PIPE to guide with another model")
        vae = load_preview_vae(accelerator, config.sample.vae, self.cache.vae_identity) if config.sample.every else None
        csv_log = None
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.output_dir / ckpt.CONFIG_FILE)
            # from the start, so that --init from any of the run's checkpoints can check its latents
            write_json_atomic(self.output_dir / ckpt.CACHE_MANIFEST_FILE, self.cache.manifest, indent=1)
            csv_log = CsvLog(self.output_dir / LOG_FILE, self.state.step if resume else None)
        if accelerator.log_with:
            accelerator.init_trackers(config.log.project, config=flat_config(config))
        result = self._loop(csv_log, vae)
        self.export()
        accelerator.end_training()
        return result

    def _loop(self, csv_log: CsvLog | None, vae) -> FitResult:
        accelerator, config = self.accelerator, self.config
        result = FitResult(step=self.state.step)
        progress = tqdm(total=config.train.max_steps, initial=self.state.step, desc="train",
                        disable=not (accelerator.is_main_process and config.log.progress_bar))
        steps, record = self.steps(), self._key_record()
        busy, steps_since = 0.0, 0  # seconds spent fetching and stepping since the last log row
        while self.state.step < config.train.max_steps:
            tick = time.perf_counter()
            step_batch = next(steps)
            step_result = self.train_step(step_batch.micro_batches)
            busy += time.perf_counter() - tick
            if record is not None:
                record.append(step_batch.step, step_batch.keys)
            result.losses.append(step_result.loss)
            steps_since += 1
            progress.update(1)
            progress.set_postfix(loss=f"{step_result.loss:.4f}",
                                 **({} if step_result.error is None else {"error": f"{step_result.error:.4g}"}))
            step = self.state.step
            straightness = None
            if config.sample.every and (step % config.sample.every == 0 or step == config.train.max_steps):
                self.ema.gather()  # sharded: every process takes part; the main one samples
                straightness = self.write_samples(vae) if vae is not None else None
            if step % config.log.every == 0 or step == config.train.max_steps:
                row = {**step_result.__dict__, "step": step, "skipped_steps": self.state.skipped_steps,
                       "images_per_s": steps_since * config.data.batch_size / max(busy, 1e-9),
                       "straightness": straightness}
                row.pop("skipped")
                self._log(row, csv_log)
                busy, steps_since = 0.0, 0
            if step == config.train.guide_step:
                self.write_model(GUIDE_DIR)  # before the step's checkpoint: a checkpoint past it implies the guide
            if (config.checkpoint.every and step % config.checkpoint.every == 0) or step == config.train.max_steps:
                self.save_checkpoint()
        progress.close()
        result.step = self.state.step
        return result

    def _key_record(self) -> KeyRecord | None:
        """OUT/keys/ when log.record_keys is on, cut back to the current step by the main process first."""
        if not self.config.log.record_keys:
            return None
        folder = self.output_dir / "keys"
        if self.accelerator.is_main_process:
            KeyRecord.cut(folder, self.state.step)
        self.accelerator.wait_for_everyone()
        return KeyRecord(folder, self.accelerator.process_index, self.accelerator.num_processes)

    def _log(self, row: dict[str, Any], csv_log: CsvLog | None) -> None:
        if csv_log is not None:
            csv_log.append(row)
        if self.accelerator.log_with:
            self.accelerator.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=row["step"])

    def write_model(self, name: str) -> Path | None:
        """Write the EMA model to OUT/`name` (diffusers format, replaced atomically); the main process's path."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        self.ema.gather()  # sharded: the full EMA weights, assembled on the main process
        if not accelerator.is_main_process:
            return None
        return write_folder_atomic(self.output_dir / name, lambda folder: self.ema.model.save_pretrained(folder))

    def export(self) -> Path | None:
        """Write the EMA model to OUT/model (the cache manifest beside it is written when the run starts)."""
        return self.write_model(ckpt.MODEL_DIR)


def train(config: Config, resume: str | None = None) -> FitResult:
    """Build a Trainer for `config` and run it (the entry point of the CLI and scripts/train.py)."""
    return Trainer(config).fit(resume=resume)
