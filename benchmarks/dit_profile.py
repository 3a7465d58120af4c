"""Where a DiT training step spends its GPU time, variant by variant (issue 15: DiT-XL/2 at >= 0.65 of the limit).

For one DiT preset on random latents (default DiT-XL/2, 4x32x32, bf16 autocast) the step of `train_throughput.py`
(`synthetic_step`: the `Trainer`'s step with rf, AdamW, grad clip and EMA) runs once per variant, each in its own
process under a time cap, so an OOM, a compile error or a slow autotune costs one line and the rest goes on. A
variant is `BATCH/COMPILE[/fused][/sdpa=BACKEND]`: compile mode none, default, max-autotune-no-cudagraphs, ...;
`fused` the model's `fused_modulation` option; `sdpa=flash|efficient|cudnn|math` forces one attention backend.

Printed: the matmul limit (an 8192^3 matrix product in the step's dtype, this run); which SDPA backends accept the
model's attention shape and dtype, their forward + backward times, and the one PyTorch picks on its own; per
variant images/s, TFLOP/s (FLOPs counted by FlopCounterMode), the fraction of the limit and peak memory; for the
first variant (the baseline) and the fastest, the top CUDA kernels by self time (torch.profiler), each in a group
(GEMM, attention: flash / mem-efficient / cuDNN, softmax (math attention), norm, pointwise, optimizer/EMA, ...),
and the share of each group. With 2+ GPUs, peak memory per GPU of the baseline step under FSDP2 beside without.

Usage:
    python benchmarks/dit_profile.py                                  # DiT-XL/2, the default variants, 520 s
    python benchmarks/dit_profile.py --variants 256/default,256/default/fused --budget 200
    python benchmarks/dit_profile.py --device cpu --preset tiny --latent 4x8x8 --variants 4/none,4/none/fused \
        --steps 2 --warmup 1 --profile-steps 1                        # a smoke check on a CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from train_throughput import matmul_peak_tflops, synchronize, synthetic_step, training_flops_per_image

from latentflow.models import MODEL_PRESETS

DEFAULT_VARIANTS = ("128/none,128/default,256/default,128/default/fused,128/none/fused,"
                    "256/max-autotune-no-cudagraphs,256/none")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
TINY = {"hidden_size": 64, "depth": 2, "num_heads": 2, "patch_size": 2}  # --preset tiny: a smoke check on a CPU
RUNNING: list[subprocess.Popen] = []  # the variant processes started by this one (at most one at a time)
BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
GROUPS = (  # (group, substrings of a lower-cased kernel or op name); the first group that matches wins
    ("optimizer/EMA", ("multi_tensor_apply", "foreach", "adam")),
    ("attention: cuDNN", ("sdpa", "cudnn_generated_fort_native")),
    ("attention: flash", ("flash",)),
    ("attention: mem-efficient", ("fmha", "efficient_attention", "mem_eff")),
    ("softmax (math attention)", ("softmax",)),
    ("GEMM", ("gemm", "xmma", "cutlass", "nvjet", "cublas", "triton_tem", "aten::mm", "aten::addmm", "aten::bmm",
              "aten::linear", "conv")),
    ("norm", ("layer_norm", "rms_norm", "layernorm", "rmsnorm")),
    ("pointwise", ("elementwise", "triton_poi", "copy", "fill", "aten::add", "aten::mul", "aten::sub", "aten::div",
                   "aten::gelu", "aten::silu", "aten::cat", "aten::cos", "aten::sin", "aten::exp", "aten::neg",
                   "aten::clamp", "aten::where", "aten::pow", "aten::lerp")),
    ("reduction", ("reduce", "triton_red", "triton_per", "aten::sum", "aten::mean", "norm")),
)


@dataclass
class Variant:
    """One configuration of the step: `BATCH/COMPILE[/fused][/sdpa=BACKEND]`."""

    batch: int
    compile_mode: str
    fused: bool = False
    sdpa: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Variant:
        parts = spec.strip().split("/")
        if len(parts) < 2 or not parts[0].isdigit() or parts[1] not in COMPILE_MODES:
            raise ValueError(f"variant {spec!r}: expected BATCH/COMPILE[/fused][/sdpa=BACKEND], COMPILE one of "
                             f"{COMPILE_MODES}")
        variant = cls(int(parts[0]), parts[1])
        for extra in parts[2:]:
            if extra == "fused":
                variant.fused = True
            elif extra.startswith("sdpa=") and extra[5:] in BACKENDS:
                variant.sdpa = extra[5:]
            else:
                raise ValueError(f"variant {spec!r}: unknown part {extra!r}; use fused or sdpa={'|'.join(BACKENDS)}")
        return variant

    @property
    def label(self) -> str:
        return "/".join([str(self.batch), self.compile_mode, *(["fused"] if self.fused else []),
                         *([f"sdpa={self.sdpa}"] if self.sdpa else [])])


@dataclass
class Result:
    """What one variant's process measured; `kernels` rows are (short name, group, ms per step)."""

    images_per_s: float
    flops_per_image: float
    peak_memory_gib: float | None
    warmup_s: float
    step_ms: float
    kernels: list[tuple[str, str, float]] = field(default_factory=list)
    groups: dict[str, float] = field(default_factory=dict)
    rank: int = 0


