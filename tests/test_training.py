"""The training loop on a real TAEF2 latent cache of real flower photos.

One small cache (40 photos at 64 px -> 32 x 8 x 8 latents, 5 classes) is encoded once for
the module. Runs use a tiny DiT so each step takes milliseconds of compute.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from flower_assets import FLOWERS, REPO, TAEF2, encode_flower_cache, link_flower_photos

from latentflow import cli
from latentflow.errors import LatentflowError
from latentflow.models import load_model
from latentflow.train.checkpoint import find_checkpoint, list_checkpoints
from latentflow.train.config import load_config
from latentflow.train.logs import CsvLog

PER_CLASS = 8

pytestmark = pytest.mark.skipif(
    not (TAEF2.is_dir() and FLOWERS.is_dir()), reason=f"shared assets missing: need {TAEF2} and {FLOWERS}"
)

TINY = [
    "model.name=dit", "model.settings={hidden_size: 32, depth: 2, num_heads: 2, patch_size: 2}",
    "data.batch_size=8", "data.shuffle_buffer=16", "data.num_workers=0", "log.trackers=[]", "log.every=1",
    "log.progress_bar=false", "optim.lr=1e-3", "sample.every=0",
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A real latent cache: 8 photos of each of the 5 classes encoded by TAEF2 at 64 px, 4 shards."""
    root = link_flower_photos(tmp_path_factory.mktemp("flowers"), PER_CLASS)
    out = root.with_name(root.name + "_cache")  # one per fixture instance (other modules import this fixture)
    return encode_flower_cache(root, out, batch_size=20, shard_size=10)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each in-process Trainer builds its own Accelerator (precision is fixed per process state)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield


def tiny_config(cache: Path, out: Path, *overrides: str):
    return load_config(None, [*TINY, f"data.cache={cache}", f"output_dir={out}", *overrides])


def losses(run: Path) -> list[str]:
    return [row["loss"] for row in CsvLog.read(run / "log.csv")]


@pytest.fixture(scope="module")
def finished_run(cache: Path, tmp_path_factory) -> Path:
    """`latentflow train` for 6 steps with checkpoints every 3, samples and the end export."""
    out = tmp_path_factory.mktemp("runs") / "full"
    args = ["train", "--config", str(FLOWERS_CONFIG)]
    for override in full_run_overrides(cache, out):
        args += ["--set", override]
    assert cli.main(args) == 0
    return out


FLOWERS_CONFIG = REPO / "configs" / "flowers64_dit_s2_otcfm.yaml"


def full_run_overrides(cache: Path, out: Path) -> list[str]:
    """The shipped flowers config shrunk to a tiny model and 6 steps."""
    return [*TINY, f"data.cache={cache}", f"output_dir={out}", "train.max_steps=6", "checkpoint.every=3",
            "checkpoint.keep=2", "sample.every=3", "sample.num_images=4", "sample.steps=2", "optim.warmup_steps=0",
            "optim.schedule=constant",
            "data.in_memory=false", "data.num_workers=1"]


def test_train_command_writes_run_directory(finished_run: Path, cache: Path) -> None:
    assert len(losses(finished_run)) == 6
    assert sorted(p.name for p in (finished_run / "samples").iterdir()) == ["step-000003.png", "step-000006.png"]
    assert [c.step for c in list_checkpoints(finished_run / "checkpoints")] == [3, 6]
    model = load_model(finished_run / "model")
    assert (model.config.in_channels, model.config.sample_size, model.config.num_classes) == (32, 8, 5)
    manifest = json.loads((finished_run / "cache_manifest.json").read_text())
    assert manifest == json.loads((cache / "manifest.json").read_text())
    assert load_config(finished_run / "config.yaml").train.max_steps == 6
    rows = CsvLog.read(finished_run / "log.csv")
    assert all(float(row["ot_cost"]) > 0 and float(row["images_per_s"]) > 0 for row in rows)
    assert rows[2]["straightness"] and not rows[1]["straightness"]


def test_plot_log_draws_png(finished_run: Path) -> None:
    assert cli.main(["plot-log", str(finished_run)]) == 0
    assert (finished_run / "log.png").stat().st_size > 10_000
    assert cli.main(["plot-log", str(finished_run), "--out", str(finished_run / "log.txt")]) == 2  # PNG bytes were
    assert not (finished_run / "log.txt").exists()  # written under the name


