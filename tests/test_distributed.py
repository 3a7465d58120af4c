"""Real multi-process launches: two machines of one process each on localhost (gloo), and runs that resume on
another process count. The training runs use the real flowers cache of test_training and a tiny DiT."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from flower_assets import FLOWERS, REPO, TAEF2, link_flower_photos
from test_training import TINY, cache, free_port, fresh_accelerator_state, losses  # noqa: F401  (fixtures)

from latentflow.data.cache import LatentCache, make_latent_loader
from latentflow.data.sources import open_source
from latentflow.train.config import load_config
from latentflow.train.logs import CsvLog, KeyRecord

pytestmark = pytest.mark.skipif(
    not (TAEF2.is_dir() and FLOWERS.is_dir()), reason=f"shared assets missing: need {TAEF2} and {FLOWERS}"
)

LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--mixed_precision", "no", "--dynamo_backend", "no"]

TRAIN_SCRIPT = textwrap.dedent('''
    """Train with the real Trainer; save each rank's parameters, EMA and global OT plans to REPORT.rankR.pt."""
    import sys
    import torch
    from latentflow.train import trainer as trainer_module
    from latentflow.train.config import load_config

    report, resume, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    plans, solve = [], trainer_module.global_ot_pairing

    def observed(*args, **kwargs):
        result = solve(*args, **kwargs)
        plans.append(result.noise_index.tolist())  # which rows of the gathered noise this rank's data got
        return result

    trainer_module.global_ot_pairing = observed
    trainer = trainer_module.Trainer(load_config(None, overrides))
    trainer.fit(resume=None if resume == "-" else resume)
    flat = lambda model: torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save({"params": flat(trainer.unwrapped), "ema": flat(trainer.ema.model), "plans": plans,
                "world": trainer.accelerator.num_processes}, f"{report}.rank{trainer.accelerator.process_index}.pt")
