"""`latentflow reflow` on a real teacher: a tiny class-conditional DiT trained on a real TAEF2 cache of flower photos
(latents normalised), sampled through its real pipeline; the couplings cache, its resume and 2-process runs, the
refusals, and training on stored couplings (`objective.coupling: stored`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from flower_assets import FLOWERS, REPO, TAEF2, encode_flower_cache, link_flower_photos

from latentflow import cli
from latentflow.data.cache import LatentArrays, LatentCache, make_latent_loader
from latentflow.errors import LatentflowError
from latentflow.export import export_run, load_pipeline
from latentflow.flow.objectives import make_objective
from latentflow.models import DiT
from latentflow.reflow import ReflowConfig, coupling_key, coupling_label, coupling_noise, make_couplings
from latentflow.train.config import load_config, validate_config
from latentflow.train.pairing import PairingTransform, check_coupling

PER_CLASS = 2
N = 7
SEED = 3
EULER = ["--solver", "euler", "--steps", "3"]

pytestmark = pytest.mark.skipif(
    not (TAEF2.is_dir() and FLOWERS.is_dir()), reason=f"shared assets missing: need {TAEF2} and {FLOWERS}"
)


@pytest.fixture(scope="module")
def plain_cache(tmp_path_factory) -> Path:
    """2 real photos of each of the 5 flower classes encoded by TAEF2 at 64 px (32 x 8 x 8 latents)."""
    photos = link_flower_photos(tmp_path_factory.mktemp("flowers"), PER_CLASS)
    return encode_flower_cache(photos, tmp_path_factory.mktemp("cache") / "cache", batch_size=10, shard_size=10)


@pytest.fixture(scope="module")
def run_dir(plain_cache: Path, tmp_path_factory) -> Path:
    """The teacher: a tiny class-conditional DiT trained 2 steps with rf on normalised latents."""
    from accelerate.state import AcceleratorState

    from latentflow.train.trainer import train

    out = tmp_path_factory.mktemp("runs") / "teacher"
    AcceleratorState._reset_state(reset_partial_state=True)
    train(load_config(None, [
        "model.name=dit", "model.settings={hidden_size: 32, depth: 1, num_heads: 2, patch_size: 2}",
        "data.batch_size=5", "data.shuffle_buffer=10", "data.normalize=true", "log.trackers=[]",
        "log.progress_bar=false", "sample.every=0", "train.max_steps=2", "checkpoint.every=0", "optim.lr=1e-2",
        "objective.name=rf", "train.ema_decay=0.5", f"data.cache={plain_cache}", f"output_dir={out}",
    ]))
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


@pytest.fixture(scope="module")
def pipe_dir(run_dir: Path, tmp_path_factory) -> Path:
    return export_run(run_dir, tmp_path_factory.mktemp("pipes") / "teacher", grid_images=0)


@pytest.fixture(scope="module")
def couplings(pipe_dir: Path, tmp_path_factory) -> Path:
    """N couplings of the exported teacher with guidance 2, through the CLI, in shards of 3 and batches of 3."""
    out = tmp_path_factory.mktemp("couplings") / "euler3"
    assert reflow(pipe_dir, out, N, *EULER, "--guidance-scale", "2", "--batch-size", "3", "--shard-size", "3") == 0
    return out


def reflow(teacher: Path, out: Path, n: int, *options: str) -> int:
    return cli.main(["reflow", str(teacher), "--n", str(n), "--out", str(out), "--seed", str(SEED), "--no-progress",
                     *options])


def samples(out: Path) -> dict[int, dict]:
    """Every stored sample by index: endpoint (float32), noise, label; asserts each index is stored once."""
    cache = LatentCache(out)
    found: dict[int, dict] = {}
    for shard in cache.shards:
        for raw in cache.read_shard(shard):
            arrays = LatentArrays.decode([raw], cache.latent_shape)
            index = int(raw["__key__"])
            assert index not in found, f"index {index} stored twice"
            found[index] = {"endpoint": arrays.mean[0].float(), "noise": arrays.noise[0],
                            "label": None if arrays.labels is None else int(arrays.labels[0]),
                            "info": json.loads(raw["json"])}
    return found


def tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time (to see that nothing was written)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# ---- what is stored ----------------------------------------------------------------------------------------------


def test_endpoints_are_the_teachers_integration_of_the_seeded_noise(couplings: Path, pipe_dir: Path) -> None:
    pipe = load_pipeline(pipe_dir, progress=False)
    stored = samples(couplings)
    assert sorted(stored) == list(range(N))
    for index, sample in stored.items():
        assert torch.equal(sample["noise"], coupling_noise(SEED, index, (32, 8, 8)))
        assert sample["label"] == coupling_label(SEED, index, 5) and sample["info"]["nfe"] == 3
        alone = pipe(latents=sample["noise"][None], class_labels=[sample["label"]], solver="euler",
                     num_inference_steps=3, guidance_scale=2.0, output_type="latent")
        torch.testing.assert_close(sample["endpoint"], alone.images[0].half().float(), atol=2e-3, rtol=1e-3)
    counts = Counter(sample["label"] for sample in stored.values())
    assert len(counts) == 5 and set(counts.values()) == {1, 2}  # 7 over 5 classes: balanced


def test_manifest_carries_the_source_vae_and_the_teachers_statistics(couplings: Path, pipe_dir: Path,
                                                                      run_dir: Path) -> None:
    manifest = json.loads((couplings / "manifest.json").read_text())
    source = json.loads((run_dir / "cache_manifest.json").read_text())
    scheduler = json.loads((pipe_dir / "scheduler" / "scheduler_config.json").read_text())
    assert manifest["vae"] == source["vae"] and manifest["latent_shape"] == [32, 8, 8]
    assert manifest["num_classes"] == 5 and manifest["label_names"] == source["label_names"]
    assert manifest["channel_mean"] == scheduler["latent_mean"] == source["channel_mean"]
    assert manifest["channel_std"] == scheduler["latent_std"]
    assert manifest["members"] == ["mean.npy", "noise.npy", "cls", "json"] and not manifest["stochastic"]
    section = manifest["couplings"]
    assert section["teacher"]["path"] == str(pipe_dir.resolve()) and section["teacher"]["kind"] == "pipeline"
    assert set(section["teacher"]["files"]) == {"diffusion_pytorch_model.safetensors"}
    assert (section["solver"], section["steps"], section["guidance_scale"], section["seed"]) == ("euler", 3, 2.0, SEED)
    assert section["n"] == N and section["nfe_per_sample"] == 3 and section["normalized"] is True
    cache = LatentCache(couplings)
    assert cache.has_noise and not cache.has_std and not cache.has_flip and len(cache) == N
    assert len(cache.shards) == 3


def test_loader_batches_carry_the_noise_as_float32(couplings: Path, plain_cache: Path) -> None:
    for in_memory in (False, True):
        batch = next(make_latent_loader(couplings, batch_size=4, seed=0, random_flip=False, in_memory=in_memory))
        assert batch["noise"].dtype == torch.float32 and batch["noise"].shape == batch["latents"].shape == (4, 32, 8, 8)
        for key, noise in zip(batch["keys"], batch["noise"]):
            assert torch.equal(noise, coupling_noise(SEED, int(key), (32, 8, 8)))
    assert "noise" not in next(make_latent_loader(plain_cache, batch_size=4, seed=0))
    assert not LatentCache(plain_cache).has_noise


# ---- resume, extension, several processes -----------------------------------------------------------------------


def test_a_subset_then_the_full_n_makes_each_index_once(couplings: Path, run_dir: Path, tmp_path: Path,
                                                        capsys) -> None:
    """From the run folder (the same weights as the export): 3, then all N; the full cache equals the one-go one."""
    out = tmp_path / "grown"
    options = [*EULER, "--guidance-scale", "2", "--batch-size", "2", "--shard-size", "2"]
    assert reflow(run_dir, out, 3, *options) == 0
    first = samples(out)
    assert reflow(run_dir, out, N, *options) == 0
    assert f"made {N - 3} couplings" in capsys.readouterr().out
    grown, one_go = samples(out), samples(couplings)
    assert sorted(grown) == list(range(N))
    for index in range(N):
        assert torch.equal(grown[index]["noise"], one_go[index]["noise"])
        assert grown[index]["label"] == one_go[index]["label"]
        torch.testing.assert_close(grown[index]["endpoint"], one_go[index]["endpoint"], atol=2e-3, rtol=1e-3)
    assert all(torch.equal(first[i]["endpoint"], grown[i]["endpoint"]) for i in first)  # written once, kept
    before = tree(out)
    assert reflow(run_dir, out, N, *options) == 0
    assert "complete, nothing to do" in capsys.readouterr().out and tree(out) == before
    assert reflow(run_dir, out, 4, *options) == 2  # fewer than it holds
    assert "--n 7 or more" in capsys.readouterr().err and tree(out) == before


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_makes_each_index_once(run_dir: Path, tmp_path: Path, capsys) -> None:
    out, n = tmp_path / "killed", 400
    command = [sys.executable, "-m", "latentflow.cli", "reflow", str(run_dir), "--n", str(n), "--out", str(out),
               "--solver", "euler", "--steps", "2", "--batch-size", "1", "--shard-size", "4", "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while len(list((out / "index").glob("shard-*.json"))) < 3 and time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "manifest.json").exists(), "the run finished before the kill: make it longer"
    done = {key for path in (out / "index").glob("shard-*.json") for key in json.loads(path.read_text())["keys"]}
    assert 0 < len(done) < n
    assert cli.main(command[3:]) == 0
    assert f"made {n - len(done)} couplings" in capsys.readouterr().out
    assert sorted(samples(out)) == list(range(n)) and not list(out.glob(".shard-*"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_process_accelerate_launch_makes_each_index_once(couplings: Path, pipe_dir: Path, tmp_path: Path) -> None:
    out, n = tmp_path / "two", 6
    launched = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
         str(free_port()), "-m", "latentflow.cli", "reflow", str(pipe_dir), "--n", str(n), "--out", str(out),
         "--seed", str(SEED), *EULER, "--guidance-scale", "2", "--batch-size", "2", "--shard-size", "2",
         "--no-progress"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)
    assert launched.returncode == 0, launched.stderr[-3000:]
    names = sorted(path.name for path in out.glob("shard-*.tar"))
    assert names == ["shard-000000-r0.tar", "shard-000000-r1.tar", "shard-000001-r0.tar", "shard-000001-r1.tar"]
    for name in names:  # rank r made the indices i with i % 2 == r
        keys = json.loads((out / "index" / f"{name}.json").read_text())["keys"]
        assert {int(key) % 2 for key in keys} == {int(name[-5])}
    two, one = samples(out), samples(couplings)
    assert sorted(two) == list(range(n))
    for index in range(n):
        assert torch.equal(two[index]["noise"], one[index]["noise"]) and two[index]["label"] == one[index]["label"]
        torch.testing.assert_close(two[index]["endpoint"], one[index]["endpoint"], atol=2e-3, rtol=1e-3)
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == n


# ---- refusals of the output folder -----------------------------------------------------------------------------


def other_teacher(pipe_dir: Path, out: Path) -> Path:
    """A copy of the teacher pipeline whose transformer weights differ slightly."""
    shutil.copytree(pipe_dir, out)
    model = DiT.from_pretrained(pipe_dir / "transformer")
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    model.save_pretrained(out / "transformer")
    return out


def test_another_teacher_or_settings_or_folder_is_refused_and_nothing_written(couplings: Path, pipe_dir: Path,
                                                                             plain_cache: Path, tmp_path: Path,
                                                                             capsys) -> None:
    before = tree(couplings)
    common = ["--guidance-scale", "2", "--batch-size", "3", "--shard-size", "3"]
    assert reflow(other_teacher(pipe_dir, tmp_path / "other"), couplings, N + 2, *EULER, *common) == 2
    assert "teacher_weights_sha256" in capsys.readouterr().err
    assert reflow(pipe_dir, couplings, N + 2, "--solver", "euler", "--steps", "4", *common) == 2
    assert "steps=3, this run has steps=4" in capsys.readouterr().err
    assert reflow(pipe_dir, couplings, N + 2, *EULER, "--guidance-scale", "1") == 2
    assert "guidance_scale" in capsys.readouterr().err
    assert tree(couplings) == before
    cache_before = tree(plain_cache)
    assert reflow(pipe_dir, plain_cache, 2, *EULER) == 2
    assert "written by `latentflow encode`" in capsys.readouterr().err and tree(plain_cache) == cache_before
    elsewhere = tmp_path / "notes"
    elsewhere.mkdir()
    (elsewhere / "todo.txt").write_text("mine")
    assert reflow(pipe_dir, elsewhere, 2, *EULER) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not reflow couplings" in error
    assert sorted(p.name for p in elsewhere.iterdir()) == ["todo.txt"]
    assert reflow(tmp_path / "nothing", tmp_path / "out", 2, *EULER) == 2
    assert "neither a pipeline folder" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert reflow(pipe_dir, tmp_path / "negative", 2, *EULER, "--guidance-scale", "-1") == 2  # was a folder left
    assert capsys.readouterr().err == ("latentflow reflow: error: guidance_scale must be >= 0 and finite (1 means no "
                                       "guidance), got -1.0\n") and not (tmp_path / "negative").exists()
    assert reflow(pipe_dir, tmp_path / "adaptive", 2, "--solver", "dopri5", "--steps", "3") == 2  # was ignored
    assert capsys.readouterr().err.startswith("latentflow reflow: error: --steps=3: solver 'dopri5' picks its own "
                                              "steps") and not (tmp_path / "adaptive").exists()


def test_a_pipeline_without_its_cache_manifest_still_gives_a_trainable_cache(pipe_dir: Path, couplings: Path,
                                                                             tmp_path: Path) -> None:
    """Without cache_manifest.json the VAE identity comes from the pipeline's own VAE: still the same VAE."""
    from latentflow.vae import identity_differences

    bare = tmp_path / "bare"
    shutil.copytree(pipe_dir, bare)
    (bare / "cache_manifest.json").unlink()
    result = make_couplings(ReflowConfig(teacher=bare, n=2, out=tmp_path / "out", solver="euler", steps=3,
                                         guidance_scale=2.0, seed=SEED, progress=False))
    reference = json.loads((couplings / "manifest.json").read_text())
    assert not identity_differences(reference["vae"], result.manifest["vae"])
    assert result.manifest["channel_mean"] == reference["channel_mean"]
    assert result.manifest["resolution"] == 64 and result.manifest["preprocessing"] is None


