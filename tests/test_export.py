"""export / sample / fid-stats / evaluate on a real (tiny) training run over a real TAEF2 cache of flower photos."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_assets import FLOWERS, TAEF2, link_flower_photos
from PIL import Image

from latentflow import cli
from latentflow.card import card_evaluation_size
from latentflow.errors import LatentflowError
from latentflow.export import export_run, load_pipeline
from latentflow.flow.solvers import integrate
from latentflow.models import load_model

PER_CLASS = 2

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (TAEF2.is_dir() and FLOWERS.is_dir()), reason=f"shared assets missing: {TAEF2}, {FLOWERS}"),
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """2 real photos of each of the 5 flower classes (symlinks)."""
    return link_flower_photos(tmp_path_factory.mktemp("flowers"), PER_CLASS)


@pytest.fixture(scope="module")
def run_dir(photos: Path, tmp_path_factory) -> Path:
    """Encode the photos with TAEF2 at 64 px, then train a tiny class-conditional DiT for 2 steps
    with per-channel latent normalisation (so export must carry the channel statistics)."""
    from accelerate.state import AcceleratorState

    from latentflow.data.encoder import EncodeConfig, encode_dataset
    from latentflow.train.config import load_config
    from latentflow.train.trainer import train

    cache = tmp_path_factory.mktemp("cache") / "cache"
    encode_dataset(EncodeConfig(vae=str(TAEF2), data=str(photos), out=cache, resolution=64, batch_size=10,
                                shard_size=10, num_workers=0, progress=False, command=["test"]))
    out = tmp_path_factory.mktemp("runs") / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    config = load_config(None, [
        "model.name=dit", "model.settings={hidden_size: 32, depth: 1, num_heads: 2, patch_size: 2}",
        "data.batch_size=5", "data.shuffle_buffer=10", "data.normalize=true", "log.trackers=[]",
        "log.progress_bar=false", "sample.every=0", "train.max_steps=2", "checkpoint.every=0",
        "sample.solver=midpoint", "sample.steps=3", "objective.name=rf", "train.ema_decay=0.5",
        f"data.cache={cache}", f"output_dir={out}",
    ])
    train(config)
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


@pytest.fixture(scope="module")
def pipe_dir(run_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pipes") / "pipe"
    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 0
    return out


def perturbed_copy(pipe_dir: Path, out: Path) -> Path:
    """A copy of the pipeline folder (or the folder itself when `out` is it) with seeded Gaussian noise (std 0.2)
    added to every floating-point weight of its transformer."""
    from safetensors.torch import load_file, save_file

    if out != pipe_dir:
        shutil.copytree(pipe_dir, out)
    weights = out / "transformer" / "diffusion_pytorch_model.safetensors"
    generator = torch.Generator().manual_seed(0)
    tensors = {name: value + 0.2 * torch.randn(value.shape, generator=generator) if value.is_floating_point()
               else value for name, value in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    return out


def test_a_pipeline_samples_with_its_runs_preview_guidance_by_default(run_dir: Path, tmp_path: Path, capsys):
    """Found trying the tool from outside: a pipeline's samples were unguided unless guidance was asked for (the
    demo's grids use 4), so `latentflow sample PIPE` gave worse images than the run's previews and the card."""
    import yaml

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["sample"]["guidance_scale"] = 3.0
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    pipe_dir = tmp_path / "pipe"
    assert cli.main(["export", str(run), "--out", str(pipe_dir), "--grid-images", "0"]) == 0
    pipe = perturbed_copy(pipe_dir, pipe_dir) and load_pipeline(pipe_dir)
    assert pipe.scheduler.config.guidance_scale == 3.0 and "guidance 3 (`guidance_scale`)" in (
        pipe_dir / "README.md").read_text()
    shape = (pipe.scheduler.config.latent_channels, *pipe.scheduler.config.latent_size)
    noise = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    images = {scale: pipe(latents=noise, class_labels=[0, 3], num_inference_steps=2, guidance_scale=scale,
                          output_type="latent").images for scale in (None, 3.0, 1.0)}
    assert torch.equal(images[None], images[3.0]) and not torch.allclose(images[None], images[1.0])
    capsys.readouterr()
    assert cli.main(["sample", str(pipe_dir), "--n", "2", "--steps", "2", "--grid", str(tmp_path / "g.png")]) == 0
    assert "2 images, midpoint-2, guidance 3, NFE per batch" in capsys.readouterr().out


def test_export_writes_a_standard_pipeline_folder(pipe_dir: Path, run_dir: Path):
    index = json.loads((pipe_dir / "model_index.json").read_text())
    assert index["_class_name"] == "LatentFlowPipeline"
    assert index["vae"] == ["latentflow.vae", "PooledAutoencoderTiny"]
    assert index["transformer"] == ["latentflow.models.dit", "DiT"]
    for part in ("transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json",
                 "cache_manifest.json", "training_config.yaml", "pipeline.py"):
        assert (pipe_dir / part).is_file(), part
    assert list((pipe_dir / "transformer").glob("*.safetensors")) and list((pipe_dir / "vae").glob("*.safetensors"))
    scheduler = json.loads((pipe_dir / "scheduler" / "scheduler_config.json").read_text())
    manifest = json.loads((run_dir / "cache_manifest.json").read_text())
    assert scheduler["objective"] == "rf" and scheduler["prediction_type"] == "velocity"
    assert scheduler["solver"] == "midpoint" and scheduler["num_inference_steps"] == 3
    assert scheduler["latent_channels"] == 32 and scheduler["latent_size"] == [8, 8]
    assert scheduler["latent_mean"] == manifest["channel_mean"] and scheduler["latent_std"] == manifest["channel_std"]
    assert scheduler["num_classes"] == 5 and scheduler["label_names"] == manifest["label_names"]
    assert not list(pipe_dir.parent.glob(".*tmp"))


def test_exported_pipeline_samples_what_the_run_model_integrates(pipe_dir: Path, run_dir: Path):
    """Known answer: the run's EMA model integrated directly, then de-normalised with the manifest statistics."""
    pipe = load_pipeline(pipe_dir, progress=False)
    manifest = json.loads((run_dir / "cache_manifest.json").read_text())
    model = load_model(run_dir / "model").eval()
    noise = torch.randn(3, 32, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 4])
    with torch.no_grad():
        direct = integrate(lambda x, t: model(x, t, class_labels=labels), noise, "midpoint", steps=3).x
    mean = torch.tensor(manifest["channel_mean"]).view(1, -1, 1, 1)
    std = torch.tensor(manifest["channel_std"]).view(1, -1, 1, 1)
    out = pipe(latents=noise, class_labels=labels, output_type="latent")
    assert out.nfe == 6
    assert torch.allclose(out.images, direct * std + mean, atol=1e-5)
    images = pipe(latents=noise, class_labels=["daisy", "sunflowers", "tulips"], output_type="np").images
    assert images.shape == (3, 64, 64, 3) and 0 <= images.min() and images.max() <= 1


