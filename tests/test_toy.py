import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from latentflow.cli import main
from latentflow.errors import LatentflowError
from latentflow.flow.objectives import make_objective
from latentflow.toy.distributions import DISTRIBUTIONS, balanced_components, get_distribution
from latentflow.toy.lab import (
    BATCHES_PER_HANDOFF,
    EXACT_OT_MAX_POINTS,
    LabSettings,
    PreparedBatches,
    ToyMLP,
    batch_stream,
    batch_workers,
    dataset_ot_pairs,
    dataset_points,
    run_lab,
)


def test_eight_gaussians_match_torchcfm_definition():
    points = get_distribution("8gaussians")(40000, torch.Generator().manual_seed(0))
    radius = points.norm(dim=1)
    assert float(radius.mean()) == pytest.approx(5.0, abs=0.05)
    angles = torch.round(torch.atan2(points[:, 1], points[:, 0]) / (math.pi / 4)) % 8
    counts = torch.bincount(angles.long(), minlength=8).float() / 40000
    assert torch.allclose(counts, torch.full((8,), 1 / 8), atol=0.01)
    center = 5.0 * torch.tensor([1.0, 0.0])
    cluster = points[(points - center).norm(dim=1) < 2.5]
    assert float((cluster - center).std(dim=0).mean()) == pytest.approx(0.1**0.25, rel=0.05)


def test_moons_lie_on_two_scaled_half_circles():
    points = get_distribution("moons")(20000, torch.Generator().manual_seed(1))
    unshifted = (points + 1) / 3  # undo * 3 - 1, leaving a diagonal shift in [0, 0.2]
    outer = (unshifted - 0.1).norm(dim=1)
    inner = (unshifted - 0.1 - torch.tensor([1.0, 0.5])).norm(dim=1)
    assert float(torch.minimum((outer - 1).abs(), (inner - 1).abs()).max()) < 0.15


@pytest.mark.parametrize("n, k", [(2000, 2), (1003, 8), (5, 8)])
def test_balanced_components_split_n_evenly_in_random_order(n, k):
    which = balanced_components(n, k, torch.Generator().manual_seed(0))
    counts = torch.bincount(which, minlength=k)
    assert which.shape == (n,) and int(counts.sum()) == n and int(counts.max() - counts.min()) <= 1
    assert not torch.equal(which, which.sort().values) or n < k  # shuffled, not in blocks


def test_mixture_samples_hold_their_components_in_equal_numbers():
    generator = torch.Generator().manual_seed(5)
    checker = get_distribution("checkerboard")(4000, generator)
    square = torch.floor((checker[:, 0] + 4) / 2) * 4 + torch.floor((checker[:, 1] + 4) / 2)
    assert sorted(torch.bincount(square.long(), minlength=16).tolist()) == [0] * 8 + [500] * 8
    circles = get_distribution("circles")(2001, generator)
    assert int((circles.norm(dim=1) > 3).sum()) in (1000, 1001)


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_every_distribution_is_seeded_and_2d(name):
    first = get_distribution(name)(100, torch.Generator().manual_seed(3))
    second = get_distribution(name)(100, torch.Generator().manual_seed(3))
    assert first.shape == (100, 2) and torch.equal(first, second) and torch.isfinite(first).all()


def test_prepared_batches_are_identical_inline_and_in_workers():
    objective = make_objective("otcfm")
    source, target = get_distribution("8gaussians"), get_distribution("moons")
    steps = 2 * BATCHES_PER_HANDOFF + 3  # runs of batches split across both workers, the last one short
    settings = LabSettings(objective="otcfm", steps=steps, batch_size=160, workers=0)
    inline = list(batch_stream(settings, objective, source, target))
    workers = list(batch_stream(replace(settings, workers=2), objective, source, target))
    assert len(inline) == len(workers) == steps
    for a, b in zip(inline, workers):
        for name in ("x_t", "t", "target", "x0", "x1"):
            assert torch.equal(getattr(a, name), getattr(b, name))
        assert a.ot_cost == b.ot_cost and a.labels is b.labels is None
    assert torch.equal(inline[2].x1, PreparedBatches(settings, objective, source, target)[2].x1)