''')


def launch(script: Path | str, arguments: list[str], machines: int = 1) -> None:
    """`accelerate launch` two processes: on one machine, or as two machines of one process each (localhost)."""
    port = str(free_port())
    if machines == 1:
        commands = [[*LAUNCH, "--num_machines", "1", "--main_process_port", port, str(script), *arguments]]
    else:
        commands = [[*LAUNCH, "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
                     "--main_process_port", port, str(script), *arguments] for rank in range(machines)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for command in commands]
    results = [(process.communicate(timeout=600)[1], process.returncode) for process in running]
    for rank, (stderr, code) in enumerate(results):
        assert code == 0, f"machine {rank}: {stderr[-3000:]}"


def train_launched(tmp_path: Path, report: str, overrides: list[str], resume: str = "-", machines: int = 1) -> list:
    """Launch TRAIN_SCRIPT on two processes; returns both ranks' reports, checked for equal weights."""
    script = tmp_path / "train_and_report.py"
    script.write_text(TRAIN_SCRIPT)
    launch(script, [str(tmp_path / report), resume, *overrides], machines)
    reports = [torch.load(tmp_path / f"{report}.rank{rank}.pt") for rank in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2]
    assert torch.equal(reports[0]["params"], reports[1]["params"])  # the ranks stayed in sync
    assert torch.equal(reports[0]["ema"], reports[1]["ema"])
    return reports


def train_here(overrides: list[str], resume: str | None = None) -> None:
    """One process, in this interpreter."""
    from accelerate.state import AcceleratorState

    from latentflow.train.trainer import Trainer

    AcceleratorState._reset_state(reset_partial_state=True)
    Trainer(load_config(None, overrides)).fit(resume=resume)


def expected_keys(cache_dir: Path, streams: int, steps: int) -> dict[int, list[str]]:
    """Global batch s as latentflow.data.elastic defines it: batch s of loader rank k of K, k = 0 .. K-1."""
    loaders = [make_latent_loader(cache_dir, 8 // streams, seed=0, rank=k, world_size=streams, shuffle_buffer=16)
               for k in range(streams)]
    return {step: [key for loader in loaders for key in next(loader)["keys"]] for step in range(steps)}


def run_overrides(cache_dir: Path, out: Path, *more: str) -> list[str]:
    return [*TINY, f"data.cache={cache_dir}", f"output_dir={out}", "log.record_keys=true", "checkpoint.every=0",
            *more]


@pytest.mark.slow
def test_two_machines_train_with_global_ot_checkpoint_and_resume(cache: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "run"
    overrides = run_overrides(cache, out, "objective.ot_scope=global", "optim.grad_accumulation=2")
    first = train_launched(tmp_path, "first", [*overrides, "train.max_steps=2"], machines=2)
    second = train_launched(tmp_path, "second", [*overrides, "train.max_steps=4"], resume="latest", machines=2)
    for reports, steps in ((first, 2), (second, 2)):
        assert len(reports[0]["plans"]) == len(reports[1]["plans"]) == steps * 2  # one plan per micro-batch
        for own, other in zip(reports[0]["plans"], reports[1]["plans"]):
            assert sorted(own + other) == [0, 1, 2, 3]  # one exact plan over the 2 x 2 rows: a permutation
    assert KeyRecord.read(out / "keys") == expected_keys(cache, streams=2, steps=4)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert len(losses(out)) == 4
    assert (out / "model" / "diffusion_pytorch_model.safetensors").is_file()


FAKE_SRUN = """#!/bin/bash
# srun on one machine: the task once per node, as SLURM_NODEID 0 .. SLURM_NNODES-1
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node SLURM_PROCID=$node "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""


def fake_slurm(folder: Path, nodes: int) -> dict[str, str]:
    """The environment of a SLURM job of `nodes` nodes on localhost: srun and scontrol stand-ins on PATH."""
    folder.mkdir()
    (folder / "srun").write_text(FAKE_SRUN)
    (folder / "scontrol").write_text("#!/bin/bash\n" + "echo localhost\n" * nodes)
    for tool in ("srun", "scontrol"):
        (folder / tool).chmod(0o755)
    path = f"{folder}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": "node[1-2]",
            "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(REPO), "GPUS_PER_NODE": "1",
            "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_slurm_script_encodes_then_trains_on_two_nodes(tmp_path: Path) -> None:
    """scripts/slurm_train.sh with configs/accelerate/multinode.yaml: two nodes of one process (localhost, gloo)."""
    photos, cache_dir, out = link_flower_photos(tmp_path / "photos", 3), tmp_path / "cache", tmp_path / "run"
    env = fake_slurm(tmp_path / "bin", nodes=2)
    env["ENCODE_ARGS"] = (f"--vae {TAEF2} --data {photos} --out {cache_dir} --resolution 32 --shard-size 4 "
                          "--num-workers 0")
    arguments = ["--config", str(REPO / "configs" / "flowers64_dit_s2_otcfm.yaml")]
    for override in [*TINY, f"data.cache={cache_dir}", f"output_dir={out}", "train.max_steps=2"]:
        arguments += ["--set", override]
    done = subprocess.run(["bash", str(REPO / "scripts" / "slurm_train.sh"), *arguments], env=env, text=True,
                          capture_output=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 node(s) x 1 process(es), rendezvous localhost:" in done.stdout
    assert done.stdout.count("trained to step 2") == 2  # one process on each node
    encoded = LatentCache(cache_dir)
    keys = [raw["__key__"] for shard in encoded.shards for raw in encoded.read_shard(shard)]
    assert sorted(keys) == sorted(record.key for record in open_source(str(photos)).records) and len(keys) == 15
    names = {shard.path.name for shard in encoded.shards}
    assert any(n.endswith("-r0.tar") for n in names) and any(n.endswith("-r1.tar") for n in names)
    assert len(losses(out)) == 2 and (out / "model" / "diffusion_pytorch_model.safetensors").is_file()


def assert_same_run(run: Path, reference: Path, steps: int, streams: int, cache_dir: Path) -> None:
    """The same samples at every step as the reference (and as the streams define), losses equal up to rounding."""
    keys = KeyRecord.read(run / "keys")
    assert keys == KeyRecord.read(reference / "keys") == expected_keys(cache_dir, streams, steps)
    epoch = [key for step in range(min(steps, 5)) for key in keys[step]]  # 40 samples: 5 steps of 8
    assert len(epoch) == len(set(epoch))
    found, wanted = [float(x) for x in losses(run)], [float(x) for x in losses(reference)]
    assert found == pytest.approx(wanted, rel=1e-6) and len(found) == steps


@pytest.mark.slow
def test_two_processes_resume_on_one_then_two_again(cache: Path, tmp_path: Path) -> None:  # noqa: F811
    """2 processes (accumulation 1) -> 1 (accumulation 2) -> 2: the same micro-batches as one process throughout."""
    run, reference = tmp_path / "run", tmp_path / "reference"
    train_launched(tmp_path, "first", run_overrides(cache, run, "train.max_steps=2"))
    train_here(run_overrides(cache, run, "train.max_steps=4", "optim.grad_accumulation=2"), resume="latest")
    train_launched(tmp_path, "third", run_overrides(cache, run, "train.max_steps=6"), resume="latest")
    train_here(run_overrides(cache, reference, "train.max_steps=6", "optim.grad_accumulation=2", "data.streams=2"))
    assert_same_run(run, reference, steps=6, streams=2, cache_dir=cache)
    assert len(set(key for step in range(5) for key in KeyRecord.read(run / "keys")[step])) == 40  # one epoch


@pytest.mark.slow
def test_one_process_resumes_on_two(cache: Path, tmp_path: Path) -> None:  # noqa: F811
    """A run started on 1 process has one data stream; on 2 both read it and each trains on its half."""
    run, reference = tmp_path / "run", tmp_path / "reference"
    train_here(run_overrides(cache, run, "train.max_steps=2", "optim.grad_accumulation=2"))
    train_launched(tmp_path, "second", run_overrides(cache, run, "train.max_steps=4"), resume="latest")
    train_here(run_overrides(cache, reference, "train.max_steps=4", "optim.grad_accumulation=2"))
    assert_same_run(run, reference, steps=4, streams=1, cache_dir=cache)


def test_resume_with_other_data_streams_is_refused(cache: Path, tmp_path: Path) -> None:  # noqa: F811
    from latentflow.errors import LatentflowError
    from latentflow.train.trainer import Trainer

    run = tmp_path / "run"
    train_here(run_overrides(cache, run, "train.max_steps=1", "data.streams=2"))
    trainer = Trainer(load_config(None, run_overrides(cache, run, "train.max_steps=2", "data.streams=4")))
    with pytest.raises(LatentflowError, match=r"data.streams 4 differs from checkpoint .*step-00000001's 2"):
        trainer.fit(resume="latest")


FSDP_SCRIPT = textwrap.dedent('''
    """Train under accelerate's FSDP2 plugin on the CPU; save what each rank holds to REPORT.rankR.pt.

    accelerate 1.16 builds the plugin from `accelerate launch --config_file fsdp_8gpu.yaml` but keeps a CPU job
    MULTI_CPU (DDP): state.py switches to FSDP only for GPU-like devices. This test switches it on, as a GPU job
    would be; torch's fully_shard itself runs on gloo.
    """
    import sys
    import torch
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from latentflow.train.config import load_config
    from latentflow.train.trainer import Trainer, make_accelerator

    report, resume, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    config = load_config(None, overrides)
    accelerator = make_accelerator(config)
    assert accelerator.distributed_type == DistributedType.MULTI_CPU, accelerator.distributed_type
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
    trainer = Trainer(config, accelerator)
    trainer.fit(resume=None if resume == "-" else resume)
    parameters = list(trainer.unwrapped.parameters())
    moments = [trainer.optimizer.optimizer.state[p]["exp_avg"] for p in parameters]
    torch.save({"types": sorted({type(p).__name__ for p in parameters}),
                "blocks": [type(block).__name__ for block in trainer.unwrapped.blocks],
                "shapes": [tuple(p.shape) for p in parameters],
                "local": [tuple(p.to_local().shape) for p in parameters],
                "moments": [tuple(m.to_local().shape) for m in moments],
                "ema": [tuple(s.shape) for s in trainer.ema.shards], "ema_full": trainer.ema.model is not None},
               f"{report}.rank{trainer.accelerator.process_index}.pt")
    # Leave without the interpreter's teardown: once in three CI runs a gloo/FSDP background thread was still
    # joinable there and the process aborted ("terminate called without an active exception") after both
    # reports had been written. (fit() has already destroyed the process group.)
    sys.stdout.flush()
    sys.stderr.flush()
    import os
    os._exit(0)