def test_plot_log_of_a_file_that_is_no_training_log_is_one_line(tmp_path: Path, capsys) -> None:
    """Found trying the command from outside: a value that is no number, or a CSV of other columns, gave
    ValueError and ZeroDivisionError tracebacks."""
    for text, message in [("step,loss\n1,1.5\n2,abc\n", "log.csv, line 3: loss is 'abc', not a number"),
                          ("a,b\n1,2\n", "log.csv is not a training log (no step column or none of ")]:
        (tmp_path / "log.csv").write_text(text)
        assert cli.main(["plot-log", str(tmp_path)]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"latentflow plot-log: error: {tmp_path}/{message}") and error.count("\n") == 1
    assert not (tmp_path / "log.png").exists()


def test_resume_gives_the_same_losses_as_continuing(finished_run: Path, cache: Path, tmp_path: Path) -> None:
    from latentflow.train.trainer import Trainer

    config = load_config(FLOWERS_CONFIG, full_run_overrides(cache, tmp_path / "resumed") + ["train.max_steps=3"])
    Trainer(config).fit()
    assert losses(tmp_path / "resumed") == losses(finished_run)[:3]
    config.train.max_steps = 6
    Trainer(config).fit(resume="latest")
    assert losses(tmp_path / "resumed") == losses(finished_run)


def test_resume_into_other_model_settings_names_them_before_loading(finished_run: Path, cache: Path,
                                                                     tmp_path: Path, capsys) -> None:
    """Found trying the command from outside: --resume with other model settings was torch's state-dict traceback
    (missing and unexpected keys), or, for a setting without weights (qk_norm off keeps none), a silent resume; with
    another objective's prediction or data.normalize, a silent resume."""
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    before = sorted(path.name for path in (run / "checkpoints").iterdir())
    base = ["train", "--config", str(FLOWERS_CONFIG), "--resume", "latest"]
    for override in [*full_run_overrides(cache, run), "train.max_steps=9"]:
        base += ["--set", override]
    for setting, message in (("model.settings.depth=1", "depth 2 (this config: 1)"),
                             ("model.settings.hidden_size=64", "hidden_size 32 (this config: 64)")):
        assert cli.main([*base, "--set", setting]) == 2
        error = capsys.readouterr().err
        assert (f"error: checkpoint {run}/checkpoints/step-00000006 holds a model with {message}; resume with the "
                f"run's own model settings ({run}/config.yaml)") in error and error.count("\n") == 1
    # what the same weights compute: a velocity run resumed as ddpm (noise prediction), or on other latent scales
    normalize = load_config(run / "config.yaml").data.normalize
    for setting, message in (("objective.name=ddpm", "objective.name 'otcfm' (this config: 'ddpm')"),
                             (f"data.normalize={str(not normalize).lower()}",
                              f"data.normalize {normalize} (this config: {not normalize})")):
        assert cli.main([*base, "--set", setting]) == 2
        error = capsys.readouterr().err
        assert (f"error: checkpoint {run}/checkpoints/step-00000006 was trained with {message}, which changes what "
                f"its model computes") in error and error.count("\n") == 1
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == before