def test_export_refuses_a_vae_other_than_the_cache_one(run_dir: Path, tmp_path: Path):
    altered = tmp_path / "run"
    shutil.copytree(run_dir, altered)
    manifest = json.loads((altered / "cache_manifest.json").read_text())
    manifest["vae"]["files"] = {name: "0" * 64 for name in manifest["vae"]["files"]}
    manifest["vae"]["weights_sha256"] = "0" * 64  # the same rule judges weights by their hash first
    (altered / "cache_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LatentflowError, match="not the one the cache was encoded with"):
        export_run(altered, tmp_path / "pipe")
    assert not (tmp_path / "pipe").exists()
    assert cli.main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "pipe")]) == 2
    with pytest.raises(LatentflowError, match=r"--grid-images must be an integer >= 0 \(0: no grid\), got -1"):
        export_run(run_dir, tmp_path / "pipe", grid_images=-1)  # was torch's negative-dimension traceback
    assert not (tmp_path / "pipe").exists()


@pytest.fixture(scope="module")
def guided_run(run_dir: Path, tmp_path_factory) -> Path:
    """3 steps on the run_dir's cache with train.guide_step=2 and a checkpoint at every step."""
    from accelerate.state import AcceleratorState

    from latentflow.train.config import load_config
    from latentflow.train.trainer import train

    out = tmp_path_factory.mktemp("runs") / "guided"
    AcceleratorState._reset_state(reset_partial_state=True)
    config = load_config(run_dir / "config.yaml", [f"output_dir={out}", "train.max_steps=3", "train.guide_step=2",
                                                   "checkpoint.every=1", "checkpoint.keep=3"])
    train(config)
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


def test_guide_step_keeps_that_steps_ema_weights_and_export_makes_them_the_guide(guided_run: Path, tmp_path: Path):
    from safetensors.torch import load_file

    ema = load_file(guided_run / "checkpoints" / "step-00000002" / "ema.safetensors")
    guide, final = load_model(guided_run / "guide"), load_model(guided_run / "model")
    for name, value in guide.state_dict().items():
        assert torch.equal(value, ema[f"model.{name}"]), name
    assert any(not torch.equal(value, final.state_dict()[name]) for name, value in guide.state_dict().items())

    out = tmp_path / "pipe"
    assert cli.main(["export", str(guided_run), "--out", str(out), "--grid-images", "0"]) == 0
    assert json.loads((out / "model_index.json").read_text())["guide"] == ["latentflow.models.dit", "DiT"]
    assert "EMA weights at step 2 (`guide/`)" in (out / "README.md").read_text()
    pipe = load_pipeline(out, progress=False)
    noise = torch.randn(2, 32, 8, 8, generator=torch.Generator().manual_seed(0))
    labels, null, scale = torch.tensor([0, 4]), torch.tensor([5, 5]), 3.0

    def field(x, t):  # known answer: the guide's null-class field plus w times the model's class direction
        unconditional = guide(x, t, class_labels=null)
        return unconditional + scale * (final(x, t, class_labels=labels) - unconditional)

    with torch.no_grad():
        direct = integrate(field, noise, "midpoint", steps=3).x
    manifest = json.loads((guided_run / "cache_manifest.json").read_text())
    mean = torch.tensor(manifest["channel_mean"]).view(1, -1, 1, 1)
    std = torch.tensor(manifest["channel_std"]).view(1, -1, 1, 1)
    out_latents = pipe(latents=noise, class_labels=labels, guidance_scale=scale, output_type="latent").images
    assert torch.allclose(out_latents, direct * std + mean, atol=1e-5)
    own = load_pipeline(out, progress=False, guide=False)
    assert own.guide is None
    assert (own(latents=noise, class_labels=labels, guidance_scale=scale, output_type="latent").images
            - out_latents).abs().max() > 1e-4

    assert cli.main(["export", str(guided_run), "--out", str(tmp_path / "bare"), "--no-guide",
                     "--grid-images", "0"]) == 0
    assert not (tmp_path / "bare" / "guide").exists() and load_pipeline(tmp_path / "bare").guide is None


