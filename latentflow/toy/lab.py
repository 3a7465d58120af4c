"""The 2D lab: train a small MLP field between two point distributions and measure it exactly.

Reproduces the lecture's teaching results: CFM's curved paths against OT-CFM's
straight ones, deterministic against stochastic diffusion sampling, and sample
quality (exact W2) against the number of solver steps; and the few-step methods: a
flow map learnt with MeanFlow (`meanflow`, sampled in K jumps) and 2-rectified flow
(`reflow`: train rf, integrate it into (noise, endpoint) pairs, retrain on them); and dataset-scale OT
(`otcfm-dataset`: a fixed training set of target points, the semidiscrete OT potential fitted over it, and
every Gaussian draw paired with its Laguerre cell's point).
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from latentflow.errors import LatentflowError
from latentflow.flow.assignment import solve_assignment
from latentflow.flow.couplings import IndependentCoupling
from latentflow.flow.metrics import path_straightness, wasserstein2
from latentflow.flow.objectives import (
    OBJECTIVES,
    FlowMatchingObjective,
    Objective,
    TrainingBatch,
    TrainingModels,
    make_objective,
)
from latentflow.flow.semidiscrete import FitSettings, LaguerreCells, PotentialFit, measure_balance, noise_for_step
from latentflow.flow.solvers import SolverOutput, check_solver, ddim_sample, integrate, sample_flow_map
from latentflow.flow.time_samplers import TIME_SAMPLERS
from latentflow.io import save_npy, write_json_atomic
from latentflow.toy.distributions import PointCloud, Sampler, get_distribution
from latentflow.train.optim import cpu_fused_optimizer


@dataclass
class LabSettings:
    """Everything that defines one lab run (saved, resolved, in metrics.json)."""

    source: str = "8gaussians"
    target: str = "moons"
    objective: str = "otcfm"
    steps: int = 5000
    batch_size: int = 256
    nfe: tuple[int, ...] = (1, 2, 4, 8, 100)
    solver: str = "euler"
    seed: int = 0
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    width: int = 64
    eval_samples: int = 2000
    sigma: float | None = None
    reg: float = 0.05
    stochastic_eta: float = 1.0
    workers: int | None = None
    reflow_pairs: int = 20000
    reflow_solver: str = "dopri5"
    dataset_size: int = 2000
    ot_steps: int = 6000
    ot_batch: int = 2048
    ot_lr: float = 0.001
    ot_average_from: float = 0.75
    flow_map_share: float = 0.25
    flow_map_weight_power: float = 1.0
    finetune_steps: int | None = None
    time_sampler: str | None = None
    finite_data: bool = False
    """Every objective trains on the same `dataset_size` fixed target points (otcfm-dataset's training set), as
    from a cache, instead of fresh draws each batch; W2 stays measured on fresh held-out points."""

    def validate(self) -> None:
        """Raise LatentflowError naming the first impossible value."""
        if self.objective not in LAB_OBJECTIVES:
            raise LatentflowError(f"unknown objective {self.objective!r}; choose one of {list(LAB_OBJECTIVES)}")
        if self.reflow_pairs < self.batch_size:
            raise LatentflowError(f"--reflow-pairs must be at least the batch size {self.batch_size}, got "
                                  f"{self.reflow_pairs}")
        if self.steps <= 0:
            raise LatentflowError(f"--steps must be a positive number of training steps, got {self.steps}")
        if self.batch_size <= 1:
            raise LatentflowError(f"--batch-size must be at least 2, got {self.batch_size}")
        if not self.nfe:
            raise LatentflowError("--nfe is empty; give a comma-separated list of step counts such as 1,2,4,8,100")
        if min(self.nfe) <= 0:
            raise LatentflowError(f"--nfe values must be positive step counts, got {list(self.nfe)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise LatentflowError(f"--lr-schedule {self.lr_schedule!r} unknown; choose one of {LR_SCHEDULES}")
        if self.workers is not None and self.workers < 0:
            raise LatentflowError(f"workers must be >= 0 (or None: automatic), got {self.workers}")
        if self.eval_samples <= 1:
            raise LatentflowError(f"--eval-samples must be at least 2, got {self.eval_samples}")
        if self.objective in ("ddpm", "otcfm-dataset") and self.source != "gaussian":
            raise LatentflowError(f"{self.objective} starts from Gaussian noise: use --source gaussian (got "
                                  f"{self.source!r})")
        if not math.isfinite(self.learning_rate) or self.learning_rate <= 0:
            raise LatentflowError(f"--lr must be a finite number > 0, got {self.learning_rate}")
        if self.objective != "ddpm":  # ddpm samples with DDIM; a flow map's paths are drawn with --solver too
            check_solver(self.solver)
        if self.objective in ("reflow", "meanflow-reflow"):
            check_solver(self.reflow_solver)
        if (not 0 <= self.flow_map_share <= 1 or self.flow_map_weight_power < 0
                or (self.finetune_steps is not None and self.finetune_steps < 1)):
            raise LatentflowError(f"--flow-map-share must be in [0, 1], --flow-map-weight-power >= 0 and "
                                  f"--finetune-steps >= 1; got {self.flow_map_share}, {self.flow_map_weight_power}, "
                                  f"{self.finetune_steps}")
        if self.time_sampler is not None and self.time_sampler not in TIME_SAMPLERS:
            raise LatentflowError(f"--time-sampler {self.time_sampler!r} unknown; choose one of "
                                  f"{sorted(TIME_SAMPLERS)}")
        if self.dataset_size < 2:
            raise LatentflowError(f"--dataset-size must be >= 2, got {self.dataset_size}")
        self.fit_settings().validate()

    def fit_settings(self) -> FitSettings:
        """otcfm-dataset's potential fit."""
        return FitSettings(steps=self.ot_steps, batch_size=self.ot_batch, lr=self.ot_lr, seed=self.seed,
                           average_from=self.ot_average_from)


LR_SCHEDULES = ("constant", "cosine")
"""Learning rate over the lab's steps: constant, or cosine decay to zero (the final weights are less noisy)."""

LAB_OBJECTIVES = (*OBJECTIVES, "reflow", "meanflow-ft", "meanflow-reflow", "otcfm-dataset")
"""The training objectives, `reflow` (rf, then rf again on the first model's (noise, endpoint) pairs),
`meanflow-ft` (rf, then a flow map fine-tuned from its weights that learns its velocity: the lab's form of
`latentflow train --init RUN` with `objective.flow_map_velocity: teacher`), `meanflow-reflow` (rf, then a flow
map fine-tuned from its weights on its own (noise, endpoint) pairs: the lab's form of
`configs/flowers64_meanflow_reflow.yaml`) and `otcfm-dataset` (OT-CFM's path on
the semidiscrete OT pairs of Gaussian noise and a fixed training set)."""

TRAINED_AS = {"reflow": "rf", "meanflow-ft": "rf", "meanflow-reflow": "rf", "otcfm-dataset": "cfm"}
"""Lab objectives trained as another objective on their own pairs (cfm keeps given pairs row by row, on
OT-CFM's path)."""


class ToyMLP(nn.Module):
    """A field v(x, t) for 2D points: an MLP of `depth` SELU hidden layers on [x, t]; with `flow_map`, an
    average velocity u(x, t, r) on [x, t, r - t] (r = t when not given)."""

    def __init__(self, dim: int = 2, width: int = 64, depth: int = 3, flow_map: bool = False):
        super().__init__()
        self.flow_map = flow_map
        layers: list[nn.Module] = []
        sizes = [dim + 1 + int(flow_map)] + [width] * depth
        for size_in, size_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(size_in, size_out), nn.SELU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, dim))

    @classmethod
    def flow_map_of(cls, field: "ToyMLP") -> "ToyMLP":
        """A flow map with `field`'s weights and a zero weight on its extra input r - t: u(x, t, r) = v(x, t) for
        every r at the start (as the DiT's zero-initialised r embedding)."""
        first = field.net[0]
        depth = sum(isinstance(layer, nn.Linear) for layer in field.net) - 1
        flow_map = cls(dim=first.in_features - 1, width=first.out_features, depth=depth, flow_map=True)
        state = field.state_dict()
        state["net.0.weight"] = torch.cat([state["net.0.weight"], torch.zeros_like(state["net.0.weight"][:, :1])], 1)
        flow_map.load_state_dict(state)
        return flow_map

    def forward(self, x: torch.Tensor, t: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, 2), t: (B,), r: (B,) or None -> (B, 2)
        inputs = [x, t.reshape(-1, 1).to(x.dtype)]
        if self.flow_map:
            inputs.append(torch.zeros_like(inputs[1]) if r is None else (r - t).reshape(-1, 1).to(x.dtype))
        return self.net(torch.cat(inputs, dim=1))