def test_resume_on_another_cache_is_refused_before_loading(finished_run: Path, cache: Path, tmp_path: Path,
                                                           capsys) -> None:
    """Found trying the command from outside: --resume with data.cache naming another cache (or the same one
    re-encoded or extended since) continued silently, on other latents under another normalisation."""
    other = encode_flower_cache(link_flower_photos(tmp_path / "photos", 2), tmp_path / "other", batch_size=10,
                                shard_size=10)
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    manifest = (run / "cache_manifest.json").read_text()
    args = ["train", "--config", str(FLOWERS_CONFIG), "--resume", "latest"]
    for override in [*full_run_overrides(other, run), "train.max_steps=9"]:
        args += ["--set", override]
    assert cli.main(args) == 2
    error = capsys.readouterr().err
    assert (f"error: checkpoint {run}/checkpoints/step-00000006 was trained on another cache than data.cache {other} "
            f"(or on it before it was re-encoded or extended: its manifest differs)") in error
    assert error.count("\n") == 1 and (run / "cache_manifest.json").read_text() == manifest
    assert sorted(path.name for path in (run / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]


def test_truncated_checkpoint_is_named_and_latest_falls_back(finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    newest = run / "checkpoints" / "step-00000006"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(LatentflowError, match=r"step-00000006 is corrupt: model.safetensors has 100 bytes"):
        find_checkpoint(run, str(newest))
    info = find_checkpoint(run, "latest")
    assert info.step == 3 and "step-00000006" in info.skipped[0]
    (run / "checkpoints" / "step-00000003" / "checkpoint.json").unlink()
    with pytest.raises(LatentflowError, match="no intact checkpoint.*step-00000003 is incomplete"):
        find_checkpoint(run, "latest")


def test_a_new_run_refuses_an_output_dir_holding_work_and_changes_nothing(finished_run: Path, cache: Path,
                                                                          tmp_path: Path, capsys) -> None:
    """Found trying the command from outside: training again into a finished run without --resume started over,
    replacing its model, log and config (and pruning checkpoints by step); into a cache it mixed the run in."""
    def listing(folder: Path) -> dict[str, int]:
        return {str(path.relative_to(folder)): path.stat().st_size for path in sorted(folder.rglob("*"))}

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    before, cache_before = listing(run), listing(cache)
    base = ["train", "--config", str(FLOWERS_CONFIG)]
    for override in full_run_overrides(cache, run):
        base += ["--set", override]
    assert cli.main(base) == 2
    assert capsys.readouterr().err == (f"latentflow train: error: output_dir {run} holds a run's checkpoints (up to "
                                       f"step-00000006) that a new run would overwrite; add --resume latest to "
                                       f"continue it, or choose another output_dir\n")
    assert listing(run) == before
    shutil.rmtree(run / "checkpoints")
    assert cli.main(base) == 2
    assert "holds a finished run's model (model/config.json)" in capsys.readouterr().err
    assert cli.main([*base, "--set", f"output_dir={cache}"]) == 2
    assert f"output_dir {cache} holds a latent cache (manifest.json)" in capsys.readouterr().err
    assert listing(cache) == cache_before


def test_loss_falls_on_a_fixed_batch(cache: Path, tmp_path: Path) -> None:
    from latentflow.train.trainer import Trainer

    trainer = Trainer(tiny_config(cache, tmp_path, "objective.name=rf", "optim.grad_clip=0", "optim.lr=1e-2"))
    batch = next(trainer.batches())  # same x_t, t and target every step
    results = [trainer.train_step(batch) for _ in range(40)]
    assert results[-1].loss < 0.5 * results[0].loss


def test_bf16_autocast_path_runs_on_cpu(cache: Path, tmp_path: Path) -> None:
    from latentflow.train.trainer import Trainer

    trainer = Trainer(tiny_config(cache, tmp_path, "train.mixed_precision=bf16"))
    assert trainer.accelerator.mixed_precision == "bf16"
    inside = []
    trainer.unwrapped.blocks[0].attn.qkv.register_forward_hook(lambda module, args, out: inside.append(out.dtype))
    batches = trainer.batches()
    results = [trainer.train_step(next(batches)) for _ in range(2)]
    assert all(not r.skipped and torch.isfinite(torch.tensor(r.loss)) for r in results)
    assert inside == [torch.bfloat16, torch.bfloat16]  # the matmuls ran in bf16
    assert next(trainer.model.parameters()).dtype == torch.float32  # master weights stay fp32


def test_auto_precision_is_bf16_exactly_where_the_cpu_has_native_bf16(cache: Path, tmp_path: Path) -> None:
    from latentflow.train.trainer import Trainer, resolve_precision

    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    expected = "bf16" if native else "no"
    assert resolve_precision("auto", cuda=False) == expected
    assert resolve_precision("no", cuda=False) == "no" and resolve_precision("bf16", cuda=False) == "bf16"
    assert Trainer(tiny_config(cache, tmp_path, "train.mixed_precision=auto")).accelerator.mixed_precision == expected


def test_trainings_of_different_precisions_follow_each_other_in_one_process(cache: Path, tmp_path: Path) -> None:
    """accelerate keeps one precision per process; `latentflow demo --few-step` trains its model (bf16 where
    native) and then the flow map (float32) in one process."""
    from latentflow.train.trainer import make_accelerator

    for precision in ("bf16", "no", "bf16"):
        config = tiny_config(cache, tmp_path / precision, f"train.mixed_precision={precision}")
        assert make_accelerator(config).mixed_precision == precision


def test_non_finite_steps_are_skipped_then_stop_the_job(cache: Path, tmp_path: Path, capsys) -> None:
    from latentflow.train.trainer import Trainer

    trainer = Trainer(tiny_config(cache, tmp_path, "train.max_nonfinite_steps=3"))
    batches = trainer.batches()
    trainer.train_step(next(batches))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    ema_before = [p.detach().clone() for p in trainer.ema.model.parameters()]
    poisoned = next(batches)
    poisoned[0].x_t[0, 0, 0, 0] = float("nan")
    result = trainer.train_step(poisoned)
    assert result.skipped and trainer.state.skipped_steps == 1 and trainer.state.step == 2
    assert "not finite, step skipped" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ema_before, trainer.ema.model.parameters()))
    assert not trainer.train_step(next(batches)).skipped  # a finite step resets the count
    trainer.train_step(poisoned)
    trainer.train_step(poisoned)
    with pytest.raises(LatentflowError, match="stopped at step 6: 3 steps in a row had a non-finite loss"):
        trainer.train_step(poisoned)