''')


def launch_fsdp(tmp_path: Path, report: str, resume: str, overrides: list[str]) -> None:
    """FSDP_SCRIPT on 2 gloo processes with configs/accelerate/fsdp_8gpu.yaml; reports to tmp_path/REPORT.rankR.pt."""
    script = tmp_path / "fsdp_train.py"
    script.write_text(FSDP_SCRIPT)
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(REPO / "configs" / "accelerate" / "fsdp_8gpu.yaml"), "--num_processes", "2",
                           "--mixed_precision", "no", "--main_process_port", str(free_port()), str(script),
                           str(tmp_path / report), resume, *overrides], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_exported_weights(run: Path, reference: Path) -> None:
    from latentflow.models import load_model

    exported, wanted = load_model(run / "model"), load_model(reference / "model")
    for (name, value), expected in zip(exported.state_dict().items(), wanted.state_dict().values()):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_fsdp2_shards_resumes_exactly_and_exports_the_whole_ema(cache: Path, tmp_path: Path) -> None:  # noqa: F811
    """FSDP2 on 2 gloo processes (accumulation 2) against one process with accumulation 4: same micro-batches."""
    run, reference = tmp_path / "run", tmp_path / "reference"
    for report, steps, resume in (("first", 2, "-"), ("second", 4, "latest")):
        launch_fsdp(tmp_path, report, resume,
                    run_overrides(cache, run, f"train.max_steps={steps}", "optim.grad_accumulation=2"))
    ranks = [torch.load(tmp_path / f"second.rank{rank}.pt") for rank in (0, 1)]
    assert ranks[0]["types"] == ["DTensor"] and ranks[0]["blocks"] == ["FSDPDiTBlock", "FSDPDiTBlock"]
    for index, shape in enumerate(ranks[0]["shapes"]):
        rows = [r["local"][index][0] for r in ranks]
        assert sum(rows) == shape[0] and max(rows) < shape[0] or shape[0] == 1  # each rank holds its rows only
        assert [r["moments"][index] for r in ranks] == [r["local"][index] for r in ranks]  # AdamW state sharded
        assert [r["ema"][index] for r in ranks] == [r["local"][index] for r in ranks]  # the EMA too
    assert [r["ema_full"] for r in ranks] == [True, False]  # the whole EMA lives on the main process only
    checkpoint = run / "checkpoints" / "step-00000004"
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (checkpoint / folder).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    train_here(run_overrides(cache, reference, "train.max_steps=4", "optim.grad_accumulation=4", "data.streams=2"))
    assert_same_run(run, reference, steps=4, streams=2, cache_dir=cache)
    assert_same_exported_weights(run, reference)


@pytest.mark.slow
def test_fsdp2_trains_a_flow_map_with_its_jvp_as_one_process_does(cache: Path, tmp_path: Path) -> None:  # noqa: F811
    """meanflow (the JVP through the sharded blocks, a new flow map's interval input) under FSDP2 on 2 gloo
    processes (accumulation 2) against one process (accumulation 4): same losses, errors and exported weights."""
    run, reference = tmp_path / "run", tmp_path / "reference"
    meanflow = ["objective.name=meanflow", "objective.flow_map_share=0.5", "train.max_steps=2"]
    launch_fsdp(tmp_path, "report", "-", run_overrides(cache, run, *meanflow, "optim.grad_accumulation=2"))
    assert torch.load(tmp_path / "report.rank0.pt")["types"] == ["DTensor"]  # it was sharded
    train_here(run_overrides(cache, reference, *meanflow, "optim.grad_accumulation=4", "data.streams=2"))
    assert_same_run(run, reference, steps=2, streams=2, cache_dir=cache)
    errors = [[float(row["error"]) for row in CsvLog.read(folder / "log.csv")] for folder in (run, reference)]
    assert errors[0] == pytest.approx(errors[1], rel=1e-5) and min(errors[0]) > 0
    from latentflow.models import load_model

    exported = load_model(run / "model")
    assert exported.config.flow_map and exported.interval_embedder.time_scale == 1.0
    assert_same_exported_weights(run, reference)


SHARD_SCRIPT = textwrap.dedent('''
    """Pair noise with a cache's points sharded over the processes, and with every point in this process; save
    both to REPORT.rankR.pt."""
    import sys
    import torch
    from accelerate import Accelerator
    from latentflow.data.cache import LatentCache
    from latentflow.data.potential import load_cell_shard, load_dataset_cells
    from latentflow.train.pairing import dataset_pairing, sharded_dataset_pairing

    cache, report = sys.argv[1], sys.argv[2]
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    found = {}
    for name in ("potential", "aware"):
        cells = load_dataset_cells(LatentCache(cache), name, normalized=True, random_flip=False, screen=False)
        shard = cells.shard(rank, world, "cpu")
        generator = torch.Generator().manual_seed(100 + rank)
        x0 = torch.randn(6, *cells.points.shape[1:], generator=generator)
        labels = torch.randint(0, 5, (6,), generator=generator)
        sharded = sharded_dataset_pairing(shard, x0, labels, accelerator.gather,
                                          lambda tensor: accelerator.reduce(tensor, "sum"), rank)
        whole = dataset_pairing(cells, x0, labels)
        read = load_cell_shard(LatentCache(cache), name, True, False, rank, world, "cpu", screen=False)
        held = lambda shard: [[] if c is None else (c.points, c.potential) for c in shard.cells]
        found[name] = {"sharded": (sharded.x1_index, sharded.x1, sharded.labels, sharded.cost),
                       "whole": (whole.x1_index, whole.x1, whole.labels, whole.cost),
                       "held": [[] if c is None else c.points for c in shard.cells],
                       "read": (held(read), read.firsts, read.labels, read.group_classes),
                       "cut": (held(shard), shard.firsts, shard.labels, shard.group_classes)}
    # entropic: many draws for the same noise rows, against the softmax over all points
    cells = load_dataset_cells(LatentCache(cache), "soft", normalized=True, random_flip=False)
    shard, gumbel = cells.shard(rank, world, "cpu"), torch.Generator().manual_seed(7 + rank)
    x0 = torch.randn(4, *cells.points.shape[1:], generator=torch.Generator().manual_seed(200 + rank))
    repeated = x0.repeat(4000, 1, 1, 1)  # each row 4,000 times, with Gumbel draws of its own
    draws = sharded_dataset_pairing(shard, repeated, None, accelerator.gather,
                                    lambda tensor: accelerator.reduce(tensor, "sum"), rank, gumbel).x1_index
    draws = draws.view(4000, 4)
    softmax = torch.softmax(-cells.cells[0].scores(x0.flatten(1)) / cells.cells[0].epsilon, dim=1)  # (4, P)
    found["soft"] = {"draws": draws, "softmax": softmax}
    torch.save(found, f"{report}.rank{rank}.pt")