@dataclass
class LabResult:
    """Metrics of one lab run; written to metrics.json."""

    settings: dict
    w2: dict[str, float]
    nfe_used: dict[str, int]
    straightness: float | None
    training_seconds: float
    final_loss: float
    w2_stochastic: dict[str, float] = field(default_factory=dict)
    coupling: dict = field(default_factory=dict)
    w2_floor: float | None = None
    """W2 between the held-out target points and as many fresh target points: what a perfect model scores at
    this sample count (the lab's `eval_samples`), the floor every W2 of the run stands beside."""


def _unchanged(batch):
    return batch


def _to_numpy(batch: TrainingBatch) -> dict:
    """The batch with numpy arrays for tensors, pickled by value between processes: torch tensors
    would each go through their own shared-memory file, a cost per batch comparable to the step itself."""
    return {item.name: _tensor_to_numpy(getattr(batch, item.name)) for item in fields(batch)}


def _tensor_to_numpy(value):
    return value.numpy() if isinstance(value, torch.Tensor) else value


def _from_numpy(packed: dict) -> TrainingBatch:
    return TrainingBatch(**{name: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
                            for name, value in packed.items()})


class PreparedBatches(torch.utils.data.Dataset):
    """Training batch i, prepared (noise drawn, paired, x_t built); depends only on (seed, i)."""

    def __init__(self, settings: LabSettings, objective: Objective, source: Sampler, target: Sampler,
                 as_numpy: bool = False):
        self.settings, self.objective, self.source, self.target = settings, objective, source, target
        self.as_numpy = as_numpy

    def __len__(self) -> int:
        return self.settings.steps

    def __getitem__(self, step: int) -> TrainingBatch:
        generator = torch.Generator().manual_seed(self.settings.seed * 1_000_003 + step)
        x0 = self.source(self.settings.batch_size, generator)
        x1 = self.target(self.settings.batch_size, generator)
        batch = self.objective.prepare(x1, generator=generator, noise=x0)
        return _to_numpy(batch) if self.as_numpy else batch


