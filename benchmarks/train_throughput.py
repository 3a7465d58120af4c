"""Training throughput, side by side in one run.

1. images/s of the same model fed by the real latent cache reader (pairing in the loader
   workers) vs fed from prepared tensors in memory (goal: reader overhead <= 5%);
2. otcfm vs rf images/s through the reader (goal >= 0.95: pairing must not slow training);
3. OT pairing time for B = 256 and 1024 latents of 4 x 32 x 32, our exact coupling beside
   torchcfm's `OTPlanSampler` when torchcfm is importable;
4. (`--dataset-ot NAME`) dataset-scale OT (`objective.ot_scope: dataset` with the cache's potential NAME)
   vs rf images/s through the reader (goal >= 0.97), with and without the bf16 screen of its pairing, and
   the potential's fit time against a 2,000-step run;
5. (`--ot-scale`) the cost of dataset OT's assignment at ImageNet-256 scale (1.28M SD-VAE latents of
   4 x 32 x 32) against a DiT-XL/2 training step: FLOPs counted, the assignment's speed (float32 and
   screened bf16) measured here, on the GPU when there is one; (`--screen-sizes N,...`) the screen's
   speed-up of the argmin alone by number of points;
6. (`--synthetic MODEL,...`) raw training images/s and peak memory of presets on 4 x 32 x 32
   latents, e.g. DiT-B/2 and DiT-XL/2 in bf16 with and without torch.compile (benchmarks/gpu_check.sh).

Usage:
    python benchmarks/train_throughput.py --cache caches/flowers64_taef2
    python benchmarks/train_throughput.py --cache CACHE --workers 0 --in-memory --dataset-ot aware --ot-scale
    python benchmarks/train_throughput.py --skip-reader --synthetic DiT-B/2,DiT-XL/2 --precision bf16 --compile both
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

from latentflow.flow.couplings import make_coupling
from latentflow.flow.objectives import make_objective
from latentflow.models import make_model
from latentflow.train.config import load_config
from latentflow.train.ema import EMA

REPO = Path(__file__).parents[1]


@dataclass
class Throughput:
    """images/s over timed steps (after warmup) and peak accelerator memory in GiB (None on CPU)."""

    images_per_s: float
    peak_memory_gib: float | None = None
    flops_per_image: float = 0.0


def reader_config(cache: str, out: str, objective: str, workers: int, batch: int, in_memory: bool = False,
                  overrides: tuple[str, ...] = ()):
    """The shipped flowers config with the given objective, no sampling, logging or checkpoints.

    `overrides` are `--set` style `key=value` strings applied last (another model, precision, ...).
    """
    return load_config(REPO / "configs" / "flowers64_dit_s2_otcfm.yaml", [
        f"data.cache={cache}", f"output_dir={out}", f"objective.name={objective}", f"data.num_workers={workers}",
        f"data.batch_size={batch}", "sample.every=0", "log.trackers=[]", "log.progress_bar=false",
        "checkpoint.every=0", f"data.in_memory={str(in_memory).lower()}", *overrides,
    ])


def time_steps(trainer, batches, steps: int) -> float:
    """images/s of `trainer.train_step` over `steps` optimizer steps drawn from `batches`."""
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(next(batches))
    return steps * trainer.config.data.batch_size / (time.perf_counter() - start)


def reader_vs_memory(cache: str, steps: int, warmup: int, workers: int, batch: int, repeats: int,
                     in_memory: bool = False, overrides: tuple[str, ...] = (), dataset_ot: str | None = None) -> None:
    """Print images/s through the reader vs from memory, and otcfm vs rf through the reader.

    The three feeds take one step each in turn, `steps * repeats` times, so the slow and fast spells
    of a shared machine hit them alike. A reader feed's time includes drawing its batch. With loader
    workers, the workers also run during the other feeds' steps: on a machine with cores to spare that
    is what training sees; on very few cores `--workers 0` gives the conservative figure.
    """
    from latentflow.train.trainer import Trainer

    with tempfile.TemporaryDirectory() as out:
        trainers = {name: Trainer(reader_config(cache, out, name, workers, batch, in_memory, overrides))
                    for name in ("otcfm", "rf")}
        if dataset_ot:
            for name, screen in (("dataset", "true"), ("dataset fp32", "false")):
                trainers[name] = Trainer(reader_config(cache, out, "otcfm", workers, batch, in_memory, (
                    *overrides, "objective.ot_scope=dataset", f"objective.ot_potential={dataset_ot}",
                    f"objective.class_aware={str(dataset_class_aware(cache, dataset_ot)).lower()}",
                    "data.sample_posterior=false", f"objective.ot_screen={screen}")))
        print(f"reader vs memory: {trainers['rf'].config.model.name} on "
              f"{device_name(trainers['rf'].accelerator.device)}, "
              f"precision {trainers['rf'].config.train.mixed_precision}, latents "
              f"{tuple(trainers['rf'].cache.latent_shape)}",
              flush=True)
        source = trainers["otcfm"].batches()
        prepared = [next(source) for _ in range(max(steps, warmup))]  # tensors in memory, pairing already done
        feeds = {"reader otcfm": (trainers["otcfm"], trainers["otcfm"].batches()),
                 "reader rf": (trainers["rf"], trainers["rf"].batches()),
                 "memory otcfm": (trainers["otcfm"], itertools.cycle(prepared))}
        if dataset_ot:
            for name in ("dataset", "dataset fp32"):
                feeds[f"reader {name}"] = (trainers[name], trainers[name].batches())
        for trainer, batches in feeds.values():
            time_steps(trainer, batches, warmup)
        seconds = dict.fromkeys(feeds, 0.0)
        for _ in range(steps * repeats):
            for name, (trainer, batches) in feeds.items():
                start = time.perf_counter()
                trainer.train_step(next(batches))
                seconds[name] += time.perf_counter() - start
    total = steps * repeats
    rate = {name: total * batch / value for name, value in seconds.items()}
    for name, value in rate.items():
        print(f"{name:19s}: {value:8.1f} images/s over {total} interleaved steps (batch {batch}, {workers} loader "
              f"worker(s), {'in-memory' if in_memory else 'streaming'} reader)")
    print(f"ratio reader / memory = {rate['reader otcfm'] / rate['memory otcfm']:.3f} (goal >= 0.95)")
    print(f"ratio otcfm / rf      = {rate['reader otcfm'] / rate['reader rf']:.3f} (goal >= 0.95)")
    if dataset_ot:
        print(f"ratio dataset OT / rf = {rate['reader dataset'] / rate['reader rf']:.3f} (goal >= 0.97; "
              f"float32 pairing without the bf16 screen: {rate['reader dataset fp32'] / rate['reader rf']:.3f})")
        fit = trainers["dataset"].dataset_cells.record["fit_seconds"]
        run = 2000 * batch / rate["reader rf"]
        print(f"potential '{dataset_ot}' fit: {fit:.0f} s = {fit / run:.2f} of a 2,000-step run at the rf rate "
              f"({run:.0f} s)")


def dataset_class_aware(cache: str, name: str) -> bool:
    from latentflow.data.potential import potential_paths

    return bool(json.loads(potential_paths(cache, name)[1].read_text())["class_aware"])


def ot_scale_estimate(points: int = 1_281_167, dim: int = 4 * 32 * 32, batch: int = 256, share: float = 0.05,
                      sample_points: int | None = None) -> None:
    """Dataset OT's assignment at ImageNet-256 scale against a DiT-XL/2 training step.

    The assignment of one noise draw is one row of a (B, D) x (D, N) matrix product: 2 N D FLOPs. The step's
    FLOPs are counted by torch for DiT-XL/2 on 4 x 32 x 32 latents. Both are large matrix products, so their
    times scale with their FLOPs at similar shares of the matmul peak of the same precision: DiT trains in
    bf16, and the screened assignment (`latentflow.flow.screening`) runs its product in bf16 too, while the
    float32 one runs at the float32 peak (on an H100 about 1/15 of bf16's, without TF32). Both assignments
    are timed here, on the GPU when there is one, each against its precision's measured peak.
    """
    from latentflow.flow.screening import Screen
    from latentflow.flow.semidiscrete import BLOCK_POINTS, LaguerreCells

    model = make_model("DiT-XL/2", in_channels=4, sample_size=32, num_classes=1000)
    x = torch.randn(1, 4, 32, 32)
    step_flops = training_flops_per_image(model, x, torch.zeros(1, dtype=torch.long))
    del model
    assign_flops = 2 * points * dim
    largest = share * step_flops / (2 * dim)
    print(f"dataset OT at scale: DiT-XL/2 trains at {step_flops / 1e9:.0f} GFLOP per image (forward + backward, "
          f"counted); the assignment of one noise draw against N latents of {dim} costs 2 N D = "
          f"{assign_flops / 1e9:.1f} GFLOP for ImageNet's N = {points:,}: {assign_flops / step_flops:.3f} of the "
          f"step; under {share:.0%} up to N = {largest:,.0f} latents, at the step's share of the same peak")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sample_points = sample_points or (200_000 if device.type == "cuda" else 20_000)
    generator = torch.Generator(device=device).manual_seed(0)
    latents = torch.randn(sample_points, dim, device=device, generator=generator)
    noise = torch.randn(batch, dim, device=device, generator=generator)
    potential = torch.zeros(sample_points, device=device)
    flops = 2 * sample_points * dim * batch
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # as training pairs: float32 products without TF32
    # the screen even where torch would emulate bf16: one per block of points past BLOCK_POINTS
    screens = [Screen.of(latents[start:start + BLOCK_POINTS]) for start in range(0, sample_points, BLOCK_POINTS)]
    for name, screen, dtype in (("float32", False, torch.float32),
                                ("screened bf16", screens if sample_points > BLOCK_POINTS else screens[0],
                                 torch.bfloat16)):
        cells = LaguerreCells(latents, potential, screen=screen)
        ms = best_ms(lambda cells=cells: (cells.assign(noise), synchronize(device)), 3)
        peak = matmul_peak_tflops(device, dtype, size=2048 if device.type == "cpu" else 8192, repeats=3) * 1000
        achieved = flops / (ms / 1000) / 1e9
        print(f"  {name:13s} assignment on {device_name(device)} (B = {batch}, N = {sample_points:,}, D = {dim}): "
              f"{ms:.1f} ms = {achieved:.0f} GFLOP/s, {achieved / peak:.2f} of the {dtype} matmul peak "
              f"({peak:.0f} GFLOP/s)")
    torch.set_float32_matmul_precision(precision)
    print(f"  the points take {points * dim * 4 / 2**30:.1f} GiB in float32 on each device, plus "
          f"{points * dim * 2 / 2**30:.1f} GiB for the screen's bf16 copy")


def float32_argmin(points: torch.Tensor, offsets: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """argmin_j of offsets_j - 2 <x, points_j> per row of x, in float32 at once (the unscreened pairing)."""
    return torch.addmm(offsets.unsqueeze(0), x, points.T, alpha=-2.0).argmin(dim=1)


def screen_speedups(sizes: list[int], dim: int = 2048, rows: tuple[int, ...] = (13, 64, 1024)) -> None:
    """The hard argmin alone, float32 (one addmm, then min) against the bf16 screen, for N random points of `dim`
    with a random potential: where `Screen.pays` draws its line (MIN_POINTS)."""
    from latentflow.flow.screening import Screen

    generator = torch.Generator().manual_seed(0)
    for count in sizes:
        points = 0.9 * torch.randn(count, dim, generator=generator)
        offsets = points.square().sum(1) - 40 * torch.randn(count, generator=generator)
        screen = Screen.of(points)
        for batch in rows:
            x = torch.randn(batch, dim, generator=generator)
            plain = best_ms(partial(float32_argmin, points, offsets, x), 5)
            screened = best_ms(partial(screen.argmin, points, offsets, x), 5)
            print(f"argmin N = {count:6d}, D = {dim}, rows = {batch:5d}: float32 {plain:7.3f} ms, screened "
                  f"{screened:7.3f} ms: {plain / screened:.2f}x")


def best_ms(function, repeats: int) -> float:
    """Fastest wall time of `function()` in milliseconds over `repeats` calls after one warmup call.

    The minimum, not the median: on a shared machine other users only ever add time.
    """
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000)
    return min(times)


def pairing_times(sizes: list[int], repeats: int) -> None:
    """Exact OT pairing time on (B, 4, 32, 32) latents, beside torchcfm's OTPlanSampler if present."""
    try:
        from torchcfm.optimal_transport import OTPlanSampler
    except ImportError:
        OTPlanSampler = None
    coupling = make_coupling("exact")
    for size in sizes:
        generator = torch.Generator().manual_seed(size)
        x0 = torch.randn(size, 4, 32, 32, generator=generator)
        x1 = torch.randn(size, 4, 32, 32, generator=generator) * 0.5 + 0.3
        ours = best_ms(lambda x0=x0, x1=x1, generator=generator: coupling(x0, x1, None, generator), repeats)
        line = f"OT pairing B={size:5d}: latentflow exact {ours:8.1f} ms"
        if OTPlanSampler is not None:
            sampler = OTPlanSampler(method="exact")
            theirs = best_ms(lambda sampler=sampler, x0=x0, x1=x1: sampler.sample_plan(x0, x1), repeats)
            line += f" | torchcfm OTPlanSampler(exact) {theirs:8.1f} ms | torchcfm / ours {theirs / ours:.2f}x"
        else:
            line += " | torchcfm not importable here (pip install torchcfm in a separate venv to compare)"
        print(line)


@dataclass
class SyntheticStep:
    """`step()` takes one training step of `model` on the fixed random latents `x1` (B, C, h, w) and `labels`."""

    step: Callable[[], None]
    model: torch.nn.Module
    x1: torch.Tensor
    labels: torch.Tensor


def synthetic_step(name: str, batch: int, precision: str, compile_mode: str | None, device: torch.device,
                   latent_shape: tuple[int, int, int] = (4, 32, 32), shard: bool = False,
                   **settings) -> SyntheticStep:
    """The training step on random latents: rf objective, autocast, AdamW, grad clip, EMA update.

    The step is the one `Trainer` takes (and fast-DiT's), minus data loading and the non-finite guard.
    `compile_mode`: None for eager, else a `torch.compile` mode ("default", "max-autotune-no-cudagraphs", ...)
    for the model's forward. `shard`: FSDP2 over the initialised process group (`fsdp_shard`), the EMA kept
    shard by shard as `Trainer` keeps it. `settings` go to `make_model` (e.g. fused_modulation=True).
    """
    torch.manual_seed(0)
    channels, size, _ = latent_shape
    model = make_model(name, in_channels=channels, sample_size=size, num_classes=1000, **settings).to(device)
    ema = EMA(model, decay=0.9999)
    if shard:
        fsdp_shard(model)
        ema.shard(model, keep_full=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    if compile_mode is None:
        forward = model
    else:
        forward = torch.compile(model, mode=None if compile_mode == "default" else compile_mode)
    objective = make_objective("rf")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}[precision]
    x1 = torch.randn(batch, *latent_shape, device=device)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        prepared = objective.prepare(x1, labels)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = objective.loss(forward(prepared.x_t, prepared.t, prepared.labels), prepared).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)

    return SyntheticStep(step, model, x1, labels)