# ---- training on stored couplings ------------------------------------------------------------------------------


STUDENT = ["objective.name=rf", "objective.coupling=stored", "data.random_flip=false", "data.normalize=true"]


def student(cache: Path, *overrides: str):
    return load_config(None, [f"data.cache={cache}", "data.batch_size=4", *overrides])


def test_stored_coupling_refusals(couplings: Path, plain_cache: Path, tmp_path: Path) -> None:
    validate_config(student(couplings, *STUDENT))
    check_coupling(student(couplings, *STUDENT), LatentCache(couplings))
    check_coupling(student(couplings, "objective.name=rf"), LatentCache(couplings))  # sampled: noise ignored
    with pytest.raises(LatentflowError, match="stores no noise"):
        check_coupling(student(plain_cache, *STUDENT), LatentCache(plain_cache))
    with pytest.raises(LatentflowError, match="set data.normalize: true"):
        check_coupling(student(couplings, *STUDENT, "data.normalize=false"), LatentCache(couplings))
    with pytest.raises(LatentflowError, match="data.random_flip: false"):
        validate_config(student(couplings, *STUDENT, "data.random_flip=true"))
    with pytest.raises(LatentflowError, match="would re-pair"):
        validate_config(student(couplings, *STUDENT, "objective.name=otcfm"))
    with pytest.raises(LatentflowError, match="would re-pair"):
        validate_config(student(couplings, *STUDENT, "objective.name=otcfm", "objective.ot_scope=global"))
    with pytest.raises(LatentflowError, match="would re-pair"):
        validate_config(student(couplings, *STUDENT, "objective.name=meanflow", "objective.flow_map_pairing=ot",
                                "sample.solver=flowmap"))
    validate_config(student(couplings, *STUDENT, "objective.name=meanflow", "sample.solver=flowmap"))
    with_std = tmp_path / "with_std"  # reflow never stores stds: a manifest that claims them
    shutil.copytree(couplings, with_std)
    manifest = json.loads((with_std / "manifest.json").read_text())
    (with_std / "manifest.json").write_text(json.dumps({**manifest, "stochastic": True}))
    with pytest.raises(LatentflowError, match="data.sample_posterior: false"):
        check_coupling(student(with_std, *STUDENT), LatentCache(with_std))
    check_coupling(student(with_std, *STUDENT, "data.sample_posterior=false"), LatentCache(with_std))


