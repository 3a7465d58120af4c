"""The main job end to end on a few real flower photos through the real TAEF2 (small sizes, same code path)."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from latentflow.cli import main
from latentflow.demo import find_splits

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FLOWERS = SHARED / "data" / "tf_flowers" / "images_128"
TAEF2 = SHARED / "weights" / "taef2"
pytestmark = pytest.mark.skipif(not (FLOWERS.is_dir() and TAEF2.is_dir()), reason="../shared assets not present")


def small_flowers(root: Path, per_class: int) -> Path:
    """A copy of a few photos per class, keeping the train/val layout."""
    for split in ("train", "val"):
        for class_dir in sorted((FLOWERS / split).iterdir())[:2]:
            target = root / "images" / split / class_dir.name
            target.mkdir(parents=True)
            for photo in sorted(class_dir.iterdir())[:per_class]:
                shutil.copy(photo, target / photo.name)
    return root / "images"


def test_find_splits_uses_train_and_val_folders(tmp_path):
    data = small_flowers(tmp_path, 1)
    splits = find_splits(str(tmp_path))
    assert splits.train == str(data / "train") and splits.reference == data / "val"
    flat = tmp_path / "flat"
    flat.mkdir()
    assert find_splits(str(flat)).reference is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_splits(str(tmp_path / "missing"))


@pytest.mark.parametrize("extra, message", [
    (["--guidance-scale", "nan"], r"guidance_scale must be >= 0 and finite \(1 means no guidance\), got nan"),
    (["--guidance-interval", "0.9", "0.1"], r"guidance_interval must be two times 0 <= low < high <= 1"),
    (["--sweep", "ddim:2"], r"unknown solver 'ddim' for a velocity model"),
    (["--train-steps", "0"], r"train.max_steps must be >= 1, got 0"),
    (["--few-step", "--few-step-train-steps", "0"], r"train.max_steps must be >= 1, got 0"),
    (["--out", "FILE"], r".*/file is a file, not a demo folder; give a new folder"),
])
def test_demo_refuses_bad_settings_before_encoding(tmp_path, capsys, extra, message):
    """Found trying the command from outside: these failed only at the stage that used them (training, or the
    evaluation after the whole run), or with a traceback (--out a file)."""
    (tmp_path / "file").write_text("mine")
    extra = [str(tmp_path / "file") if item == "FILE" else item for item in extra]
    args = ["demo", "--data", str(FLOWERS.parent), "--vae", str(TAEF2), "--out", str(tmp_path / "demo"), *extra]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert re.fullmatch(f"latentflow demo: error: {message}.*\n", error), error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]  # no demo folder, nothing encoded


@pytest.mark.slow
def test_demo_runs_every_stage_and_resumes(tmp_path, capsys):
    data = small_flowers(tmp_path, 8)
    out = tmp_path / "demo"
    args = ["demo", "--data", str(data.parent), "--vae", str(TAEF2), "--out", str(out), "--train-steps", "2",
            "--eval-images", "4", "--sweep", "euler:1", "--grid-images", "4",
            "--set", "data.batch_size=8", "--set", "sample.every=0", "--set", "checkpoint.every=1",
            "--set", "train.guide_step=1", "--ot-fit-steps", "20",
            "--set", "objective.ot_max_imbalance=1",  # 20 steps leave 16 points unbalanced; the wiring is tested
            "--few-step", "--few-step-couplings", "6", "--few-step-train-steps", "2", "--few-step-set",
            "data.batch_size=2", "--few-step-set", "sample.every=0", "--few-step-set", "checkpoint.every=1"]
    assert main(args) == 0
    stages = [line for line in capsys.readouterr().out.splitlines() if line.startswith("== ")]
    assert [line.split()[1] for line in stages] == [f"{k}/11" for k in range(1, 12)]
    assert stages[1].startswith("== 2/11 fit the dataset OT potential 'demo'")
    potential = json.loads((out / "cache" / "ot" / "demo.json").read_text())  # the shipped config pairs through it
    assert potential["finished"] and potential["class_aware"] and potential["step"] == 20
    balance = potential["balance"]
    assert potential["groups"] == [8, 8] and balance["pair_cost"] < balance["independent_cost"]
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert manifest["num_samples"] == 16 and manifest["latent_shape"] == [32, 8, 8]
    assert (out / "run" / "model" / "config.json").is_file()
    assert (out / "pipeline" / "model_index.json").is_file()
    assert (out / "samples.png").stat().st_size > 1000
    assert (out / "pipeline" / "guide" / "config.json").is_file()  # the step-1 EMA, from run/guide
    evaluation = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert evaluation["results"][0]["nfe"] == 1 and evaluation["guide"] is True
    assert [row["setting"] for row in evaluation["floors"]] == ["floor: real vs real", "floor: VAE round trip"]
    assert all(row["num_samples"] == 4 for row in evaluation["floors"])
    assert Image.open(out / "samples_by_class.png").size == (8 * 66 + 2, 2 * 66 + 2)  # a row for each class
    card = (out / "pipeline" / "README.md").read_text()
    assert "library_name: diffusers" in card and "floor: VAE round trip" in card and "![samples](samples.png)" in card
    assert "optimal latent of the whole cache within each class" in card
    # few steps: the model's own samples as it draws its grid, a flow map fine-tuned from its run on them
    assert stages[6].startswith("== 7/11 few steps: 6 samples of the model (euler 8 steps, guidance 4)")
    couplings = json.loads((out / "couplings" / "manifest.json").read_text())["couplings"]
    assert (couplings["n"], couplings["solver"], couplings["steps"], couplings["guidance_scale"]) == (6, "euler", 8, 4)
    assert couplings["teacher"]["path"] == str((out / "pipeline").resolve())
    flow_map_config = yaml.safe_load((out / "flow_map_run" / "config.yaml").read_text())
    assert flow_map_config["objective"]["name"] == "meanflow" and flow_map_config["train"]["init"] == str(out / "run")
    assert flow_map_config["data"]["cache"] == str(out / "couplings")
    scheduler = json.loads((out / "flow_map_pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "average_velocity"
    flow_map_evaluation = json.loads((out / "flow_map_evaluation" / "evaluation.json").read_text())
    assert [row["nfe"] for row in flow_map_evaluation["results"]] == [1, 2]
    assert flow_map_evaluation["guidance_scale"] == 1 and len(flow_map_evaluation["floors"]) == 2
    for steps in (1, 2):
        assert Image.open(out / f"samples_flow_map_{steps}step.png").size == (2 * 66 + 2, 2 * 66 + 2)
    # both evaluations read the val photos' statistics computed once, and the floors computed once beside them
    shared = out / "reference_statistics"
    assert len(list(shared.glob("*.npz"))) == 1 and len(list(shared.glob("floors-*.json"))) == 1
    assert flow_map_evaluation["floors"] == evaluation["floors"]
    assert flow_map_evaluation["reference_source"] == f"{data / 'val'} (resolution 64)"
    assert "flowmap" in (out / "flow_map_pipeline" / "README.md").read_text()
    # a second run resumes: nothing re-encoded, the potential and couplings reused, training already at its last step
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "(0 newly encoded" in printed and ", reused;" in printed and "(0 made, reused)" in printed
    assert "euler-1: measured before" in printed and "flowmap-2: measured before" in printed  # no FID measured again
    for run in ("run", "flow_map_run"):
        log = (out / run / "log.csv").read_text().splitlines()
        assert len(log) == len(set(log))


@pytest.mark.slow
def test_demo_with_minibatch_pairing_has_no_fit_stage(tmp_path, capsys):
    data = small_flowers(tmp_path, 4)
    out = tmp_path / "demo"
    assert main(["demo", "--data", str(data.parent), "--vae", str(TAEF2), "--out", str(out), "--train-steps", "1",
                 "--eval-images", "2", "--sweep", "euler:1", "--grid-images", "1", "--no-floors",
                 "--set", "data.batch_size=4", "--set", "sample.every=0", "--set", "train.guide_step=null",
                 "--set", "objective.ot_scope=local", "--set", "objective.class_aware=false"]) == 0
    stages = [line.split()[1:3] for line in capsys.readouterr().out.splitlines() if line.startswith("== ")]
    assert stages == [["1/5", "encode"], ["2/5", "train"], ["3/5", "export"], ["4/5", "sample"], ["5/5", "FID"]]
    assert not (out / "cache" / "ot").exists()