def fsdp_shard(model: torch.nn.Module) -> None:
    """FSDP2 (`fully_shard`) over all processes of the process group: each transformer block one unit, the root
    the rest, as configs/accelerate/fsdp_8gpu.yaml wraps it; fp32 parameters (autocast computes in bf16)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def synthetic_throughput(name: str, batch: int, precision: str, compile_model: bool, steps: int, warmup: int,
                         device: torch.device) -> Throughput:
    """Train `name` on random 4x32x32 latents (`synthetic_step`) and time it."""
    run = synthetic_step(name, batch, precision, "default" if compile_model else None, device)
    for _ in range(warmup):
        run.step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        run.step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return Throughput(steps * batch / elapsed, peak, training_flops_per_image(run.model, run.x1[:2], run.labels[:2]))


def training_flops_per_image(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    """Matmul/attention FLOPs of one forward + backward per image, counted by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(x, torch.rand(x.shape[0], device=x.device), labels).float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, size: int = 8192, repeats: int = 10) -> float:
    """The physical limit measured here: TFLOP/s of a size^3 matrix product in `dtype`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def synthetic_table(names: list[str], batch: int, precision: str, compile_modes: list[bool], steps: int,
                    warmup: int) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = None
    if device.type == "cuda":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[precision]
        peak = matmul_peak_tflops(device, dtype)
        print(f"physical limit here: {peak:.0f} TFLOP/s ({dtype} 8192^3 matrix product)")
    print(f"synthetic 4x32x32 latents, batch {batch}, {precision}, on {device_name(device)}")
    for name in names:
        for compile_model in compile_modes:
            result = synthetic_throughput(name, batch, precision, compile_model, steps, warmup, device)
            memory = f"{result.peak_memory_gib:6.1f} GiB peak" if result.peak_memory_gib is not None else ""
            achieved = result.images_per_s * result.flops_per_image / 1e12
            utilisation = f" = {achieved / peak:.2f} of the limit" if peak else ""
            print(f"  {name:9s} compile={str(compile_model):5s} {result.images_per_s:9.1f} images/s "
                  f"({result.images_per_s / batch:5.2f} steps/s) {memory} | {result.flops_per_image / 1e9:.0f} "
                  f"GFLOP/image trained, {achieved:.1f} TFLOP/s{utilisation}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="caches/flowers64_taef2", help="latent cache for the reader comparison")
    parser.add_argument("--batch", type=int, default=64, help="global batch of the reader comparison")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="loader workers (pairing runs there)")
    parser.add_argument("--repeats", type=int, default=3, help="the feeds take steps * repeats steps each")
    parser.add_argument("--in-memory", action="store_true", help="reader decodes the cache into memory once")
    parser.add_argument("--skip-reader", action="store_true")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for the reader comparison, e.g. --set model.name=DiT-XL/2")
    parser.add_argument("--ot-sizes", default="256,1024", help="comma-separated batch sizes; empty to skip")
    parser.add_argument("--ot-repeats", type=int, default=5)
    parser.add_argument("--dataset-ot", default=None, metavar="NAME",
                        help="also time ot_scope: dataset with the cache's potential NAME (latentflow ot-fit)")
    parser.add_argument("--ot-scale", action="store_true", help="dataset OT's cost at ImageNet scale (counted)")
    parser.add_argument("--ot-scale-points", type=int, default=None,
                        help="latents the --ot-scale assignment is timed on (default 20,000 on CPU, 200,000 on GPU)")
    parser.add_argument("--screen-sizes", default="", help="comma-separated point counts: the bf16 screen's "
                        "speed-up of the hard argmin, e.g. 600,1200,2000,2934,20000")
    parser.add_argument("--synthetic", default="", help="comma-separated model presets, e.g. DiT-B/2,DiT-XL/2")
    parser.add_argument("--synthetic-batch", type=int, default=128)
    parser.add_argument("--precision", default="bf16", choices=["no", "bf16", "fp16"])
    parser.add_argument("--compile", default="no", choices=["no", "yes", "both"])
    args = parser.parse_args()
    torch.set_float32_matmul_precision("high")
    if not args.skip_reader:
        reader_vs_memory(args.cache, args.steps, args.warmup, args.workers, args.batch, args.repeats,
                         args.in_memory, tuple(args.overrides), args.dataset_ot)
    if args.ot_scale:
        ot_scale_estimate(sample_points=args.ot_scale_points)
    if args.screen_sizes:
        screen_speedups([int(size) for size in args.screen_sizes.split(",")])
    if args.ot_sizes:
        pairing_times([int(s) for s in args.ot_sizes.split(",")], args.ot_repeats)
    if args.synthetic:
        modes = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
        synthetic_table(args.synthetic.split(","), args.synthetic_batch, args.precision, modes, args.steps, args.warmup)


if __name__ == "__main__":
    main()