def test_cache_with_other_latent_shape_is_refused_before_work(cache: Path, tmp_path: Path) -> None:
    from latentflow.train.trainer import Trainer

    out = tmp_path / "never"
    config = tiny_config(cache, out,
                         "model.settings={hidden_size: 32, depth: 2, num_heads: 2, in_channels: 4, sample_size: 32}")
    with pytest.raises(LatentflowError,
                       match=r"holds latents of shape \(32, 8, 8\) but the model .* takes \(4, 32, 32\)"):
        Trainer(config)
    assert not out.exists()


DISTRIBUTED_SCRIPT = textwrap.dedent('''
    import json, sys, zlib
    import torch
    from latentflow.train.config import load_config
    from latentflow.train.trainer import Trainer
    from latentflow.train.pairing import global_ot_pairing, seed_for

    cache, out, report = sys.argv[1], sys.argv[2], sys.argv[3]
    config = load_config(None, sys.argv[4:] + [f"data.cache={cache}", f"output_dir={out}"])
    trainer = Trainer(config)
    rank, accelerator = trainer.accelerator.process_index, trainer.accelerator
    seen, pairs = [], []
    batches = trainer.batches()
    for step in range(3):
        micro = next(batches)
        raw = micro[0]
        seen += [zlib.crc32(row.numpy().tobytes()) for row in raw["latents"]]
        generator = torch.Generator().manual_seed(raw["seed"])
        noise = torch.randn(raw["latents"].shape, generator=torch.Generator().manual_seed(raw["seed"]))
        result = global_ot_pairing(raw["latents"], raw["labels"], trainer.objective.coupling, accelerator.gather,
                                   rank, generator, torch.Generator().manual_seed(seed_for(0, step, 2)))
        all_noise = accelerator.gather(noise)
        pairs.append({"noise_index": result.noise_index.tolist(),
                      "x0_matches": bool(torch.equal(result.pairing.x0, all_noise[result.noise_index])),
                      "keeps_own_data": bool(torch.equal(result.pairing.x1, raw["latents"]))})
        trainer.train_step(micro)
    trainer.fit()
    flat = torch.cat([p.detach().flatten() for p in trainer.unwrapped.parameters()])
    torch.save(flat, f"{report}.params{rank}.pt")
    with open(f"{report}.rank{rank}.json", "w") as stream:
        json.dump({"seen": seen, "pairs": pairs, "world": accelerator.num_processes, "step": trainer.state.step},
                  stream)
''')


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_process_launch_keeps_ranks_in_sync_with_global_ot(cache: Path, tmp_path: Path) -> None:
    script = tmp_path / "dist_train.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    report = tmp_path / "report"
    overrides = [*TINY, "objective.ot_scope=global", "train.max_steps=5", "checkpoint.every=0"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()),
               str(script), str(cache), str(tmp_path / "run"), str(report), *overrides]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(Path(f"{report}.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world"] for r in reports] == [2, 2] and [r["step"] for r in reports] == [5, 5]
    assert torch.equal(torch.load(f"{report}.params0.pt"), torch.load(f"{report}.params1.pt"))
    for step in range(3):
        rows = slice(step * 4, (step + 1) * 4)
        assert not set(reports[0]["seen"][rows]) & set(reports[1]["seen"][rows])  # ranks saw different samples
        noise = reports[0]["pairs"][step]["noise_index"] + reports[1]["pairs"][step]["noise_index"]
        assert sorted(noise) == list(range(8))  # one plan for the global batch of 8: a permutation
        assert all(r["pairs"][step]["x0_matches"] and r["pairs"][step]["keeps_own_data"] for r in reports)
    assert [c.step for c in list_checkpoints(tmp_path / "run" / "checkpoints")] == [5]
    assert (tmp_path / "run" / "model" / "config.json").is_file()