def test_pairing_transform_trains_on_the_stored_pairs(couplings: Path) -> None:
    cache = LatentCache(couplings)
    transform = PairingTransform(make_objective("rf"), seed=0, rank=0, num_classes=5, label_dropout=0.0, pair=True,
                                 stored_noise=True)
    loader = make_latent_loader(cache, batch_size=4, seed=0, random_flip=False, normalize=True)
    batch = next(loader)
    prepared = transform(batch, torch.Generator().manual_seed(0))
    assert torch.equal(prepared.x0, batch["noise"]) and torch.equal(prepared.x1, batch["latents"])
    t = prepared.t.view(-1, 1, 1, 1)
    torch.testing.assert_close(prepared.x_t, t * prepared.x1 + (1 - t) * prepared.x0, atol=0, rtol=0)
    torch.testing.assert_close(prepared.target, prepared.x1 - prepared.x0, atol=0, rtol=0)
    for key, x0 in zip(batch["keys"], prepared.x0):
        assert torch.equal(x0, coupling_noise(SEED, int(key), (32, 8, 8)))
    endpoint = batch["latents"] * cache.channel_std.view(1, -1, 1, 1) + cache.channel_mean.view(1, -1, 1, 1)
    stored = samples(couplings)
    torch.testing.assert_close(endpoint, torch.stack([stored[int(k)]["endpoint"] for k in batch["keys"]]),
                               atol=1e-5, rtol=1e-5)
    sampled = PairingTransform(make_objective("rf"), 0, 0, 5, 0.0, pair=True)(batch, torch.Generator().manual_seed(0))
    assert not torch.allclose(sampled.x0, batch["noise"])  # 'sampled' ignores the stored noise
    assert coupling_key(12) == "00000012"