''')


@pytest.mark.slow
def test_points_sharded_over_two_processes_pair_and_train_as_one_process_holding_them_all(
        cache: Path, tmp_path: Path) -> None:  # noqa: F811
    """objective.ot_dataset_on: sharded on 2 gloo processes: each holds half of every class's points, and the
    pairs (points, latents, labels, costs) and the training run are those of one process pairing against all."""
    from latentflow import cli

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    fit = ["--steps", "300", "--batch", "512", "--balance-draws", "400", "--no-progress"]
    assert cli.main(["ot-fit", str(copy), *fit]) == 0
    assert cli.main(["ot-fit", str(copy), "--name", "aware", "--class-aware", *fit]) == 0
    assert cli.main(["ot-fit", str(copy), "--name", "soft", "--epsilon", "20", *fit]) == 0
    script = tmp_path / "shard_and_pair.py"
    script.write_text(SHARD_SCRIPT)
    launch(script, [str(copy), str(tmp_path / "pairs")])
    reports = [torch.load(tmp_path / f"pairs.rank{rank}.pt") for rank in (0, 1)]
    for name in ("potential", "aware"):
        for report in reports:
            for found, wanted in zip(report[name]["sharded"], report[name]["whole"]):
                assert torch.equal(torch.as_tensor(found), torch.as_tensor(wanted)), name
        held = [[len(part) for part in report[name]["held"]] for report in reports]
        for report in reports:  # a process reading its part from the cache holds what cutting all points gives
            (read, *others), (cut, *wanted) = report[name]["read"], report[name]["cut"]
            assert len(read) == len(cut) and all(torch.equal(a, b) for r, c in zip(read, cut) for a, b in zip(r, c))
            for a, b in zip(others, wanted):  # firsts, labels, group classes (None class-blind)
                assert (a is None and b is None) or torch.equal(torch.as_tensor(a), torch.as_tensor(b))
        assert held == ([[20], [20]] if name == "potential" else [[4] * 5, [4] * 5])  # half of every group each
    for report in reports:  # entropic: each share's Gumbel draws make the merged choice a draw from the softmax
        draws, softmax = report["soft"]["draws"], report["soft"]["softmax"]
        frequencies = torch.stack([torch.bincount(row, minlength=40) for row in draws.T]).double() / len(draws)
        assert (softmax.amax(dim=1) < 0.9).all()  # spread over several points: the hard argmin would fail below
        assert ((frequencies - softmax).abs().sum(dim=1) / 2).max() < 0.05  # sampling alone: about 0.01-0.03
    both = torch.cat([reports[0]["aware"]["sharded"][0], reports[1]["aware"]["sharded"][0]])
    assert both.unique().numel() > 6  # the 12 draws went to many cells, on both shares
    run, reference = tmp_path / "run", tmp_path / "reference"
    dataset = ["objective.name=rf", "objective.ot_scope=dataset", "objective.ot_potential=aware",
               "objective.class_aware=true", "data.normalize=true", "data.sample_posterior=false",
               "train.max_steps=3"]
    train_launched(tmp_path, "trained", run_overrides(copy, run, *dataset, "objective.ot_dataset_on=sharded"))
    train_here(run_overrides(copy, reference, *dataset, "objective.ot_dataset_on=device",
                             "optim.grad_accumulation=2", "data.streams=2"))
    assert_same_run(run, reference, steps=3, streams=2, cache_dir=copy)
    costs = [[float(row["ot_cost"]) for row in CsvLog.read(folder / "log.csv")] for folder in (run, reference)]
    assert costs[0] == pytest.approx(costs[1], rel=1e-6) and min(costs[0]) > 0


FIT_SCRIPT = textwrap.dedent('''
    """ot-fit of CACHE as NAME (class-aware, 40 steps of 129 draws, saved every 10), stopped after step STOP."""
    import sys
    from latentflow.data.potential import OTFitConfig, fit_cache_potential
    from latentflow.flow.semidiscrete import FitSettings

    cache, name, stop = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def stop_at(step, status):
        if step == stop:
            raise KeyboardInterrupt

    config = OTFitConfig(cache, name=name, fit=FitSettings(steps=40, batch_size=129), class_aware=True,
                         balance_draws=50, save_every=10, device=None, progress=False)
    try:
        fit_cache_potential(config, stop_at)
    except KeyboardInterrupt:  # both processes stop at the same step; they leave the process group together, as
        import torch.distributed  # a finished fit's barrier has them do (apart, one could abort at exit:
        torch.distributed.barrier()  # "terminate called without an active exception", seen in CI)
        torch.distributed.destroy_process_group()