def kernel_group(name: str) -> str:
    """The group of a CUDA kernel (or, on a CPU, an aten op) by its name; 'other' when none matches."""
    lowered = name.lower()
    return next((group for group, keys in GROUPS if any(key in lowered for key in keys)), "other")


def short_name(name: str, width: int = 64) -> str:
    """A kernel's name without `void`, template arguments and parameter list, at most `width` characters."""
    name = name.removeprefix("void ").replace("(anonymous namespace)::", "")
    name = re.split(r"[<(]", name, maxsplit=1)[0] or name
    return name if len(name) <= width else name[: width - 3] + "..."


def model_settings(preset: str, fused: bool) -> tuple[str, dict]:
    """(make_model name, settings) of `preset`; 'tiny' is a 2-block DiT of width 64."""
    if preset == "tiny":
        return "dit", {**TINY, "fused_modulation": fused}
    if preset not in MODEL_PRESETS or MODEL_PRESETS[preset][0] != "dit":
        raise ValueError(f"--preset {preset!r}: choose tiny or a DiT preset, e.g. DiT-XL/2 "
                         f"({', '.join(name for name, (kind, _) in MODEL_PRESETS.items() if kind == 'dit')})")
    return preset, {"fused_modulation": fused}


def attention_shape(preset: str, batch: int, latent: tuple[int, int, int]) -> tuple[int, int, int, int]:
    """(B, H, N, d) of the preset's attention on `latent` (C, h, w)."""
    settings = TINY if preset == "tiny" else MODEL_PRESETS[model_settings(preset, False)[0]][1]
    heads, tokens = settings["num_heads"], (latent[1] // settings["patch_size"]) ** 2
    return batch, heads, tokens, settings["hidden_size"] // heads


def sdpa_context(backend: str | None) -> contextlib.AbstractContextManager:
    """Only `backend` (a key of BACKENDS) for F.scaled_dot_product_attention inside; None: PyTorch's choice."""
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, BACKENDS[backend]))


def step_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[precision]


def timed_ms(function, device: torch.device, repeats: int) -> float:
    """Fastest of `repeats` synchronised calls of `function()` in ms, after one warmup call."""
    function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return min(times)