def test_export_takes_another_runs_model_as_guide_only_on_the_same_latents(guided_run: Path, run_dir: Path,
                                                                          tmp_path: Path):
    out = tmp_path / "pipe"
    assert cli.main(["export", str(guided_run), "--out", str(out), "--guide", str(run_dir),
                     "--grid-images", "0"]) == 0
    guide = load_model(run_dir / "model")
    loaded = load_pipeline(out).guide
    assert all(torch.equal(value, loaded.state_dict()[name]) for name, value in guide.state_dict().items())

    from safetensors.torch import load_file  # a checkpoint of a finished run: its EMA weights

    checkpoint = guided_run / "checkpoints" / "step-00000001"
    export_run(guided_run, tmp_path / "from_checkpoint", guide=checkpoint, grid_images=0)
    loaded = load_pipeline(tmp_path / "from_checkpoint").guide
    ema = load_file(checkpoint / "ema.safetensors")
    assert all(torch.equal(value, ema[f"model.{name}"]) for name, value in loaded.state_dict().items())
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    manifest = json.loads((other / "cache_manifest.json").read_text())
    manifest["channel_mean"] = [value + 1.0 for value in manifest["channel_mean"]]
    (other / "cache_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LatentflowError, match=f"--guide {other} normalised its latents with other channel_mean"):
        export_run(guided_run, tmp_path / "refused", guide=other, grid_images=0)
    assert not (tmp_path / "refused").exists()


def test_export_refuses_an_out_that_holds_something_else_and_leaves_it_as_it_was(run_dir: Path, pipe_dir: Path,
                                                                                   tmp_path: Path, capsys):
    """Found trying the command from outside: `export RUN --out RUN` replaced the training run (checkpoints, log,
    config) with the pipeline, and an --out above the run would have replaced everything in it."""
    def listing(folder: Path) -> dict[str, int]:
        return {str(path.relative_to(folder)): path.stat().st_size for path in sorted(folder.rglob("*"))}

    before = listing(run_dir.parent)
    (tmp_path / "file").write_text("mine")
    for out, message in [(run_dir, f"{run_dir} is not a pipeline folder \\(no model_index.json\\)"),
                         (run_dir.parent, f"{run_dir.parent} is not a pipeline folder"),
                         (tmp_path / "file", f"{tmp_path / 'file'} is a file, not a pipeline folder")]:
        assert cli.main(["export", str(run_dir), "--out", str(out), "--grid-images", "0"]) == 2
        assert re.fullmatch(f"latentflow export: error: {message}.*\n", capsys.readouterr().err)
    assert listing(run_dir.parent) == before and (tmp_path / "file").read_text() == "mine"
    again = tmp_path / "pipe"  # an earlier pipeline folder is replaced, as before
    shutil.copytree(pipe_dir, again)
    (again / "stale.txt").write_text("from the earlier export")
    assert cli.main(["export", str(run_dir), "--out", str(again), "--grid-images", "0"]) == 0
    assert (again / "model_index.json").is_file() and not (again / "stale.txt").exists()


def test_a_broken_pipeline_folder_is_one_line_naming_it(pipe_dir: Path, tmp_path: Path, capsys):
    """Found trying the command from outside: a pipeline folder missing a component, with truncated weights or a
    config that is no JSON gave diffusers' 30-50-line tracebacks."""
    def broken(name: str, damage) -> Path:
        copy = tmp_path / name
        shutil.copytree(pipe_dir, copy)
        damage(copy)
        return copy

    weights = "transformer/diffusion_pytorch_model.safetensors"
    cases = [
        (broken("no_vae", lambda d: shutil.rmtree(d / "vae")), "is incomplete: vae/config.json is missing "
                                                               "\\(model_index.json names 'vae'\\)"),
        (broken("cut", lambda d: (d / weights).write_bytes((pipe_dir / weights).read_bytes()[:1000])),
         "could not be loaded \\(Unable to load weights"),
        (broken("json", lambda d: (d / "scheduler" / "scheduler_config.json").write_text("{")),
         "could not be loaded \\(It looks like the config file .* is not a valid JSON file"),
    ]
    for folder, message in cases:
        assert cli.main(["sample", str(folder), "--n", "1", "--steps", "1", "--grid", str(tmp_path / "g.png")]) == 2
        error = capsys.readouterr().err
        assert re.fullmatch(f"latentflow sample: error: pipeline {folder} {message}.*; export it again with "
                            f"`latentflow export RUN --out {folder}`\n", error), error
    assert not (tmp_path / "g.png").exists()


def test_a_run_with_damaged_model_files_is_one_line_naming_the_folder(run_dir: Path, tmp_path: Path, capsys):
    """Found trying the command from outside: truncated EMA weights or a model config that is no JSON in a run
    gave tracebacks in export (and in `train --init`, which loads the same way)."""
    cut, bad_json = tmp_path / "cut", tmp_path / "bad_json"
    for copy in (cut, bad_json):
        shutil.copytree(run_dir, copy)
    weights = next((cut / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    (bad_json / "model" / "config.json").write_text("{")
    for run, message in [(cut, f"model {cut / 'model'} could not be loaded \\(Unable to load weights.*\\); its "
                               f"files are damaged: write the folder again"),
                         (bad_json, f"{bad_json / 'model' / 'config.json'}: not a JSON object \\(Expecting")]:
        assert cli.main(["export", str(run), "--out", str(tmp_path / "pipe"), "--grid-images", "0"]) == 2
        error = capsys.readouterr().err
        assert re.fullmatch(f"latentflow export: error: {message}.*\n", error), error
    assert not (tmp_path / "pipe").exists()


def test_an_unreadable_image_in_a_reference_folder_is_one_line_naming_it(photos: Path, tmp_path: Path, capsys):
    """Found trying the command from outside: an empty or fake image file in fid-stats' folder (or evaluate's --ref
    and --floors folders) was PIL's traceback."""
    folder = tmp_path / "images"
    folder.mkdir()
    for photo in sorted(photos.rglob("*.jpg"))[:3]:
        os.symlink(photo.resolve(), folder / photo.name)
    (folder / "zz_empty.jpg").write_bytes(b"")
    assert cli.main(["fid-stats", str(folder), "--out", str(tmp_path / "ref.npz"), "--resolution", "64"]) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error == (f"latentflow fid-stats: error: {folder / 'zz_empty.jpg'}: not a readable image (cannot identify "
                     f"image file '{folder / 'zz_empty.jpg'}'); remove it from the folder or save it again")
    assert not (tmp_path / "ref.npz").exists()


def test_sample_command_writes_grid_and_images(pipe_dir: Path, tmp_path: Path, capsys):
    grid, outdir = tmp_path / "grid.png", tmp_path / "imgs"
    args = ["sample", str(pipe_dir), "--n", "5", "--steps", "2", "--solver", "euler", "--seed", "0",
            "--class", "roses", "--grid", str(grid), "--outdir", str(outdir), "--batch-size", "3"]
    assert cli.main(args) == 0
    assert "NFE per batch 2" in capsys.readouterr().out
    files = sorted(outdir.glob("*.png"))
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(5)]
    assert Image.open(files[0]).size == (64, 64) and Image.open(grid).size == (3 * 66 + 2, 2 * 66 + 2)
    # the same seed with another batch size gives the same images (per-image generators)
    again = tmp_path / "again"
    assert cli.main([*args[:-2], "--batch-size", "5", "--outdir", str(again)]) == 0
    for first, second in zip(files, sorted(again.glob("*.png"))):
        assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    shifted = tmp_path / "shifted"  # steps shifted towards the noise: other images from the same noise
    assert cli.main([*args[:-4], "--outdir", str(shifted), "--time-shift", "3"]) == 0
    assert not np.array_equal(np.asarray(Image.open(files[0])), np.asarray(Image.open(shifted / "000000.png")))
    assert cli.main([*args[:-4], "--outdir", str(shifted), "--solver", "dopri5", "--time-shift", "3"]) == 2
    assert cli.main(["sample", str(pipe_dir), "--class", "cactus", "--grid", str(grid)]) == 2


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], r"batch size must be an integer >= 1 \(images per pipeline call\), got 0"),
    (["--solver", "dopri5", "--atol", "0"], r"atol must be a finite number > 0 \(an adaptive solver's tolerance\)"),
    (["--eta", "0.5"], r"eta=0.5 is DDIM's stochasticity, and solver 'midpoint' integrates a deterministic ODE"),
    (["--device", "cuda:99"], r"device 'cuda:99': this (torch \(.*\) sees no CUDA GPU|machine has \d+ CUDA GPU)"),
    (["--device", "gpu"], r"device 'gpu' is not a torch device; use cpu, cuda, cuda:N or mps"),
    (["--outdir", "imgs", "--grid", "grid.txt"], r"grid.txt: cannot write a .txt image; end the name in .png or .jpg"),
    (["--outdir", "taken"], r"taken is a file, not a folder for the images; give a new folder"),
    (["--outdir", "PIPE"], r"holds a pipeline folder \(model_index.json\); give the images a folder of its own"),
    (["--solver", "dopri5", "--steps", "3"], r"--steps=3: solver 'dopri5' picks its own steps .* leave --steps out or "
                                             r"pick a fixed-step solver"),
    (["--solver", "euler", "--atol", "1e-3"], r"--atol=0.001: solver 'euler' takes a number of steps \(--steps\), "
                                              r"not a tolerance, .* leave --atol out or pick an adaptive solver"),
])
def test_sample_refuses_bad_settings_in_one_line_before_writing(pipe_dir: Path, tmp_path: Path, capsys, extra,
                                                                message):
    """Found trying the command from outside: these gave tracebacks (torchdiffeq's dt underflow, range() of step 0,
    torch's CUDA assertion) or, for --eta on a flow model, --steps on an adaptive solver and --atol on a fixed-step
    one, were silently ignored."""
    grid = tmp_path / "grid.png"
    (tmp_path / "taken").write_text("mine")
    extra = [str(tmp_path / name) if name.startswith(("imgs", "grid", "taken")) else name for name in extra]
    extra = [str(pipe_dir) if name == "PIPE" else name for name in extra]
    assert cli.main(["sample", str(pipe_dir), "--n", "2", "--grid", str(grid), *extra]) == 2
    error = capsys.readouterr().err
    assert re.fullmatch(f"latentflow sample: error: .*{message}.*\n", error), error
    assert not grid.exists() and not (tmp_path / "imgs").exists()  # the grid's name was refused before sampling