class _Runs(torch.utils.data.Dataset):
    """Item k is the list of `dataset`'s items k * size .. (k + 1) * size - 1 (the last run may be shorter)."""

    def __init__(self, dataset: torch.utils.data.Dataset, size: int):
        self.dataset, self.size = dataset, size

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.size)

    def __getitem__(self, run: int) -> list:
        return [self.dataset[i] for i in range(run * self.size, min((run + 1) * self.size, len(self.dataset)))]


# Batches a worker hands over at once: one hand-off per batch cost a tenth of an OT-CFM step on 2 cores, and runs
# of 16, 32 or 64 cost the same (README, "Against torchcfm").
BATCHES_PER_HANDOFF = 16


def batch_workers(settings: LabSettings, objective: Objective) -> int:
    """Loader processes that prepare batches: `settings.workers`, or when None, one per CPU up to 4
    for objectives that pair by OT, and one for the others (their batches are cheap), none on a
    single CPU. On 2 cores, 8gaussians -> moons, batch 256, ms a step: otcfm 5.2 inline, 4.2 with one
    worker, 2.7 to 2.8 with two or four; cfm 1.4 to 1.5 inline, 1.14 with one or two; ddpm 1.3
    inline, 1.13 to 1.22 with one."""
    if settings.workers is not None:
        return settings.workers
    cpus = os.cpu_count() or 1
    pairs_by_ot = isinstance(objective, FlowMatchingObjective) and not isinstance(objective.coupling,
                                                                                  IndependentCoupling)
    return min(4, cpus) if pairs_by_ot else min(1, cpus - 1)