def kernel_times(function, device: torch.device, steps: int) -> dict[tuple[str, str], float]:
    """ms per call of each CUDA kernel (on a CPU: each aten op, by self time) during `steps` calls of `function()`,
    keyed by (short name, group)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if device.type == "cuda" else [])]
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            function()
        synchronize(device)
    times: dict[tuple[str, str], float] = defaultdict(float)
    for event in profiler.events():
        if device.type == "cuda" and event.device_type == DeviceType.CUDA:
            micros = event.time_range.elapsed_us()
        elif device.type != "cuda" and event.name.startswith("aten::"):
            micros = event.self_cpu_time_total
        else:
            continue
        times[(short_name(event.name), kernel_group(event.name))] += micros / 1000 / steps
    return times


def run_variant(args: argparse.Namespace, variant: Variant, shard: bool = False) -> Result:
    """Build, warm up (compile), time, measure and profile one variant in this process."""
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("high")
    name, settings = model_settings(args.preset, variant.fused)
    mode = None if variant.compile_mode == "none" else variant.compile_mode
    run = synthetic_step(name, variant.batch, args.precision, mode, device, args.latent, shard=shard, **settings)
    with sdpa_context(variant.sdpa):
        start = time.perf_counter()
        for _ in range(args.warmup):
            run.step()
        synchronize(device)
        warmup_s = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step_ms = timed_steps_ms(run.step, device, args.steps)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        times = kernel_times(run.step, device, args.profile_steps) if args.profile_steps else {}
    flops = 0.0 if shard else training_flops_per_image(run.model, run.x1[:2], run.labels[:2])
    groups: dict[str, float] = defaultdict(float)
    for (_, group), ms in times.items():
        groups[group] += ms
    top = sorted(times.items(), key=lambda item: -item[1])[: args.top]
    rank = int(os.environ.get("RANK", 0))
    return Result(1000 * variant.batch / step_ms, flops, peak, warmup_s, step_ms,
                  [(name, group, ms) for (name, group), ms in top], dict(groups), rank)


def timed_steps_ms(step, device: torch.device, steps: int) -> float:
    """Mean wall time of one of `steps` consecutive calls of `step()` in ms (synchronised at both ends)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) * 1000 / steps


def child_main(args: argparse.Namespace) -> None:
    """One variant in this process (under torch.distributed.run with --fsdp-child: one rank of FSDP2)."""
    variant = Variant.parse(args.child)
    if not args.fsdp_child:
        print("RESULT " + json.dumps(asdict(run_variant(args, variant))), flush=True)
        return
    import torch.distributed as dist

    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    print("RESULT " + json.dumps(asdict(run_variant(args, variant, shard=True))), flush=True)
    dist.barrier()
    os._exit(0)  # without the interpreter's teardown, where a gloo/FSDP thread has aborted (tests/test_distributed)


def run_isolated(args: argparse.Namespace, extra: list[str], limit: float,
                 launcher: list[str] | None = None) -> tuple[list[Result], str | None]:
    """Run this script with `extra` in a new process group for at most `limit` s: (results, None or an error)."""
    command = [*(launcher or [sys.executable]), os.path.abspath(__file__), *child_arguments(args), *extra]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    RUNNING.append(process)
    try:
        out, err = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the variant and its compile workers
        process.communicate()
        return [], f"stopped at its time cap ({limit:.0f} s)"
    finally:
        RUNNING.remove(process)
    results = [Result(**json.loads(line[len("RESULT "):])) for line in out.splitlines() if line.startswith("RESULT ")]
    if process.returncode or not results:
        lines = [line for line in (err + out).splitlines() if line.strip() and not line.startswith("RESULT ")]
        return results, f"exit {process.returncode}: " + (lines[-1].strip()[:200] if lines else "no output")
    return results, None


def stop_children(signal_number: int, _frame) -> None:
    """On SIGTERM (gpu_check.sh's `timeout`) or Ctrl-C, end the running variant's process group too."""
    for process in RUNNING:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    sys.exit(128 + signal_number)


def child_arguments(args: argparse.Namespace) -> list[str]:
    return ["--preset", args.preset, "--latent", "x".join(map(str, args.latent)), "--precision", args.precision,
            "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--profile-steps", str(args.profile_steps), "--top", str(args.top)]


def print_limit(device: torch.device, dtype: torch.dtype) -> float:
    """Measure and print the matmul limit in TFLOP/s (8192^3 on a GPU; 1024^3 on a CPU, to stay short)."""
    size = 8192 if device.type == "cuda" else 1024
    limit = matmul_peak_tflops(device, dtype, size=size, repeats=10 if device.type == "cuda" else 3)
    print(f"matmul limit here: {limit:.2f} TFLOP/s ({dtype} {size}^3 matrix product)", flush=True)
    return limit