def test_fid_stats_and_evaluate_sweep(pipe_dir: Path, photos: Path, tmp_path: Path, capsys):
    ref = tmp_path / "ref.npz"
    assert cli.main(["fid-stats", str(photos), "--out", str(ref), "--batch-size", "10", "--resolution", "64"]) == 0
    with np.load(ref) as data:
        assert data["inception_features"].shape == (10, 2048) and data["inception_mu"].shape == (2048,)
        assert int(data["resolution"]) == 64
    capsys.readouterr()
    assert cli.main(["fid-stats", str(photos), "--out", str(tmp_path)]) == 2  # was found after every feature
    assert f"--out {tmp_path} is a folder; give the statistics file to write" in capsys.readouterr().err
    for option, value, message in (("--batch-size", "0", "--batch-size must be an integer >= 1, got 0"),
                                   ("--resolution", "-4", "--resolution must be a positive number of pixels")):
        bad = tmp_path / f"bad{option}.npz"  # batch size 0 went into one batch of all, resolution -4 a traceback
        assert cli.main(["fid-stats", str(photos), "--out", str(bad), option, value]) == 2
        assert message in capsys.readouterr().err and not bad.exists()

    out = tmp_path / "eval"
    args = ["evaluate", str(pipe_dir), "--ref", str(ref), "--n", "3", "--batch-size", "3", "--out", str(out),
            "--sweep", "euler:1,2", "dopri5:1e-2", "--kid-subsets", "3"]
    assert cli.main(args) == 0
    document = json.loads((out / "evaluation.json").read_text())
    results = {row["setting"]: row for row in document["results"]}
    assert list(results) == ["euler-1", "euler-2", "dopri5-tol1e-02"]
    assert results["euler-1"]["nfe"] == 1 and results["euler-2"]["nfe"] == 2
    assert results["dopri5-tol1e-02"]["nfe"] > 2 and results["dopri5-tol1e-02"]["nfe_per_batch"]
    assert all(row["fid"] > 0 and row["kid"] is not None for row in results.values())
    with open(out / "evaluation.csv") as handle:
        assert [row["setting"] for row in csv.DictReader(handle)] == list(results)
    assert Image.open(out / "fid_vs_nfe.png").size[0] > 100
    assert document["image_size"] == 64 and document["reference_resolution"] is None
    both = tmp_path / "both.png"  # plot-eval draws evaluations side by side; a file that is none is one line
    assert cli.main(["plot-eval", str(out), str(out / "evaluation.json"), "--labels", "a", "b",
                     "--out", str(both)]) == 0
    assert Image.open(both).size[0] > 100
    capsys.readouterr()
    foreign = tmp_path / "foreign.json"
    for text, message in [('{"results": "x"}', "not an evaluation of `latentflow evaluate` (no list of results)"),
                          ('{"results": [{"setting": "a", "solver": "euler", "fid": "high"}]}',
                           "results[0] is not a row with setting, solver, fid (a number)")]:
        foreign.write_text(text)  # found trying the command from outside: AttributeError / TypeError tracebacks
        assert cli.main(["plot-eval", str(foreign), "--out", str(tmp_path / "foreign.png")]) == 2
        assert capsys.readouterr().err == f"latentflow plot-eval: error: {foreign}: {message}\n"
    for target, message in [(tmp_path / "plot.txt", ": plots are written as PNG; end the name in .png"),
                            (tmp_path, " is a folder; give the .png file to write")]:
        assert cli.main(["plot-eval", str(out), "--out", str(target)]) == 2  # PNG bytes were written as plot.txt
        assert capsys.readouterr().err == f"latentflow plot-eval: error: --out {target}{message}\n"
    assert not (tmp_path / "plot.txt").exists()

    assert cli.main(["evaluate", str(pipe_dir), "--ref", str(ref), "--sweep", "euler"]) == 2
    capsys.readouterr()
    assert cli.main(["evaluate", str(pipe_dir), "--ref", str(tmp_path / "missing.npz")]) == 2
    assert f"reference not found: {tmp_path / 'missing.npz'}; give an image folder" in capsys.readouterr().err
    assert cli.main(["evaluate", str(pipe_dir), "--ref", str(ref), "--sweep", "ddim:10"]) == 2  # a velocity model
    # found trying it from outside: a reference that is no statistics file was a numpy traceback, and a missing
    # --floors folder was found only after the whole sweep had been sampled
    not_npz, one_array = tmp_path / "notes.txt", tmp_path / "one.npy"
    not_npz.write_text("not statistics")
    np.save(one_array, np.zeros(3))
    capsys.readouterr()
    for bad in (not_npz, one_array):
        assert cli.main(["evaluate", str(pipe_dir), "--ref", str(bad), "--out", str(tmp_path / "bad")]) == 2
        error = capsys.readouterr().err
        assert f"{bad} " in error and "not a statistics .npz; give an image folder, or a file written by " \
            "`latentflow fid-stats`" in error and error.count("\n") == 1
    assert cli.main(["evaluate", str(pipe_dir), "--ref", str(ref), "--floors", str(tmp_path / "nowhere"),
                     "--out", str(tmp_path / "bad")]) == 2
    assert f"--floors {tmp_path / 'nowhere'}: no such image folder" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before any sampling
    # session 28: floors from too few images were found after the sweep, KID with 0 subsets was NaN, a subset size
    # 0 named the sets' sizes, --ref-resolution 0 was taken as the default, an --out that is a file failed after the
    # first setting
    (tmp_path / "file").write_text("mine")
    for extra, message in [(["--floors", str(photos), "--n", str(2 * PER_CLASS * 5 + 1)],
                            f"floors need {2 * PER_CLASS * 5 + 1} training images"),
                           (["--kid-subsets", "0"], "--kid-subsets must be an integer >= 1, got 0"),
                           (["--kid-subset-size", "0"], "--kid-subset-size must be an integer >= 2, got 0"),
                           (["--ref", str(photos), "--ref-resolution", "0"],
                            "--ref-resolution must be an integer >= 1"),
                           (["--ref-resolution", "32"],  # session 30: ignored with statistics
                            f"--ref-resolution resizes the images of a folder --ref; {ref} holds statistics"),
                           (["--out", str(tmp_path / "file")], f"{tmp_path / 'file'} is a file, not a folder for the "
                                                               "evaluation"),
                           (["--out", str(pipe_dir)], f"{pipe_dir} holds a pipeline folder (model_index.json); "
                                                      "give the evaluation a folder of its own"),  # session 29: its
                           # files mixed with the pipeline's and went with the next export
                           (["--sweep", "euler:0"], "sweep item 'euler:0': step counts must be >= 1"),
                           (["--sweep", "dopri5:-1"], "sweep item 'dopri5:-1': tolerances must be finite numbers > 0"),
                           (["--sweep", "dopri5:8"],  # session 29: was a tolerance of 8
                            "sweep item 'dopri5:8': dopri5 picks its own steps, and its values are tolerances")]:
        assert cli.main(["evaluate", str(pipe_dir), "--ref", str(ref), "--out", str(tmp_path / "bad"), *extra]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"latentflow evaluate: error: {message}") and error.count("\n") == 1, error
        assert not (tmp_path / "bad").exists()

    # two training steps leave the velocity nearly constant, which any time grid integrates alike: shifts are
    # measured on a copy whose transformer weights are perturbed (a field that varies in x and t)
    lively = perturbed_copy(pipe_dir, tmp_path / "lively")
    args = ["evaluate", str(lively), *args[2:]]
    assert cli.main(args[:args.index("--sweep")] + ["--sweep", "euler:2", "--kid-subsets", "3"]) == 0
    plain = json.loads((out / "evaluation.json").read_text())["results"][0]
    shifted = tmp_path / "eval_shift"
    assert cli.main(args[:args.index("--out")] + ["--out", str(shifted), "--sweep", "euler:2", "dopri5:1e-2",
                                                   "--kid-subsets", "3", "--time-shift", "1", "2"]) == 0
    rows = {row["setting"]: row for row in json.loads((shifted / "evaluation.json").read_text())["results"]}
    assert list(rows) == ["euler-2", "euler-2-shift2", "dopri5-tol1e-02"]
    assert [row["time_shift"] for row in rows.values()] == [1.0, 2.0, None]
    assert rows["euler-2"]["fid"] == pytest.approx(plain["fid"], rel=1e-6)  # shift 1: the same samples
    assert rows["euler-2-shift2"]["fid"] != pytest.approx(rows["euler-2"]["fid"], rel=1e-6)
    assert cli.main(["evaluate", str(pipe_dir), "--ref", str(ref), "--time-shift", "0"]) == 2