def batch_stream(settings: LabSettings, objective: Objective, source: Sampler,
                 target: Sampler) -> Iterable[TrainingBatch]:
    """Prepared batches in order, the very same batches inline or in loader worker processes.

    Workers send runs of BATCHES_PER_HANDOFF batches back as numpy arrays (pickled by value) and
    work on other cores while the training step runs. A background thread was measured too and did not
    pay: the solver releases the GIL, but the many short calls around it wait for it.
    """
    workers = batch_workers(settings, objective)
    if workers == 0:
        dataset = PreparedBatches(settings, objective, source, target)
        return (dataset[step] for step in range(len(dataset)))
    runs = _Runs(PreparedBatches(settings, objective, source, target, as_numpy=True), BATCHES_PER_HANDOFF)
    loader = torch.utils.data.DataLoader(runs, batch_size=None, shuffle=False, num_workers=workers,
                                         prefetch_factor=2, collate_fn=_unchanged, worker_init_fn=_one_thread)
    return (_from_numpy(packed) for run in loader for packed in run)


def _one_thread(worker_id: int) -> None:
    torch.set_num_threads(1)


def train_field(settings: LabSettings, objective: Objective, model: nn.Module, source: Sampler,
                target: Sampler, teacher: nn.Module | None = None) -> tuple[float, float]:
    """Train `model` in place (a flow map may learn a frozen `teacher` field's velocity); returns (seconds, mean
    loss over the last 100 steps)."""
    optimizer = cpu_fused_optimizer(torch.optim.Adam, model.parameters(), lr=settings.learning_rate)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide MLP runs fastest on one thread; loader workers pair batches
    recent: deque[float] = deque(maxlen=100)
    start = time.perf_counter()
    progress = tqdm(batch_stream(settings, objective, source, target), total=settings.steps,
                    desc=f"toy {settings.objective}", leave=False, mininterval=0.5)
    models = TrainingModels(student=lambda x, t, r, labels: model(x, t) if r is None else model(x, t, r),
                            teacher=None if teacher is None else lambda x, t, r, labels: teacher(x, t))
    for step, batch in enumerate(progress):
        if settings.lr_schedule == "cosine":
            for group in optimizer.param_groups:
                group["lr"] = settings.learning_rate * 0.5 * (1 + math.cos(math.pi * step / settings.steps))
        loss = objective.training_loss(models, batch).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        recent.append(loss.item())
        if step % 200 == 0:
            progress.set_postfix(loss=f"{recent[-1]:.3f}")
    seconds = time.perf_counter() - start
    torch.set_num_threads(threads)
    return seconds, float(np.mean(recent))


def sample_points(settings: LabSettings, objective: Objective, model: nn.Module, x0: torch.Tensor, steps: int,
                  eta: float = 0.0, trajectory: bool = False) -> SolverOutput:
    """Generate from x0 with `steps` solver steps (DDIM with `eta` for ddpm)."""
    model.eval()
    if objective.prediction == "average_velocity":
        return sample_flow_map(model, x0, steps, return_trajectory=trajectory)
    if objective.prediction == "noise":
        generator = torch.Generator().manual_seed(settings.seed + 7)
        return ddim_sample(model, x0, objective.schedule, steps=steps, eta=eta, generator=generator,
                           return_trajectory=trajectory)
    return integrate(model, x0, method=settings.solver, steps=steps, return_trajectory=trajectory)


def evaluate_field(settings, objective, model, source: Sampler, target: Sampler, out_dir: Path) -> dict:
    """W2 to held-out target samples for each NFE; samples saved as samples_nfe{K}.npy."""
    generator = torch.Generator().manual_seed(settings.seed + 1_000_000)
    x0 = source(settings.eval_samples, generator)
    reference = target(settings.eval_samples, generator)
    results: dict = {"w2": {}, "nfe_used": {}, "w2_stochastic": {},
                     "w2_floor": wasserstein2(target(settings.eval_samples, generator), reference)}
    if settings.objective == "otcfm-dataset":  # its own floor: a perfect model returns the training points
        results["w2_training_points"] = wasserstein2(dataset_points(settings, target), reference)
    for steps in settings.nfe:
        out = sample_points(settings, objective, model, x0, steps)
        save_npy(out_dir / f"samples_nfe{steps}.npy", out.x.numpy())
        results["w2"][str(steps)] = wasserstein2(out.x, reference)
        results["nfe_used"][str(steps)] = out.nfe
        if objective.prediction == "noise":
            stochastic = sample_points(settings, objective, model, x0, steps, eta=settings.stochastic_eta)
            results["w2_stochastic"][str(steps)] = wasserstein2(stochastic.x, reference)
    if objective.prediction != "noise":
        field = model if objective.prediction == "velocity" else (lambda x, t: model(x, t, t))
        path = integrate(field, x0[:500], method=settings.solver, steps=max(settings.nfe), return_trajectory=True)
        results["straightness"] = path_straightness(field, path.trajectory, path.times)
    return results