def test_workers_default_to_the_cpus_for_ot_pairing_and_one_otherwise():
    settings = LabSettings()
    cheap = min(1, (os.cpu_count() or 1) - 1)  # one worker keeps up with batches that need no pairing
    assert batch_workers(settings, make_objective("cfm")) == cheap
    assert batch_workers(settings, make_objective("ddpm")) == cheap
    assert batch_workers(settings, make_objective("otcfm")) == min(4, os.cpu_count() or 1)
    assert batch_workers(replace(settings, workers=0), make_objective("otcfm")) == 0
    with pytest.raises(LatentflowError, match="workers must be"):
        LabSettings(workers=-1).validate()


@pytest.mark.parametrize("settings, message", [
    ({"learning_rate": float("nan")}, r"--lr must be a finite number > 0, got nan"),
    ({"learning_rate": -1.0}, r"--lr must be a finite number > 0, got -1.0"),
    ({"solver": "foo"}, r"unknown solver 'foo' for a velocity model"),
    ({"objective": "meanflow", "solver": "foo"}, r"unknown solver 'foo'"),  # its paths are drawn with --solver
    ({"objective": "reflow", "reflow_solver": "ddim"}, r"unknown solver 'ddim'"),
    ({"objective": "meanflow-ft", "finetune_steps": 0}, r"--finetune-steps >= 1; got 0.25, 1.0, 0"),
])
def test_lab_settings_found_from_outside_are_refused_before_training(settings, message):
    """These gave torch's traceback (--lr), an error after the whole training (--solver, --reflow-solver), or were
    taken (--finetune-steps 0 ran the default)."""
    with pytest.raises(LatentflowError, match=message):
        LabSettings(**settings).validate()
    LabSettings(objective="ddpm", source="gaussian", solver="foo").validate()  # ddpm samples with DDIM