def test_evaluate_keeps_each_setting_and_measures_only_what_is_new(pipe_dir: Path, photos: Path, tmp_path: Path,
                                                                  capsys) -> None:
    pipe = tmp_path / "pipe"
    shutil.copytree(pipe_dir, pipe)
    ref = tmp_path / "ref.npz"
    assert cli.main(["fid-stats", str(photos), "--out", str(ref), "--batch-size", "10", "--resolution", "64"]) == 0
    out = tmp_path / "eval"
    args = ["evaluate", str(pipe), "--ref", str(ref), "--n", "3", "--batch-size", "3", "--out", str(out),
            "--kid-subsets", "3"]

    def fids() -> dict[str, float]:
        return {row["setting"]: row["fid"] for row in json.loads((out / "evaluation.json").read_text())["results"]}

    def plant(value: float) -> None:  # a FID no measurement gives: reported back only if the file is read
        stored = out / "settings" / "euler-1.json"
        document = json.loads(stored.read_text())
        document["result"]["fid"] = value
        stored.write_text(json.dumps(document))

    assert cli.main([*args, "--sweep", "euler:1"]) == 0
    measured = fids()["euler-1"]
    plant(1234.5)
    capsys.readouterr()
    assert cli.main([*args, "--sweep", "euler:1,2"]) == 0  # an interrupted or a longer sweep: only euler-2 is new
    assert "euler-1: measured before" in capsys.readouterr().out
    assert fids()["euler-1"] == 1234.5 and 0 < fids()["euler-2"] != 1234.5
    assert json.loads((out / "settings" / "euler-2.json").read_text())["result"]["fid"] == fids()["euler-2"]

    assert cli.main([*args, "--sweep", "euler:1", "--seed", "1"]) == 0  # another seed: measured again, replaced
    assert fids()["euler-1"] not in (1234.5, measured)
    assert cli.main([*args, "--sweep", "euler:1"]) == 0
    assert fids()["euler-1"] == pytest.approx(measured, rel=1e-6)  # seed 0 again: the same samples, the same FID
    plant(1234.5)
    perturbed_copy(pipe, pipe)
    assert cli.main([*args, "--sweep", "euler:1"]) == 0  # other weights: measured again
    changed = fids()["euler-1"]
    assert changed not in (1234.5, measured)
    (out / "settings" / "euler-1.json").write_text('{"context": "trunc')  # a file cut short: measured again
    assert cli.main([*args, "--sweep", "euler:1"]) == 0
    assert fids()["euler-1"] == pytest.approx(changed, rel=1e-6)