def run_lab(settings: LabSettings, out_dir: Path) -> tuple[LabResult, nn.Module, Objective]:
    """Train, evaluate and save one objective's run into `out_dir`."""
    settings.validate()
    source, target = get_distribution(settings.source), get_distribution(settings.target)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    trained_name = TRAINED_AS.get(settings.objective, settings.objective)
    flow_map = {"flow_map_share": settings.flow_map_share, "flow_map_weight_power": settings.flow_map_weight_power,
                "time_sampler": settings.time_sampler}
    objective = make_objective(trained_name, sigma=settings.sigma, reg=settings.reg, **flow_map)
    model = ToyMLP(width=settings.width, flow_map=objective.prediction == "average_velocity")
    settings = replace(settings, workers=batch_workers(settings, objective))  # recorded as resolved
    coupling: dict = {}
    if settings.finite_data:
        target_for_training = PointCloud(dataset_points(settings, target).numpy(), f"{settings.target} training set")
    else:
        target_for_training = target
    if settings.objective == "otcfm-dataset":
        pairs, coupling = dataset_ot_pairs(settings, target)
        seconds, final_loss = train_field(settings, objective, model, pairs.noise, pairs.endpoint)
        seconds += pairs.seconds
    else:
        seconds, final_loss = train_field(settings, objective, model, source, target_for_training)
    if settings.objective == "reflow":
        pairs = reflow_pairs(settings, model, source)
        more, final_loss = train_field(settings, objective, model, pairs.noise, pairs.endpoint)
        seconds += more + pairs.seconds
    if settings.objective == "meanflow-ft":
        teacher = model.requires_grad_(False).eval()
        objective = make_objective("meanflow", flow_map_velocity="teacher", **flow_map)
        model = ToyMLP.flow_map_of(teacher)
        more, final_loss = train_field(replace(settings, steps=settings.finetune_steps or settings.steps), objective,
                                       model, source, target_for_training, teacher=teacher)
        seconds += more
    if settings.objective == "meanflow-reflow":
        pairs = reflow_pairs(settings, model, source)
        objective = make_objective("meanflow", **flow_map)
        model = ToyMLP.flow_map_of(model)
        more, final_loss = train_field(replace(settings, steps=settings.finetune_steps or settings.steps), objective,
                                       model, pairs.noise, pairs.endpoint)
        seconds += more + pairs.seconds
    evaluation = evaluate_field(settings, objective, model, source, target, out_dir)
    if "w2_training_points" in evaluation:
        coupling["w2_training_points"] = evaluation["w2_training_points"]
    result = LabResult(
        settings=asdict(settings), w2=evaluation["w2"], nfe_used=evaluation["nfe_used"],
        straightness=evaluation.get("straightness"), training_seconds=seconds, final_loss=final_loss,
        w2_stochastic=evaluation["w2_stochastic"], coupling=coupling, w2_floor=evaluation["w2_floor"],
    )
    write_json(out_dir / "metrics.json", asdict(result))
    return result, model, objective


@dataclass
class CoupledSamplers:
    """A coupling as two samplers that draw the same pairs: `noise(n, g)` then `endpoint(n, g)`."""

    noise: Sampler
    endpoint: Sampler
    seconds: float