''')


@pytest.mark.slow
def test_a_fit_split_over_two_processes_is_the_fit_of_one_and_resumes_on_another_count(
        cache: Path, tmp_path: Path) -> None:  # noqa: F811
    """`accelerate launch -m latentflow.cli ot-fit` on 2 gloo processes: each scores half of every step's draws
    (an odd batch: 65 and 64 rows) and the summed counts make the potential and balance of one process's fit;
    a 2-process fit stopped at step 25 resumes from its step-20 state on one process to the same potential."""
    from safetensors.torch import load_file

    from latentflow import cli
    from latentflow.data.potential import potential_paths

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy, ignore=shutil.ignore_patterns("ot"))
    fit = ["--class-aware", "--steps", "40", "--batch", "129", "--balance-draws", "50", "--no-progress"]
    launch("-m", ["latentflow.cli", "ot-fit", str(copy), "--name", "two", *fit])
    assert cli.main(["ot-fit", str(copy), "--name", "one", *fit]) == 0

    def fitted(name: str) -> tuple[torch.Tensor, dict]:
        potential_path, json_path, state_path = potential_paths(copy, name)
        assert not state_path.exists()
        return load_file(str(potential_path))["potential"], json.loads(json_path.read_text())

    (two, two_record), (one, one_record) = fitted("two"), fitted("one")
    assert (two_record["processes"], one_record["processes"]) == (2, 1)
    assert torch.equal(two, one) and two.std() > 0
    for key in ("total_variation", "chi_square_per_dof", "max_over_mean", "min_over_mean", "per_group_excess"):
        assert two_record["balance"][key] == one_record["balance"][key], key  # the same integer counts
    assert two_record["balance"]["pair_cost"] == pytest.approx(one_record["balance"]["pair_cost"], rel=1e-9)
    script = tmp_path / "fit_and_stop.py"
    script.write_text(FIT_SCRIPT)
    launch(script, [str(copy), "resumed", "25"])
    assert json.loads(potential_paths(copy, "resumed")[1].read_text())["step"] == 20
    assert potential_paths(copy, "resumed")[2].exists()
    assert cli.main(["ot-fit", str(copy), "--name", "resumed", *fit]) == 0
    resumed, record = fitted("resumed")
    assert torch.equal(resumed, one) and record["processes"] == 1