def test_unet_with_ddpm_trains_and_samples_through_ddim(cache: Path, tmp_path: Path) -> None:
    from latentflow.train.trainer import Trainer

    unet = ("model.settings={block_out_channels: [32, 32], attention_levels: [false, true], layers_per_block: 1, "
            "attention_head_dim: 8, norm_num_groups: 8}")
    trainer = Trainer(tiny_config(cache, tmp_path, "model.name=unet", unet, "objective.name=ddpm",
                                  "sample.steps=3", "sample.num_images=2"))
    batches = trainer.batches()
    results = [trainer.train_step(next(batches)) for _ in range(2)]
    assert all(not r.skipped and r.ot_cost is None for r in results)
    latents, straightness = trainer.sample_latents()
    assert latents.shape == (2, 32, 8, 8) and straightness is None and torch.isfinite(latents).all()


def test_guided_samples_differ_from_unguided(cache: Path, tmp_path: Path) -> None:
    from latentflow.train.trainer import Trainer

    trainer = Trainer(tiny_config(cache, tmp_path, "sample.steps=2", "sample.num_images=3"))
    batches = trainer.batches()
    for _ in range(3):
        trainer.train_step(next(batches))
    plain, _ = trainer.sample_latents()
    trainer.config.sample.guidance_scale = 3.0
    guided, straightness = trainer.sample_latents()
    assert guided.shape == plain.shape and not torch.allclose(guided, plain) and straightness >= 0


@pytest.mark.slow
def test_accelerate_launch_of_scripts_train_with_shipped_config(cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
               str(REPO / "scripts" / "train.py"), "--config", str(FLOWERS_CONFIG)]
    for override in [*TINY, f"data.cache={cache}", f"output_dir={out}", "train.max_steps=2", "checkpoint.every=0"]:
        command += ["--set", override]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [row["step"] for row in CsvLog.read(out / "log.csv")] == ["1", "2"]
    assert (out / "model" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.slow
def test_sigkill_during_training_then_resume_loses_nothing(finished_run: Path, cache: Path, tmp_path: Path) -> None:
    """A real SIGKILL of `latentflow train` mid-run; `--resume latest` then logs the uninterrupted losses."""
    import signal
    import time

    out = tmp_path / "killed"
    args = [sys.executable, "-m", "latentflow.cli", "train", "--config", str(FLOWERS_CONFIG)]
    for override in full_run_overrides(cache, out) + ["checkpoint.every=1", "checkpoint.keep=6", "sample.every=0"]:
        args += ["--set", override]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    deadline = time.monotonic() + 300
    while not list((out / "checkpoints").glob("step-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert not (out / "model").exists()  # killed before the end
    # a killed run is a start for another: its cache manifest is written when it starts (it was written at the end,
    # so --init from an unfinished run's checkpoint was refused)
    started = tmp_path / "from_killed"
    init = ["train", "--config", str(FLOWERS_CONFIG), "--init", str(sorted((out / "checkpoints").glob("step-*"))[0])]
    for override in full_run_overrides(cache, started) + ["train.max_steps=1", "sample.every=0"]:
        init += ["--set", override]
    assert cli.main(init) == 0 and (started / "model" / "config.json").is_file()
    resumed = args + ["--resume", "latest"]
    result = subprocess.run(resumed, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert losses(out) == losses(finished_run)