def reflow_pairs(settings: LabSettings, teacher: nn.Module, source: Sampler) -> CoupledSamplers:
    """Integrate the teacher from `settings.reflow_pairs` seeded noise points (Liu et al. 2022, Alg. 1) and
    return samplers of the (noise, endpoint) pairs; each batch's two calls pick the same random rows."""
    start = time.perf_counter()
    x0 = source(settings.reflow_pairs, torch.Generator().manual_seed(settings.seed + 3_000_000))
    teacher.eval()
    x1 = integrate(teacher, x0, method=settings.reflow_solver, steps=100, atol=1e-5, rtol=1e-5).x
    teacher.train()
    chosen: dict[int, torch.Tensor] = {}

    def noise(count: int, generator: torch.Generator) -> torch.Tensor:
        rows = torch.randint(settings.reflow_pairs, (count,), generator=generator)
        chosen[id(generator)] = rows
        return x0[rows]

    def endpoint(count: int, generator: torch.Generator) -> torch.Tensor:
        return x1[chosen.pop(id(generator))]

    return CoupledSamplers(noise, endpoint, time.perf_counter() - start)


EXACT_OT_MAX_POINTS = 4000
"""Largest training set whose pairs `dataset_ot_pairs` compares with the exact OT (a 2N x 2N assignment)."""

BALANCE_DRAWS = 400_000
"""Noise draws `dataset_ot_pairs` measures the balance with (200 a point up to 2,000 points, at least 20)."""


def dataset_points(settings: LabSettings, target: Sampler) -> torch.Tensor:
    """otcfm-dataset's fixed training set: (dataset_size, 2) target points, seeded by the run's seed."""
    return target(settings.dataset_size, torch.Generator().manual_seed(settings.seed + 4_000_000)).float()


def dataset_ot_pairs(settings: LabSettings, target: Sampler) -> tuple[CoupledSamplers, dict]:
    """The semidiscrete OT coupling of N(0, I) with `settings.dataset_size` fixed target points: the potential
    fitted (`latentflow.flow.semidiscrete`), then samplers of fresh noise and its Laguerre cell's point; and the
    coupling's report (fit seconds, balance, agreement with the exact OT of a large noise sample)."""
    start = time.perf_counter()
    points = dataset_points(settings, target)
    fit = PotentialFit(points, settings.fit_settings())
    while not fit.finished:
        fit.step()
    cells = LaguerreCells(points, fit.potential)
    seconds = time.perf_counter() - start
    chosen: dict[int, torch.Tensor] = {}

    def noise(count: int, generator: torch.Generator) -> torch.Tensor:
        x0 = torch.randn(count, points.shape[1], generator=generator)
        chosen[id(generator)] = cells.assign(x0)
        return x0

    def endpoint(count: int, generator: torch.Generator) -> torch.Tensor:
        return points[chosen.pop(id(generator))]

    draws = max(20, min(200, BALANCE_DRAWS // settings.dataset_size))
    balance = measure_balance(cells, draws_per_point=draws, seed=settings.seed + 5)
    report = {"dataset_size": settings.dataset_size, "fit_seconds": seconds, "balance_excess": balance.excess,
              "balance_total_variation": balance.total_variation, "pair_cost": balance.pair_cost,
              "independent_cost": balance.independent_cost}
    if settings.dataset_size <= EXACT_OT_MAX_POINTS:
        report.update(exact_ot_comparison(cells, settings.seed))
    return CoupledSamplers(noise, endpoint, seconds), report


def exact_ot_comparison(cells: LaguerreCells, seed: int, copies: int = 2) -> dict[str, float]:
    """The semidiscrete pairs of copies x N fresh noise draws against their exact discrete OT onto the points
    (each taken `copies` times): the share of draws paired alike, and both mean squared pair distances."""
    count = cells.points.shape[0]
    x0 = noise_for_step(seed + 6, 0, copies * count, cells.points.shape[1])
    cost = torch.cdist(x0.double(), cells.points.double()).square()  # (copies * N, N)
    exact = torch.from_numpy(solve_assignment(cost.repeat_interleave(copies, 1).numpy())) // copies
    ours = cells.assign(x0)
    rows = torch.arange(x0.shape[0])
    return {"exact_ot_agreement": float((ours == exact).float().mean()),
            "semidiscrete_cost": float(cost[rows, ours].mean()), "exact_ot_cost": float(cost[rows, exact].mean())}


def write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    write_json_atomic(path, payload)