def test_toy_out_through_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"
    assert main(["toy", "--objective", "rf", "--steps", "2", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"latentflow toy: error: [Errno 20] Not a directory: '{out}'\n"


def test_lab_reproduces_straight_ot_paths_and_writes_its_files(tmp_path):
    code = main(["toy", "--objective", "cfm,otcfm,ddpm", "--steps", "600", "--nfe", "1,4", "--eval-samples", "400",
                 "--workers", "1", "--out", str(tmp_path)])
    assert code == 0
    runs = json.loads((tmp_path / "metrics.json").read_text())["runs"]
    assert set(runs) == {"cfm", "otcfm", "ddpm"}
    # the lecture's result: OT-CFM paths are far straighter, so one Euler step already lands on the target
    assert runs["otcfm"]["straightness"] < 0.2 * runs["cfm"]["straightness"]
    assert runs["otcfm"]["w2"]["1"] < runs["cfm"]["w2"]["1"]
    assert runs["otcfm"]["nfe_used"] == {"1": 1, "4": 4}
    assert runs["otcfm"]["settings"]["workers"] == 1  # the CLI's --workers, recorded as resolved
    assert runs["ddpm"]["w2_stochastic"] and runs["ddpm"]["straightness"] is None
    # the floor: fresh target points against the run's held-out ones (the same for runs from the same source), far
    # under CFM's one step; a model can score under it (its samples may be more even than a fresh draw)
    assert runs["cfm"]["w2_floor"] == runs["otcfm"]["w2_floor"]
    assert all(0 < run["w2_floor"] < 0.5 * runs["cfm"]["w2"]["1"] for run in runs.values())
    samples = np.load(tmp_path / "otcfm" / "samples_nfe4.npy")
    assert samples.shape == (400, 2) and np.isfinite(samples).all()
    assert (tmp_path / "trajectories.png").stat().st_size > 10_000


def test_lab_meanflow_jumps_in_k_evaluations_and_reflow_straightens(tmp_path):
    code = main(["toy", "--objective", "rf,meanflow,reflow,meanflow-ft,meanflow-reflow", "--source", "gaussian",
                 "--steps", "400", "--nfe", "1,4", "--eval-samples", "300", "--reflow-pairs", "1000",
                 "--finetune-steps", "300", "--flow-map-share", "0.75", "--time-sampler", "uniform", "--workers", "0",
                 "--out", str(tmp_path)])
    assert code == 0
    runs = json.loads((tmp_path / "metrics.json").read_text())["runs"]
    assert runs["meanflow"]["nfe_used"] == {"1": 1, "4": 4}
    assert all(math.isfinite(value) for value in runs["meanflow"]["w2"].values())
    assert runs["reflow"]["settings"]["reflow_pairs"] == 1000
    # 2-rectified flow: straighter paths than the rf it came from, and a better one-step sample
    assert runs["reflow"]["straightness"] < 0.5 * runs["rf"]["straightness"]
    assert runs["reflow"]["w2"]["1"] < runs["rf"]["w2"]["1"]
    assert (tmp_path / "meanflow" / "trajectories.png").stat().st_size > 10_000
    # the flow map fine-tuned from the same rf (same seed, so the same 400 rf steps): one jump beats rf's one step
    assert runs["meanflow-ft"]["settings"]["finetune_steps"] == 300
    assert runs["meanflow-ft"]["nfe_used"] == {"1": 1, "4": 4}
    assert runs["meanflow-ft"]["w2"]["1"] < 0.7 * runs["rf"]["w2"]["1"]
    # the flow map fine-tuned from that rf on its own 1,000 (noise, endpoint) pairs: its one jump lands near the
    # endpoints, far better than rf's one step, and about as well as the 2-rectified flow's
    assert runs["meanflow-reflow"]["nfe_used"] == {"1": 1, "4": 4}
    assert runs["meanflow-reflow"]["w2"]["1"] < 0.5 * runs["rf"]["w2"]["1"]
    assert runs["meanflow-reflow"]["w2"]["1"] < 1.5 * runs["reflow"]["w2"]["1"]


def test_a_flow_map_made_from_a_field_starts_as_that_field_for_every_end_time():
    torch.manual_seed(0)
    field = ToyMLP(width=32, depth=3)
    flow_map = ToyMLP.flow_map_of(field)
    x, t = torch.randn(64, 2), torch.rand(64)
    r = t + (1 - t) * torch.rand(64)
    assert flow_map.flow_map and not field.flow_map
    torch.testing.assert_close(flow_map(x, t, r), field(x, t), rtol=0, atol=1e-6)
    torch.testing.assert_close(flow_map(x, t), field(x, t), rtol=0, atol=1e-6)


def test_lab_dataset_ot_pairs_noise_with_a_fixed_training_set(tmp_path):
    code = main(["toy", "--objective", "otcfm-dataset,cfm", "--source", "gaussian", "--steps", "600", "--nfe",
                 "1,4", "--eval-samples", "400", "--dataset-size", "300", "--ot-steps", "1500", "--ot-batch", "1024",
                 "--ot-lr", "0.003", "--workers", "0", "--out", str(tmp_path)])
    assert code == 0
    runs = json.loads((tmp_path / "metrics.json").read_text())["runs"]
    coupling = runs["otcfm-dataset"]["coupling"]
    assert coupling["dataset_size"] == 300 and coupling["balance_excess"] < 0.03
    # its own floor (the training points against the held-out ones) is a W2 like any other: far under cfm's one step
    assert 0 < coupling["w2_training_points"] < 0.5 * runs["cfm"]["w2"]["1"]
    # the semidiscrete pairs are (nearly) optimal: their cost is within 6% of the exact OT of 600 fresh draws,
    # which, fitted to its own sample, sits below the population optimum (measured: 1.038x)
    assert coupling["semidiscrete_cost"] < 1.06 * coupling["exact_ot_cost"]
    # the balance draws measure the same pairs' cost on other noise (measured 4.12 and 4.19); in 2D the pairs are
    # far shorter than independent ones (measured 0.36x)
    assert coupling["pair_cost"] == pytest.approx(coupling["semidiscrete_cost"], rel=0.05)
    assert coupling["pair_cost"] < 0.5 * coupling["independent_cost"]
    assert runs["otcfm-dataset"]["straightness"] < 0.2 * runs["cfm"]["straightness"]
    assert runs["otcfm-dataset"]["w2"]["1"] < runs["cfm"]["w2"]["1"]
    assert (tmp_path / "otcfm-dataset" / "trajectories.png").stat().st_size > 10_000


def test_lab_dataset_ot_report_on_a_large_training_set_skips_only_the_exact_comparison():
    """Above EXACT_OT_MAX_POINTS the 2N x 2N exact assignment is not solved (it would not fit in memory at
    20,000 points); the balance is still measured (an unconverged 20-step fit: well above a fitted one's 0.004)."""
    settings = LabSettings(source="gaussian", target="moons", dataset_size=EXACT_OT_MAX_POINTS + 1, ot_steps=20,
                           ot_batch=4096, seed=0)
    pairs, report = dataset_ot_pairs(settings, get_distribution("moons"))
    assert report["dataset_size"] == EXACT_OT_MAX_POINTS + 1
    assert "exact_ot_agreement" not in report and "exact_ot_cost" not in report
    assert 0.05 < report["balance_excess"] < report["balance_total_variation"] < 1
    generator = torch.Generator().manual_seed(1)
    x0, x1 = pairs.noise(8, generator), pairs.endpoint(8, generator)
    assert x0.shape == x1.shape == (8, 2)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "latentflow.cli", "toy", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--source", "banana"], "unknown distribution 'banana'"),
        (["--nfe", ""], "--nfe is empty"),
        (["--steps", "0"], "--steps must be a positive"),
        (["--objective", "score"], "unknown objective 'score'"),
        (["--target", "missing.npy"], "missing.npy: no such file"),
        (["--workers", "-1"], "workers must be >= 0"),
        (["--objective", "otcfm-dataset"], "otcfm-dataset starts from Gaussian noise: use --source gaussian"),
        (["--objective", "otcfm-dataset", "--source", "gaussian", "--dataset-size", "1"], "--dataset-size must be"),
        (["--objective", "otcfm-dataset", "--source", "gaussian", "--ot-average-from", "2"],
         "average_from must be in [0, 1]"),
        (["--objective", "meanflow", "--time-sampler", "beta"], "--time-sampler 'beta' unknown"),
        (["--objective", "meanflow-ft", "--flow-map-share", "1.5"], "--flow-map-share must be in [0, 1]"),
    ],
)
def test_bad_input_gives_one_line_error_without_traceback(tmp_path, args, message):
    result = run_cli(*args, "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bad_npy_files_are_named(tmp_path):
    wrong_shape = tmp_path / "wrong.npy"
    np.save(wrong_shape, np.zeros((10, 3)))
    with_nan = tmp_path / "nan.npy"
    np.save(with_nan, np.array([[0.0, np.nan], [1.0, 2.0]]))
    assert "expected an array of shape (N, 2)" in run_cli("--target", str(wrong_shape), "--out",
                                                          str(tmp_path / "o")).stderr
    assert "finite" in run_cli("--source", str(with_nan), "--out", str(tmp_path / "o")).stderr


def test_npy_target_is_sampled_from_its_points(tmp_path):
    points = np.array([[1.0, 2.0], [3.0, 4.0]], dtype=np.float32)
    path = tmp_path / "two.npy"
    np.save(path, points)
    drawn = get_distribution(str(path))(50, torch.Generator().manual_seed(0)).numpy()
    assert {tuple(row) for row in drawn} == {(1.0, 2.0), (3.0, 4.0)}


def test_finite_data_trains_every_objective_on_the_fixed_training_set(tmp_path):
    # two training points: rf trained on them alone carries the noise onto them; held-out W2 still uses fresh moons
    settings = LabSettings(source="gaussian", target="moons", objective="rf", steps=600, nfe=(100,), eval_samples=300,
                           dataset_size=2, finite_data=True, workers=0, lr_schedule="cosine")
    result, _, _ = run_lab(settings, tmp_path)
    points = dataset_points(settings, get_distribution("moons"))
    samples = torch.from_numpy(np.load(tmp_path / "samples_nfe100.npy"))
    nearest = torch.cdist(samples, points).min(dim=1).values  # (300,)
    fresh = get_distribution("moons")(300, torch.Generator().manual_seed(11))
    fresh_nearest = torch.cdist(fresh, points).min(dim=1).values  # where moons trained on fresh draws would land
    assert nearest.median() < 0.35 * fresh_nearest.median()
    assert result.w2["100"] > result.w2_floor