def test_exported_files_get_the_umask_permissions_and_load_without_warnings(pipe_dir: Path, capfd) -> None:
    from diffusers.utils import logging as diffusers_logging

    umask = os.umask(0)
    os.umask(umask)
    weights = sorted(pipe_dir.rglob("*.safetensors"))
    assert weights and all((path.stat().st_mode & 0o777) == (0o666 & ~umask) for path in weights)
    diffusers_logging.set_verbosity_warning()
    capfd.readouterr()
    load_pipeline(pipe_dir)
    assert "will be ignored" not in capfd.readouterr().err


def test_a_quiet_load_and_an_early_error_print_no_progress_bars(pipe_dir: Path, tmp_path: Path, capfd) -> None:
    from diffusers.utils import logging as diffusers_logging

    capfd.readouterr()
    load_pipeline(pipe_dir, progress=False)
    assert "Loading pipeline components" not in capfd.readouterr().err
    assert diffusers_logging.is_progress_bar_enabled()  # others' loads keep their bar
    load_pipeline(pipe_dir)
    assert "Loading pipeline components" in capfd.readouterr().err
    assert cli.main(["sample", str(pipe_dir), "--class", "cactus", "--grid", str(tmp_path / "grid.png")]) == 2
    assert capfd.readouterr().err.strip().splitlines() == [
        "latentflow sample: error: unknown class 'cactus'; choose one of "
        "['daisy', 'dandelion', 'roses', 'sunflowers', 'tulips']"]