def print_attention_check(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> None:
    """Which SDPA backends accept the model's attention (q, k, v views of one qkv tensor, as the DiT makes
    them), their forward + backward time, and the kernels PyTorch's own choice runs."""
    import warnings

    import torch.nn.functional as F

    batch, heads, tokens, head_dim = shape
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, device=device, dtype=dtype, requires_grad=True)

    def call() -> None:
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, d)
        F.scaled_dot_product_attention(query, key, value).sum().backward()

    print(f"attention B={batch}, H={heads}, N={tokens}, d={head_dim}, {dtype}, forward + backward:")
    for backend in (None, *BACKENDS):
        with warnings.catch_warnings(record=True) as caught, sdpa_context(backend):
            warnings.simplefilter("always")
            try:
                line = f"{timed_ms(call, device, 3):8.2f} ms"
            except RuntimeError as error:
                reasons = [str(w.message).splitlines()[0] for w in caught] or [str(error).splitlines()[0]]
                line = "refused: " + "; ".join(reasons)[:240]
            if backend is None and not line.startswith("refused"):
                groups = {group for (_, group), _ in kernel_times(call, device, 1).items() if "attention" in group}
                line += f"  (runs {', '.join(sorted(groups)) or 'no fused attention kernel'})"
        print(f"  {backend or 'PyTorch picks':14s} {line}", flush=True)
    qkv.grad = None


def print_row(label: str, result: Result, limit: float, seconds: float) -> None:
    achieved = result.images_per_s * result.flops_per_image / 1e12
    memory = f"{result.peak_memory_gib:6.1f} GiB peak" if result.peak_memory_gib is not None else "peak n/a (CPU)"
    print(f"  {label:36s} {result.images_per_s:8.1f} images/s {achieved:8.3g} TFLOP/s = {achieved / limit:.2f} of "
          f"the limit | {memory} | {result.flops_per_image / 1e9:.3g} GFLOP/image | compile+warmup "
          f"{result.warmup_s:.0f} s, all {seconds:.0f} s", flush=True)


def print_kernels(label: str, result: Result, device: torch.device) -> None:
    busy = sum(result.groups.values())
    if not busy:
        return  # --profile-steps 0
    what = "CUDA kernels" if device.type == "cuda" else "CPU aten ops"
    print(f"top {len(result.kernels)} {what} by self time, {label}: {busy:.1f} ms busy in a {result.step_ms:.1f} ms "
          f"step")
    for name, group, ms in result.kernels:
        print(f"  {group:25s} {name:64s} {ms:8.2f} ms {ms / busy:6.1%}")
    shares = sorted(result.groups.items(), key=lambda item: -item[1])
    print("  by group: " + " | ".join(f"{group} {ms / busy:.1%}" for group, ms in shares), flush=True)


def run_variants(args: argparse.Namespace, variants: list[Variant], limit: float, deadline: float,
                 reserve: float) -> dict[str, Result]:
    """Each variant in its own process, capped by --cap and by what is left of the budget (less `reserve`)."""
    results = {}
    print(f"{args.preset} on {'x'.join(map(str, args.latent))} latents, {args.precision}, {args.steps} timed steps "
          f"after {args.warmup}, each variant capped at {args.cap:.0f} s:", flush=True)
    for variant in variants:
        left = deadline - time.monotonic() - reserve
        if left < args.min_seconds:
            print(f"  {variant.label:36s} skipped: {max(left, 0):.0f} s of the budget left", flush=True)
            continue
        start = time.monotonic()
        got, error = run_isolated(args, ["--child", variant.label], min(args.cap, left))
        if error:
            print(f"  {variant.label:36s} failed: {error}", flush=True)
            continue
        results[variant.label] = got[0]
        print_row(variant.label, got[0], limit, time.monotonic() - start)
    return results


