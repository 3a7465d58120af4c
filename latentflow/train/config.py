"""Training configuration: dataclasses loaded from YAML, validated, with dotted overrides.

A config file mirrors `Config`: top-level sections `data`, `model`, `objective`, `optim`,
`train`, `checkpoint`, `sample` and `log`, plus `output_dir`. Unknown keys and values of
the wrong type are `LatentflowError`s that list the valid keys or the expected type.
`--set train.max_steps=100` style overrides are parsed as YAML values.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml

from latentflow.data.potential import MAX_IMBALANCE
from latentflow.errors import LatentflowError
from latentflow.flow.couplings import EXACT_SOLVERS
from latentflow.flow.flow_maps import PAPER_DISTINCT_SHARE
from latentflow.flow.guidance import check_guidance_scale
from latentflow.flow.objectives import (
    FLOW_MAP_PAIRINGS,
    FLOW_MAP_VELOCITIES,
    OBJECTIVES,
    OT_OBJECTIVES,
    make_objective,
    pairs_by_ot,
)
from latentflow.flow.solvers import check_solver
from latentflow.flow.time_samplers import TIME_SAMPLERS
from latentflow.io import write_text_atomic

# the config's choices are the registries' names (one home for each list of names)
ObjectiveName = Literal[tuple(OBJECTIVES)]
ExactSolverName = Literal[tuple(EXACT_SOLVERS)]
TimeSamplerName = Literal[tuple(TIME_SAMPLERS)]
FlowMapVelocity = Literal[tuple(FLOW_MAP_VELOCITIES)]
FlowMapPairing = Literal[tuple(FLOW_MAP_PAIRINGS)]


@dataclass
class DataConfig:
    """Where the latents come from and how they are batched.

    `batch_size` is the global batch: per-process micro-batch x processes x grad accumulation.
    `streams`: the data streams K each global batch is drawn from, batch_size/K samples each
    (`latentflow.data.elastic`); None takes the process count of the run's first start. Checkpoints keep K, so
    a run resumes on any process count with the same sample order; each process reads the streams its rows
    come from (its own when processes == K).
    """

    cache: str = ""
    batch_size: int = 256
    num_workers: int = 0
    shuffle_buffer: int = 1000
    sample_posterior: bool = True
    random_flip: bool = True
    normalize: bool = False
    in_memory: bool = False
    streams: int | None = None


@dataclass
class ModelConfig:
    """A preset or class name for `latentflow.models.make_model`, plus free constructor settings."""

    name: str = "DiT-S/2"
    settings: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = False
    compile: bool = False


@dataclass
class ObjectiveConfig:
    """The objective (`latentflow.flow.objectives.make_objective`) and how noise is paired.

    `ot_scope`: 'local' pairs each process's batch in its loader workers; 'global' gathers
    noise and latents from all processes and solves one plan for the global batch; 'dataset' pairs every noise
    draw with its optimal latent of the whole cache, through the potential `ot_potential` that `latentflow
    ot-fit` stored in CACHE/ot/ (any flow-matching objective: rf, cfm and otcfm take the path of their name,
    meanflow its flow map), refusing one whose balance excess is above `ot_max_imbalance`
    (`latentflow.data.potential.MAX_IMBALANCE`); `ot_dataset_on` 'loader' pairs in the loader workers (small
    caches, CPU), 'device' in the step on the training device (large caches on GPUs: one chunked matrix product
    against every cached latent per batch), 'sharded' there too with each process holding 1/W of the points (the
    global batch's noise is scored by every process against its share and the best of the shares wins: the same
    pairs as 'device' for 1/W of its memory; `latentflow.train.pairing.sharded_dataset_pairing`); `ot_screen`
    runs that product's first pass in bfloat16 where the device has bf16 matrix units, with a certified float32
    rescoring (`latentflow.flow.screening`: the same pairs, faster; false: float32 throughout).
    `ot_null_potential`: with a class-aware `ot_potential`, a class-blind potential of the same cache that the
    rows whose label is dropped pair with instead (the null class, classifier-free guidance's unconditional branch,
    then learns the OT flow to the whole cache, not the mixture of the classes' flows); None: they keep the pair
    drawn for their class (`latentflow.train.pairing.pair_with_dataset`).
    `label_dropout`: the fraction of labels replaced by the null class (classifier-free guidance).
    `coupling`: 'sampled' draws fresh noise for each batch; 'stored' trains on the (noise, endpoint) pairs of a
    couplings cache from `latentflow reflow` as they are (reflow, e.g. with rf; no OT objective, no flips).
    `name`: one of `latentflow.flow.objectives.OBJECTIVES`; `ot_solver`: the exact OT solver of otcfm (one of
    `latentflow.flow.couplings.EXACT_SOLVERS`); `time_sampler`: None is the objective's default (uniform; for
    meanflow the paper's logit-normal, mean 0.4 and std 1 in our convention); `time_mean`, `time_std`: the
    logit-normal sampler's (None: the objective's default, else 0 and 1).
    meanflow (`latentflow.flow.objectives.MeanFlowObjective`): `flow_map_share` the share of (t, r) pairs with
    r != t (paper: 0.25); `flow_map_velocity` 'data' (x1 - x0, the paper) or 'teacher' (the --init run's field);
    `flow_map_guidance` the guidance scale baked into the learnt velocity (sample it with guidance 1);
    `flow_map_weight_power` the adaptive loss weight's power (paper: 1; 0 is plain MSE); `flow_map_pairing`
    'independent' (the paper) or 'ot' (exact minibatch OT as otcfm's, with `ot_solver`, `class_aware` and
    `ot_scope` local or global; `ot_scope: dataset` pairs over the whole cache whatever this says).
    """

    name: ObjectiveName = "otcfm"
    sigma: float | None = None
    reg: float = 0.05
    class_aware: bool = False
    ot_solver: ExactSolverName = "assignment"
    time_sampler: TimeSamplerName | None = None
    time_mean: float | None = None
    time_std: float | None = None
    flow_map_share: float = PAPER_DISTINCT_SHARE
    flow_map_velocity: FlowMapVelocity = "data"
    flow_map_guidance: float = 1.0
    flow_map_weight_power: float = 1.0
    flow_map_pairing: FlowMapPairing = "independent"
    ot_scope: Literal["local", "global", "dataset"] = "local"
    ot_potential: str = "potential"
    ot_null_potential: str | None = None
    ot_max_imbalance: float = MAX_IMBALANCE
    ot_dataset_on: Literal["loader", "device", "sharded"] = "loader"
    ot_screen: bool = True
    label_dropout: float = 0.1
    coupling: Literal["sampled", "stored"] = "sampled"


@dataclass
class OptimConfig:
    """AdamW with linear warmup then constant or cosine learning rate; `grad_clip` 0 disables clipping."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0
    grad_accumulation: int = 1


@dataclass
class TrainConfig:
    """Length, precision, EMA, and the non-finite guard (stop after `max_nonfinite_steps` in a row).

    `ema_warmup` uses decay min(ema_decay, (1 + n) / (10 + n)) after n updates (off = the DiT recipe).
    `init`: a finished training run or pipeline folder whose EMA weights (and model settings) start this run
    (`latentflow train --init`), e.g. to fine-tune a flow map (objective meanflow) from a plain run.
    `guide_step`: also write the EMA weights at this step to OUT/guide: the weaker model whose null-class prediction
    is the unconditional branch of guided sampling (export puts it in the pipeline as its `guide`).
    `mixed_precision: auto` is bf16 autocast where the device computes bf16 natively (a CUDA GPU with bf16; a CPU
    whose oneDNN has bf16 kernels, e.g. AVX512-BF16 or AMX), else full precision (`train.resolve_precision`).
    """

    max_steps: int = 1000
    seed: int = 0
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    max_nonfinite_steps: int = 20
    init: str | None = None
    guide_step: int | None = None


@dataclass
class CheckpointConfig:
    """Save every `every` optimizer steps (0: only at the end), keep the newest `keep`."""

    every: int = 1000
    keep: int = 3


@dataclass
class SampleConfig:
    """Fixed-noise sample grids from the EMA weights every `every` steps (0: never).

    `vae` overrides the VAE named in the cache manifest (a hub id or local folder);
    `guidance_scale` > 1 applies classifier-free guidance (class-conditional models).
    """

    every: int = 1000
    num_images: int = 16
    solver: str = "euler"
    steps: int = 32
    guidance_scale: float = 1.0
    seed: int = 0
    vae: str | None = None


@dataclass
class LogConfig:
    """Metrics every `every` steps to OUT/log.csv and the accelerate trackers.

    `record_keys`: each process appends the keys of the samples it trains on to OUT/keys/rank-R.jsonl, one
    line per step (a debugging record: tests check with it that every sample is drawn once across a resume).
    """

    every: int = 10
    trackers: list[str] = field(default_factory=lambda: ["tensorboard"])
    project: str = "latentflow"
    progress_bar: bool = True
    record_keys: bool = False


@dataclass
class Config:
    """A full training run."""

    output_dir: str = "runs/latentflow"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against `annotation` and return it converted (int -> float, nested dataclasses)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        return _from_dict(annotation, value, where)
    if annotation is Any:
        return value
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted no, off, yes or on as a boolean
            value = next((a for a in args if isinstance(a, str) and yaml.safe_load(a) is value), value)
        if value not in args:
            raise LatentflowError(f"{where}: {value!r} is not valid; expected {_type_name(annotation)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            return _convert(value, option, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise LatentflowError(f"{where}: expected a list of {_type_name(args[0])}, got {value!r}")
        return [_convert(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise LatentflowError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-4" as a string
        except ValueError:
            pass
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise LatentflowError(f"{where}: expected {_type_name(annotation)}, got {type(value).__name__} {value!r}")
    return value


def _from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise LatentflowError(f"{where or 'config'}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        valid = ", ".join(f"{name} ({_type_name(hints[name])})" for name in names)
        raise LatentflowError(f"{where or 'config'}: unknown key(s) {unknown}; valid keys: {valid}")
    prefix = f"{where}." if where else ""
    return cls(**{key: _convert(value, hints[key], prefix + key) for key, value in data.items()})


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Build and type-check a `Config` from nested dicts (as read from YAML)."""
    try:
        return _from_dict(Config, data, "")
    except LatentflowError as error:
        raise LatentflowError(f"{source}: {error}") from None


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML) to nested dicts, in place."""
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key.strip():
            raise LatentflowError(f"override {override!r} must look like section.key=value, e.g. train.max_steps=100")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise LatentflowError(f"override {override!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_yaml(text, f"override {override!r}") if text.strip() else ""
    return data


def _parse_yaml(text: str, where: str) -> Any:
    """`text` parsed as YAML; a syntax error is one line naming `where` and the error's place."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        place = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise LatentflowError(f"{where}: not valid YAML ({problem}{place})") from None


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config (or start from defaults when `path` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise LatentflowError(f"config file {path} is a folder; give a YAML file, e.g. configs/flowers64_demo.yaml")
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = _parse_yaml(path.read_text(), str(path)) or {}
        if not isinstance(data, dict):
            raise LatentflowError(f"{path}: expected a mapping of sections at the top level")
    apply_overrides(data, overrides)
    return config_from_dict(data, str(path) if path else "config")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise LatentflowError(message)


def validate_config(config: Config, num_processes: int = 1) -> None:
    """Refuse settings that cannot work, e.g. a batch that does not split over the processes."""
    data, optim, objective = config.data, config.optim, config.objective
    _require(bool(data.cache), "data.cache: set the latent cache folder (written by `latentflow encode`)")
    split = num_processes * optim.grad_accumulation
    _require(
        data.batch_size >= split and data.batch_size % split == 0,
        f"data.batch_size {data.batch_size} must be a positive multiple of processes ({num_processes}) x "
        f"optim.grad_accumulation ({optim.grad_accumulation}) = {split}",
    )
    _require(data.streams is None or (data.streams >= 1 and data.batch_size % data.streams == 0),
             f"data.streams must be >= 1 and divide data.batch_size {data.batch_size}, got {data.streams}")
    _require(data.num_workers >= 0 and data.shuffle_buffer >= 0, f"data.num_workers and data.shuffle_buffer must "
             f"be >= 0 (0: none), got {data.num_workers} and {data.shuffle_buffer}")
    _require(config.train.max_steps >= 1, f"train.max_steps must be >= 1, got {config.train.max_steps}")
    _require(optim.lr > 0, f"optim.lr must be > 0, got {optim.lr}")
    _require(optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {optim.weight_decay}")
    for name, seed in (("train.seed", config.train.seed), ("sample.seed", config.sample.seed)):
        _require(0 <= seed < 2**32, f"{name} must be in [0, 2**32), got {seed}")
    _require(len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas),
             f"optim.betas must be two numbers in [0, 1), got {optim.betas}")
    _require(optim.warmup_steps >= 0 and optim.grad_clip >= 0 and optim.grad_accumulation >= 1,
             "optim.warmup_steps and optim.grad_clip must be >= 0, optim.grad_accumulation >= 1")
    _require(0 <= optim.min_lr_ratio <= 1, f"optim.min_lr_ratio must be in [0, 1], got {optim.min_lr_ratio}")
    guide_step = config.train.guide_step
    _require(guide_step is None or 1 <= guide_step < config.train.max_steps,
             f"train.guide_step must be a step in [1, train.max_steps) or null, got {guide_step} (max_steps "
             f"{config.train.max_steps}); lower it, or --set train.guide_step=null for no guide")
    _require(0 <= config.train.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {config.train.ema_decay}")
    _require(config.train.max_nonfinite_steps >= 1, "train.max_nonfinite_steps must be >= 1")
    _require(0 <= objective.label_dropout < 1,
             f"objective.label_dropout must be in [0, 1), got {objective.label_dropout}")
    _require(objective.time_std is None or objective.time_std > 0,
             f"objective.time_std must be > 0, got {objective.time_std}")
    _require(0 <= objective.flow_map_share <= 1,
             f"objective.flow_map_share must be in [0, 1], got {objective.flow_map_share}")
    _require(objective.flow_map_guidance >= 0 and objective.flow_map_weight_power >= 0,
             "objective.flow_map_guidance and objective.flow_map_weight_power must be >= 0")
    by_ot = pairs_by_ot(objective.name, objective.flow_map_pairing)
    _require(objective.ot_scope != "global" or by_ot,
             f"objective.ot_scope 'global' needs an OT objective {list(OT_OBJECTIVES)} (or meanflow with "
             f"flow_map_pairing 'ot'), not {objective.name!r}")
    _check_dataset_scope(config)
    _require(config.checkpoint.every >= 0 and config.checkpoint.keep >= 1,
             "checkpoint.every must be >= 0 and checkpoint.keep >= 1")
    _require(config.sample.every >= 0 and config.sample.num_images >= 1 and config.sample.steps >= 1,
             "sample.every must be >= 0, sample.num_images and sample.steps >= 1")
    _require(config.log.every >= 1, f"log.every must be >= 1, got {config.log.every}")
    _check_sample(config.sample, objective.name)
    unknown_trackers = sorted(set(config.log.trackers) - {"tensorboard", "wandb", "csv"})
    _require(not unknown_trackers, f"log.trackers {unknown_trackers} unknown; choose from tensorboard, wandb, csv")
    stored = objective.coupling == "stored"
    _require(not stored or (not by_ot and objective.ot_scope == "local"),
             f"objective.coupling 'stored' keeps the couplings' pairs, but objective.name {objective.name!r} with "
             f"ot_scope {objective.ot_scope!r} would re-pair them; use objective.name rf, cfm or meanflow "
             f"(flow_map_pairing independent), ot_scope local")
    _require(not stored or not data.random_flip,
             "objective.coupling 'stored': a flipped endpoint is not its stored noise's endpoint; set "
             "data.random_flip: false")


def _check_sample(sample: SampleConfig, objective: str) -> None:
    """Refuse preview settings that would fail only at the first preview, `sample.every` steps in: a solver the
    objective's model cannot be sampled with (a noise model previews with ddim whatever it names), a guidance
    scale that is not a finite number >= 0."""
    prediction = make_objective(objective).prediction
    for name, check in (("solver", lambda: prediction == "noise" or check_solver(sample.solver, prediction)),
                        ("guidance_scale", lambda: check_guidance_scale(sample.guidance_scale))):
        try:
            check()
        except LatentflowError as error:
            raise LatentflowError(f"sample.{name} (objective {objective!r}): {error}") from None


def _check_dataset_scope(config: Config) -> None:
    """`objective.ot_scope: dataset` pairs fresh noise with cached means by a fitted potential: it needs a
    flow-matching objective, sampled noise and the cached means themselves."""
    objective = config.objective
    if objective.ot_scope != "dataset":
        _require(objective.ot_null_potential is None, "objective.ot_null_potential names a potential of the cache, "
                 f"used with ot_scope 'dataset' only (this is {objective.ot_scope!r}); set ot_scope: dataset, or "
                 "leave it unset")
        return
    _require(objective.name != "ddpm", "objective.ot_scope 'dataset' pairs noise with data for a flow; ddpm "
             "draws its noise independently: use rf, cfm, otcfm or meanflow")
    _require(objective.coupling == "sampled", "objective.ot_scope 'dataset' draws its own noise; set "
             "objective.coupling: sampled")
    _require(not config.data.sample_posterior, "objective.ot_scope 'dataset' pairs noise with the cached means "
             "the potential was fitted on; set data.sample_posterior: false")
    _require(objective.ot_max_imbalance > 0, f"objective.ot_max_imbalance must be > 0, got "
             f"{objective.ot_max_imbalance}")
    if objective.ot_null_potential is not None:
        _require(objective.class_aware, "objective.ot_null_potential pairs the null class's rows over the whole "
                 "cache, as a class-blind ot_potential pairs every row already; set objective.class_aware: true "
                 "with a class-aware ot_potential, or leave ot_null_potential unset")
        _require(objective.label_dropout > 0, "objective.ot_null_potential pairs the rows whose label is dropped, "
                 "and objective.label_dropout is 0; raise it, or leave ot_null_potential unset")
        _require(objective.ot_dataset_on != "sharded", "objective.ot_null_potential is not supported with "
                 "ot_dataset_on 'sharded'; use 'loader' or 'device', or leave ot_null_potential unset")


def config_to_dict(config: Config) -> dict[str, Any]:
    """Nested plain dicts (YAML/JSON-safe)."""
    return asdict(config)


def flat_config(config: Config) -> dict[str, Any]:
    """Dotted keys -> scalars (lists and dicts as strings), for tracker hyper-parameters."""
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and key != "settings":
                walk(value, f"{prefix}{key}.")
            elif value is None or isinstance(value, (list, tuple, dict)):
                flat[prefix + key] = str(value)
            else:
                flat[prefix + key] = value

    walk(config_to_dict(config), "")
    return flat


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text_atomic(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))