def test_the_model_card_parses_as_a_hub_card_and_names_files_that_exist(pipe_dir: Path) -> None:
    import re

    from huggingface_hub import ModelCard

    card = ModelCard.load(pipe_dir / "README.md")
    assert card.data.library_name == "diffusers" and card.data.license == "other"
    assert "latentflow" in card.data.tags and "class-conditional" in card.data.tags
    assert "custom_pipeline" in card.text and "LatentFlowPipeline.from_pretrained" in card.text
    named = re.findall(r"!\[[^\]]*\]\(([^)]+)\)|`([\w./-]+/)`", card.text)
    files = [image or folder for image, folder in named]
    assert "samples.png" in files and "transformer/" in files and "vae/" in files
    assert all((pipe_dir / name).exists() for name in files)
    assert Image.open(pipe_dir / "samples.png").size == (4 * 66 + 2, 4 * 66 + 2)  # 16 images of 64 px


def test_evaluate_with_floors_updates_the_card(pipe_dir: Path, photos: Path, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    pipe = tmp_path / "pipe"
    shutil.copytree(pipe_dir, pipe)
    ref = tmp_path / "ref.npz"
    assert cli.main(["fid-stats", str(photos), "--out", str(ref), "--batch-size", "10", "--resolution", "64"]) == 0
    args = ["evaluate", str(pipe), "--ref", str(ref), "--n", "4", "--batch-size", "4", "--sweep", "euler:1",
            "--kid-subsets", "3", "--floors", str(photos)]
    assert cli.main(args) == 0
    document = json.loads((pipe / "evaluation" / "evaluation.json").read_text())
    floors = {row["setting"]: row for row in document["floors"]}
    assert set(floors) == {"floor: real vs real", "floor: VAE round trip"}
    assert all(row["num_samples"] == 4 and row["fid"] > 0 for row in floors.values())
    assert len(list(tmp_path.glob("floors-*.json"))) == 1  # cached beside the reference statistics
    with open(pipe / "evaluation" / "evaluation.csv") as handle:
        assert [row["setting"] for row in csv.DictReader(handle)][-2:] == list(floors)
    card = ModelCard.load(pipe / "README.md")
    assert "## Evaluation" in card.text and "floor: VAE round trip" in card.text
    assert cli.main(args) == 0  # the second time the floors come from the cache
    assert json.loads((pipe / "evaluation" / "evaluation.json").read_text())["floors"] == document["floors"]

    guided = [*args, "--guidance-scale", "2", "--guidance-interval", "0.2", "0.8", "--out", str(tmp_path / "guided")]
    assert cli.main(guided) == 0
    assert json.loads((tmp_path / "guided" / "evaluation.json").read_text())["guidance_interval"] == [0.2, 0.8]
    assert "guidance 2.0 at times [0.2, 0.8]" in ModelCard.load(pipe / "README.md").text
    assert cli.main([*guided[:-5], "--guidance-interval", "0.8", "0.2"]) == 2  # refused before any work
    card = (pipe / "README.md").read_text()
    check = [*args[:4], "--n", "2", "--batch-size", "2", "--sweep", "euler:1", "--kid-subsets", "1",
             "--out", str(tmp_path / "check")]
    assert cli.main(check) == 0  # a quick check with fewer images leaves the card's evaluation of 4
    assert (pipe / "README.md").read_text() == card and "4 generated images per setting" in card
    assert card_evaluation_size(pipe) == 4 and card_evaluation_size(tmp_path) is None


def test_push_to_hub_offline_fails_with_one_line_after_the_folder_is_complete(run_dir: Path, tmp_path: Path,
                                                                             monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "pipe"
    code = cli.main(["export", str(run_dir), "--out", str(out), "--grid-images", "0", "--push-to-hub", "me/flowers"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert "me/flowers" in error and "the folder is complete" in error
    assert (out / "model_index.json").is_file() and (out / "README.md").is_file()
    assert not (out / "samples.png").exists()


def test_the_model_card_says_how_noise_was_paired():
    from latentflow.card import pairing_text

    dataset = pairing_text({"name": "otcfm", "ot_scope": "dataset", "class_aware": True, "ot_potential": "demo"})
    assert dataset.startswith("every noise draw with its optimal latent of the whole cache within each class")
    assert "potential `demo`" in dataset
    assert pairing_text({"name": "otcfm", "ot_scope": "local"}) == "minibatch OT: one OT plan for each batch"
    assert pairing_text({"name": "otcfm-sinkhorn", "ot_scope": "global"}).endswith("the global batch across processes")
    assert pairing_text({"name": "rf", "ot_scope": "local"}) == "independent draws"
    assert pairing_text({"name": "meanflow", "flow_map_pairing": "ot"}) == "minibatch OT: one OT plan for each batch"
    assert pairing_text({"name": "meanflow", "flow_map_pairing": "independent"}) == "independent draws"
    assert "couplings cache" in pairing_text({"name": "rf", "coupling": "stored"})


def test_the_model_card_names_the_default_sampler_and_time_shift():
    from latentflow.card import _training_lines

    plain = {"objective": "otcfm", "prediction_type": "velocity", "solver": "euler", "num_inference_steps": 8}
    assert _training_lines(plain, None, None)[0].endswith("default sampler `euler`, 8 steps")
    flow_map = {**plain, "solver": "flowmap", "num_inference_steps": 1}
    assert _training_lines(flow_map, None, None)[0].endswith("default sampler `flowmap`, 1 step")
    shifted = _training_lines({**plain, "time_shift": 2.0}, None, None)[0]
    assert shifted.endswith("8 steps, shifted towards the noise by 2 (`time_shift`)")