def print_memory(args: argparse.Namespace, results: dict[str, Result], baseline: Variant, processes: int,
                 deadline: float) -> None:
    """Peak memory per GPU of the baseline step without FSDP, and with FSDP2 when `processes` >= 2."""
    alone = results.get(baseline.label)
    peak = lambda r: f"{r.peak_memory_gib:.1f} GiB" if r.peak_memory_gib is not None else "n/a (CPU)"  # noqa: E731
    print(f"memory per device, {baseline.label}: without FSDP {peak(alone) if alone else 'not measured'}", flush=True)
    if processes < 2:
        print(f"  with FSDP: not measured, FSDP needs 2+ GPUs ({torch.cuda.device_count()} here)")
        return
    left = deadline - time.monotonic()
    if left < args.min_seconds:
        print(f"  with FSDP: skipped, {max(left, 0):.0f} s of the budget left")
        return
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    got, error = run_isolated(args, ["--child", baseline.label, "--fsdp-child"], min(args.fsdp_cap, left), launcher)
    if error:
        print(f"  with FSDP2 on {processes} processes: failed: {error}")
    for result in sorted(got, key=lambda r: r.rank):
        print(f"  with FSDP2 on {processes} processes, rank {result.rank}: {peak(result)}, "
              f"{result.images_per_s:.1f} images/s on this rank")


def fsdp_processes(args: argparse.Namespace) -> int:
    """Processes for the FSDP memory check: --fsdp-processes, else every GPU (0 on a CPU)."""
    if args.fsdp_processes is not None:
        return args.fsdp_processes
    return torch.cuda.device_count() if args.device.startswith("cuda") else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="DiT-XL/2", help="a DiT preset, or tiny (2 blocks of width 64)")
    parser.add_argument("--latent", default="4x32x32", type=lambda text: tuple(int(v) for v in text.split("x")),
                        help="C x h x w of the random latents (h = w)")
    parser.add_argument("--precision", default="bf16", choices=["no", "bf16", "fp16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help="comma-separated BATCH/COMPILE[/fused][/sdpa=BACKEND], run in this order; the first "
                             "is the baseline")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="steps before timing (the compile happens here)")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps per variant; 0: no profile")
    parser.add_argument("--top", type=int, default=15, help="kernels listed for the baseline and the fastest")
    parser.add_argument("--budget", type=float, default=520, help="seconds for everything (variants skip after)")
    parser.add_argument("--cap", type=float, default=240, help="seconds at most per variant")
    parser.add_argument("--fsdp-cap", type=float, default=120, help="seconds at most for the FSDP memory check")
    parser.add_argument("--fsdp-processes", type=int, default=None,
                        help="processes for the FSDP check (default: the GPUs; on a CPU, gloo processes)")
    parser.add_argument("--min-seconds", type=float, default=30, help="a variant starts only with this much left")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--fsdp-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if len(args.latent) != 3 or args.latent[1] != args.latent[2]:
        parser.error(f"--latent {args.latent}: give C x h x w with h = w, e.g. 4x32x32")
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(args)
        return
    deadline = time.monotonic() + args.budget
    signal.signal(signal.SIGTERM, stop_children)
    signal.signal(signal.SIGINT, stop_children)
    device = torch.device(args.device)
    variants = [Variant.parse(spec) for spec in args.variants.split(",")]
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"budget {args.budget:.0f} s", flush=True)
    limit = print_limit(device, step_dtype(args.precision))
    print_attention_check(attention_shape(args.preset, variants[0].batch, args.latent), step_dtype(args.precision),
                          device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    processes = fsdp_processes(args)
    results = run_variants(args, variants, limit, deadline, args.fsdp_cap if processes >= 2 else 0)
    baseline = results.get(variants[0].label)
    if baseline:
        print_kernels(f"baseline {variants[0].label}", baseline, device)
    if results:
        best = max(results, key=lambda label: results[label].images_per_s)
        if best != variants[0].label:
            print_kernels(f"fastest {best}", results[best], device)
    print_memory(args, results, variants[0], processes, deadline)


if __name__ == "__main__":
    main()
