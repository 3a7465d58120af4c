"""Dataset-scale OT on a real cache (TAEF2 latents of real flower photos): `latentflow ot-fit`, its files, resume
and reuse, the refusals, pairing every noise draw with its optimal cached latent, and training with
`objective.ot_scope: dataset`."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from flower_assets import FLOWERS, TAEF2, encode_flower_cache, link_flower_photos
from safetensors.torch import load_file, save_file
from scipy.optimize import linear_sum_assignment

from latentflow import cli
from latentflow.data.cache import LatentCache, make_latent_loader
from latentflow.data.potential import (
    OTFitConfig,
    _GroupFits,
    fit_cache_potential,
    load_dataset_cells,
    load_points,
    potential_paths,
)
from latentflow.errors import LatentflowError
from latentflow.flow.objectives import make_objective
from latentflow.flow.screening import Screen
from latentflow.flow.semidiscrete import DrawSplit, FitSettings, LaguerreCells, PotentialFit, noise_for_step
from latentflow.train.config import load_config, validate_config
from latentflow.train.pairing import PairingTransform, dataset_cells_for, dataset_pairing

PER_CLASS = 4
FAST = ["--steps", "300", "--batch", "512", "--balance-draws", "400", "--no-progress"]

pytestmark = pytest.mark.skipif(
    not (TAEF2.is_dir() and FLOWERS.is_dir()), reason=f"shared assets missing: need {TAEF2} and {FLOWERS}"
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """4 real photos of each of the 5 classes through TAEF2 at 64 px: 20 labelled latents (32 x 8 x 8)."""
    photos = link_flower_photos(tmp_path_factory.mktemp("flowers"), PER_CLASS)
    return encode_flower_cache(photos, tmp_path_factory.mktemp("cache") / "cache", batch_size=10, shard_size=8)


@pytest.fixture(scope="module")
def fitted(cache: Path) -> Path:
    """The class-blind ('potential') and class-aware ('aware') potentials of `cache`, through the CLI."""
    assert cli.main(["ot-fit", str(cache), *FAST]) == 0
    assert cli.main(["ot-fit", str(cache), "--name", "aware", "--class-aware", *FAST]) == 0
    return cache


def ot_fit(cache: Path, *options: str) -> int:
    return cli.main(["ot-fit", str(cache), *FAST, *options])


def record(cache: Path, name: str = "potential") -> dict:
    return json.loads(potential_paths(cache, name)[1].read_text())


def test_the_fit_writes_a_balanced_potential_and_a_rerun_does_nothing(fitted: Path, capsys) -> None:
    potential_path, json_path, state_path = potential_paths(fitted, "potential")
    info = record(fitted)
    assert info["finished"] and info["points"] == 20 and info["dim"] == 32 * 8 * 8 and not state_path.exists()
    assert info["balance"]["excess"] < 0.02 and info["balance"]["min_over_mean"] > 0.7
    assert record(fitted, "aware")["groups"] == [PER_CLASS] * 5 and record(fitted, "aware")["class_aware"]
    blind, aware = info["balance"], record(fitted, "aware")["balance"]
    points = load_dataset_cells(LatentCache(fitted), "potential", normalized=True, random_flip=False).points
    assert blind["independent_cost"] == pytest.approx(32 * 8 * 8 + float(points.flatten(1).square().sum(1).mean()))
    # OT over all 20 latents pairs closer than OT within the drawn class, and both closer than independent pairs
    assert blind["pair_cost"] < aware["pair_cost"] < aware["independent_cost"]
    modified = potential_path.stat().st_mtime_ns
    capsys.readouterr()
    assert ot_fit(fitted) == 0
    said = capsys.readouterr()
    assert "complete, nothing to do" in said.out and "warning" not in said.err  # balanced: no warning
    assert potential_path.stat().st_mtime_ns == modified


def test_a_record_older_than_a_setting_counts_as_fitted_with_its_default(fitted: Path, tmp_path: Path,
                                                                          capsys) -> None:
    copy = tmp_path / "cache"
    shutil.copytree(fitted, copy)
    json_path = potential_paths(copy, "potential")[1]
    old = record(copy)
    del old["settings"]["average_from"]  # as written before the setting existed
    json_path.write_text(json.dumps(old))
    capsys.readouterr()
    assert ot_fit(copy) == 0
    assert "complete, nothing to do" in capsys.readouterr().out
    assert ot_fit(copy, "--average-from", "0.9") != 0
    assert "a potential with other settings exists" in capsys.readouterr().err


def test_pairs_agree_with_the_exact_ot_of_a_large_noise_sample(fitted: Path) -> None:
    cells = load_dataset_cells(LatentCache(fitted), "potential", normalized=True, random_flip=False)
    copies = 50
    x0 = noise_for_step(3, 0, 20 * copies, 32 * 8 * 8).view(-1, 32, 8, 8)
    flat = cells.points.reshape(20, -1).double()
    cost = torch.cdist(x0.reshape(x0.shape[0], -1).double(), flat).square().repeat_interleave(copies, 1).numpy()
    rows, columns = linear_sum_assignment(cost)
    exact = torch.empty(x0.shape[0], dtype=torch.long)
    exact[torch.from_numpy(rows)] = torch.from_numpy(columns // copies)
    share = (cells.pair(x0, None) == exact).float().mean()
    assert share > 0.9  # the exact plan of 1,000 draws is a noisy estimate of the cells itself


def test_an_interrupted_fit_resumes_to_the_uninterrupted_potential(cache: Path, tmp_path: Path) -> None:
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy, ignore=shutil.ignore_patterns("ot"))
    settings = FitSettings(steps=40, batch_size=128)
    straight = fit_cache_potential(OTFitConfig(str(copy), name="straight", fit=settings, balance_draws=10))

    def stop_at_25(step: int, status: dict) -> None:
        if step == 25:
            raise KeyboardInterrupt

    config = OTFitConfig(str(copy), name="resumed", fit=settings, balance_draws=10, save_every=10)
    with pytest.raises(KeyboardInterrupt):
        fit_cache_potential(config, stop_at_25)
    assert record(copy, "resumed")["step"] == 20 and not record(copy, "resumed")["finished"]
    resumed = fit_cache_potential(config)
    assert resumed.steps_run == 20
    assert torch.equal(load_file(str(resumed.path))["potential"], load_file(str(straight.path))["potential"])


def test_a_class_aware_fit_is_each_class_fitted_on_its_own(fitted: Path) -> None:
    # the class-aware fit draws each step's noise once for all classes: the same potential as fitting every
    # class alone, each drawing that noise itself
    points = load_points(LatentCache(fitted), normalized=True, flips=False, class_aware=True)
    settings = FitSettings(steps=300, batch_size=512)
    potential = load_file(str(potential_paths(fitted, "aware")[0]))["potential"]
    for group, span in zip(points.groups, points.spans):
        alone = PotentialFit(points.points[span], settings)
        while not alone.finished:
            alone.step()
        assert torch.equal(alone.potential, potential[group])


def test_points_are_read_shard_by_shard_class_by_class_whole_or_in_parts(fitted: Path) -> None:
    cache = LatentCache(fitted)  # 20 latents in shards of 8, 5 classes of 4
    arrays = cache.load()
    expected = (arrays.mean.float() - cache.channel_mean.view(1, -1, 1, 1)) / cache.channel_std.view(1, -1, 1, 1)
    whole = load_points(cache, normalized=True, flips=False, class_aware=True)
    assert torch.equal(whole.points, expected[whole.order]) and torch.equal(whole.labels, arrays.labels[whole.order])
    assert whole.sizes == [PER_CLASS] * 5 and whole.labels.tolist() == sorted(arrays.labels.tolist())
    for group in whole.groups:  # each class in load order
        assert group.tolist() == torch.nonzero(arrays.labels == arrays.labels[group[0]]).flatten().tolist()
    blind = load_points(cache, normalized=False, flips=False, class_aware=False)
    assert torch.equal(blind.order, torch.arange(20)) and torch.equal(blind.points, arrays.mean.float())
    assert torch.equal(blind.labels, arrays.labels)
    parts = [load_points(cache, normalized=True, flips=False, class_aware=True, part=(rank, 3)) for rank in range(3)]
    assert [[span.stop - span.start for span in part.spans] for part in parts] == [[2] * 5, [1] * 5, [1] * 5]
    for index, span in enumerate(whole.spans):  # the parts of every class, one after another, are the class
        held = torch.cat([part.points[part.spans[index]] for part in parts])
        assert torch.equal(held, whole.points[span])
        assert [part.firsts[index] for part in parts] == [span.start, span.start + 2, span.start + 3]
        assert torch.equal(torch.cat([part.groups[index] for part in parts]), whole.groups[index])


def test_a_second_fit_into_the_same_cache_is_refused_while_the_first_runs(cache: Path, tmp_path: Path) -> None:
    from latentflow.io import folder_lock

    copy = tmp_path / "cache"
    shutil.copytree(cache, copy, ignore=shutil.ignore_patterns("ot"))
    with folder_lock(copy / "ot", "latentflow ot-fit", "wait for it to finish"):
        with pytest.raises(LatentflowError, match=f"pid {os.getpid()}"):
            fit_cache_potential(OTFitConfig(str(copy), fit=FitSettings(steps=5, batch_size=64), balance_draws=5))
    assert fit_cache_potential(OTFitConfig(str(copy), fit=FitSettings(steps=5, batch_size=64), balance_draws=5))


def test_flip_variants_are_points_of_their_own(tmp_path: Path) -> None:
    from latentflow.data.encoder import EncodeConfig, encode_dataset

    photos = link_flower_photos(tmp_path / "photos", 1)
    out = tmp_path / "flipped"
    encode_dataset(EncodeConfig(vae=str(TAEF2), data=str(photos), out=out, resolution=64, batch_size=5,
                                shard_size=5, num_workers=0, progress=False, flip=True, command=["test"]))
    assert cli.main(["ot-fit", str(out), "--flips", *FAST]) == 0
    assert cli.main(["ot-fit", str(out), "--name", "plain", *FAST]) == 0
    cache = LatentCache(out)
    cells = load_dataset_cells(cache, "potential", normalized=True, random_flip=True)
    arrays = cache.load()
    assert record(out)["points"] == 10 and cells.points.shape[0] == 10
    raw = torch.cat([arrays.mean, arrays.flip_mean]).float()  # the means, then their flip variants
    expected = (raw - cache.channel_mean.view(1, -1, 1, 1)) / cache.channel_std.view(1, -1, 1, 1)
    torch.testing.assert_close(cells.points, expected)
    assert torch.equal(cells.labels, arrays.labels.repeat(2))
    with pytest.raises(LatentflowError, match="fitted without the flip variants .* refit with --flips"):
        load_dataset_cells(cache, "plain", normalized=True, random_flip=True)
    assert load_dataset_cells(cache, "plain", normalized=True, random_flip=False).points.shape[0] == 5


def config_for(cache: Path, *overrides: str):
    return load_config(None, [f"data.cache={cache}", "data.batch_size=8", "data.normalize=true",
                              "data.sample_posterior=false", "objective.ot_scope=dataset", *overrides])


def test_the_bf16_screen_pairs_real_latents_as_float32_does(fitted: Path) -> None:
    """On TAEF2 latents of real photos the screened cells pair as float32 ones; objective.ot_screen: false turns
    the screen off, and the default builds one only where it pays (not for 20 points)."""
    plain = dataset_cells_for(config_for(fitted, "objective.ot_screen=false"), LatentCache(fitted))
    default = dataset_cells_for(config_for(fitted), LatentCache(fitted)).to("cpu")
    assert not plain.screen and not plain.to("cpu").screen and plain.cells[0].screen is False
    assert default.screen and default.cells[0].screen is False  # may screen, but 20 points are below MIN_POINTS
    # pairing on the training device: no screen is built before the cells move, and the move builds it there
    on_device = dataset_cells_for(config_for(fitted, "objective.ot_dataset_on=device"), LatentCache(fitted))
    assert not on_device.screen and on_device.to("cpu", screen=True).screen
    points, potential = plain.cells[0].points, plain.potential
    screened = LaguerreCells(points, potential, screen=Screen.of(points))
    x0 = noise_for_step(4, 0, 4096, 32 * 8 * 8)
    assert torch.equal(screened.assign(x0), plain.cells[0].assign(x0))


def test_refusals_name_the_potential_and_the_fix(fitted: Path, tmp_path: Path, capsys) -> None:
    lf = LatentCache(fitted)
    with pytest.raises(LatentflowError, match="no OT potential for this cache; run `latentflow ot-fit .* --name x"):
        dataset_cells_for(config_for(fitted, "objective.ot_potential=x"), lf)
    with pytest.raises(LatentflowError, match="is class-aware but objective.class_aware is false"):
        dataset_cells_for(config_for(fitted, "objective.ot_potential=aware"), lf)
    for name in ("../potential", ".hidden", "a/b", ""):  # a name is a file in CACHE/ot/, nothing outside it
        with pytest.raises(LatentflowError, match="OT potential name .*: use letters, digits"):
            dataset_cells_for(config_for(fitted, f"objective.ot_potential={name}"), lf)
    assert ot_fit(fitted, "--name", "../escaped") == 2 and not list(fitted.glob("escaped*"))
    assert "OT potential name '../escaped'" in capsys.readouterr().err
    with pytest.raises(LatentflowError, match="fitted on normalised latents but data.normalize is false"):
        dataset_cells_for(config_for(fitted, "data.normalize=false"), lf)
    with pytest.raises(LatentflowError, match="ddpm"):
        validate_config(config_for(fitted, "objective.name=ddpm"))
    with pytest.raises(LatentflowError, match="data.sample_posterior: false"):
        validate_config(config_for(fitted, "data.sample_posterior=true"))
    changed = tmp_path / "changed"  # the same cache re-encoded (its manifest differs)
    shutil.copytree(fitted, changed)
    manifest = json.loads((changed / "manifest.json").read_text())
    (changed / "manifest.json").write_text(json.dumps({**manifest, "command": ["re-encoded"]}))
    with pytest.raises(LatentflowError, match="fitted on another cache .* run `latentflow ot-fit"):
        dataset_cells_for(config_for(changed), LatentCache(changed))
    with pytest.raises(LatentflowError, match="a potential with other cache_fingerprint exists; pick another --name"):
        fit_cache_potential(OTFitConfig(str(changed), fit=FitSettings(steps=300, batch_size=512), balance_draws=400))
    nan = tmp_path / "nan"
    shutil.copytree(fitted, nan)
    path = potential_paths(nan, "potential")[0]
    values = load_file(str(path))["potential"]
    values[3] = float("nan")
    save_file({"potential": values}, str(path))
    with pytest.raises(LatentflowError, match="holds NaN or infinite values"):
        dataset_cells_for(config_for(nan), LatentCache(nan))


@pytest.mark.parametrize("extra, message", [
    (["--epsilon", "nan"], "ot fit epsilon must be a finite number >= 0 (0: hard assignment), got nan"),
    (["--lr", "inf"], "ot fit lr must be a finite number > 0, got inf"),  # session 29: named both, with epsilon
    (["--batch", "0"], "ot fit batch size must be >= 1, got 0"),
    (["--save-every", "0"], "ot-fit --save-every must be an integer >= 1, got 0"),
    (["--balance-draws", "-2"], "ot-fit --balance-draws must be an integer >= 1, got -2"),
])
def test_ot_fit_refuses_bad_settings_before_reading_the_cache(cache: Path, tmp_path: Path, capsys, extra,
                                                              message) -> None:
    """Found trying the command from outside: NaN epsilon was accepted, the others were tracebacks (modulo by
    zero at the first step, a math domain error after the whole fit)."""
    copy = tmp_path / "copy"
    shutil.copytree(cache, copy, ignore=shutil.ignore_patterns("ot"))
    assert ot_fit(copy, "--steps", "5", *extra) == 2
    assert capsys.readouterr().err == f"latentflow ot-fit: error: {message}\n"
    assert not (copy / "ot").exists()


def test_a_damaged_potential_file_is_named_by_training_and_fitted_again_by_ot_fit(fitted: Path, tmp_path: Path,
                                                                                  capsys) -> None:
    """Found trying the command from outside: a truncated NAME.safetensors was safetensors' traceback in training,
    and `ot-fit` called the fit complete (its record says finished), so the advice to refit went round in a loop."""
    damaged = tmp_path / "damaged"
    shutil.copytree(fitted, damaged)
    path = potential_paths(damaged, "potential")[0]
    whole = load_file(str(path))["potential"].clone()  # load_file maps the file, which is cut next
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(LatentflowError, match=rf"{path}: unreadable \(.*\); run `latentflow ot-fit {damaged}` again"):
        dataset_cells_for(config_for(damaged), LatentCache(damaged))
    assert ot_fit(damaged) == 0
    assert f"ot-fit: {path}: unreadable (" in capsys.readouterr().err
    assert torch.equal(load_file(str(path))["potential"], whole)  # the same settings fit the same potential
    dataset_cells_for(config_for(damaged), LatentCache(damaged))


def test_an_error_before_the_first_step_prints_alone_without_a_progress_bar(tmp_path: Path, capsys) -> None:
    """Found trying the command from outside: the bar was drawn before the cache was read, so the error shared its
    line."""
    assert cli.main(["ot-fit", str(tmp_path / "nothing")]) == 2
    error = capsys.readouterr().err
    assert error == f"latentflow ot-fit: error: {tmp_path / 'nothing'}/manifest.json: not found; not a latent cache\n"


def test_an_unbalanced_potential_and_a_class_aware_fit_of_an_unlabelled_cache_are_refused(
        cache: Path, tmp_path: Path, capsys) -> None:
    short = tmp_path / "short"
    shutil.copytree(cache, short, ignore=shutil.ignore_patterns("ot"))
    for _ in range(2):  # the fit says at once (and again when asked again) that training will refuse it
        assert cli.main(["ot-fit", str(short), "--steps", "1", "--balance-draws", "200", "--no-progress"]) == 0
        assert re.search(r"^warning: balance excess \S+ is above the 0.05 training accepts "
                         r"\(objective.ot_max_imbalance\), so training refuses this potential: fit it longer under "
                         r"another --name \(more --steps; this fit ran 1\)$", capsys.readouterr().err, re.M)
    with pytest.raises(LatentflowError, match="balance excess .* is above 0.05 .* refit with more --steps"):
        dataset_cells_for(config_for(short), LatentCache(short))
    flat = tmp_path / "photos"
    flat.mkdir()
    for photo in sorted((FLOWERS / "daisy").glob("*.jpg"))[:3]:
        os.symlink(photo, flat / photo.name)
    unlabelled = encode_flower_cache(flat, tmp_path / "unlabelled", batch_size=3, shard_size=3)
    assert cli.main(["ot-fit", str(unlabelled), "--class-aware", *FAST]) == 2
    with pytest.raises(LatentflowError, match="class-aware OT needs labels, and this cache is unlabelled"):
        load_points(LatentCache(unlabelled), normalized=True, flips=False, class_aware=True)
    assert not (unlabelled / "ot").exists()


@pytest.mark.parametrize("name", ["potential", "aware"])
def test_the_pairing_transform_pairs_each_draw_with_its_laguerre_cell(fitted: Path, name: str) -> None:
    class_aware = name == "aware"
    config = config_for(fitted, f"objective.ot_potential={name}", f"objective.class_aware={class_aware}")
    cells = dataset_cells_for(config, LatentCache(fitted))
    transform = PairingTransform(make_objective("rf"), seed=0, rank=0, num_classes=5, label_dropout=0.0,
                                 pair=True, dataset_cells=cells)
    batch = next(make_latent_loader(LatentCache(fitted), batch_size=8, seed=0, random_flip=False, normalize=True))
    prepared = transform(batch, torch.Generator().manual_seed(0))
    flat_points = cells.points.reshape(20, -1)
    for x0, x1, label, drawn_for in zip(prepared.x0, prepared.x1, prepared.labels, batch["labels"]):
        group = torch.nonzero(cells.labels == drawn_for).flatten() if class_aware else torch.arange(20)
        scores = (flat_points[group] - x0.flatten()).square().sum(1) - cells.potential[group]
        best = group[scores.argmin()]
        torch.testing.assert_close(x1, cells.points[best], atol=0, rtol=0)
        assert label == cells.labels[best] and (not class_aware or label == drawn_for)
    torch.testing.assert_close(prepared.target, prepared.x1 - prepared.x0, atol=0, rtol=0)
    dropped = PairingTransform(make_objective("rf"), 0, 0, 5, label_dropout=0.999, pair=True, dataset_cells=cells)
    assert (dropped(batch, torch.Generator().manual_seed(0)).labels == 5).all()  # CFG's null class after pairing


def test_the_null_class_pairs_over_the_whole_cache_through_a_null_potential(fitted: Path) -> None:
    # objective.ot_null_potential: the rows whose label is dropped pair with the class-blind potential's cells
    config = config_for(fitted, "objective.ot_potential=aware", "objective.class_aware=true",
                        "objective.ot_null_potential=potential", "objective.label_dropout=0.5")
    validate_config(config)
    cells = dataset_cells_for(config, LatentCache(fitted))
    blind = cells.null
    transform = PairingTransform(make_objective("rf"), seed=0, rank=0, num_classes=5, label_dropout=0.5,
                                 pair=True, dataset_cells=cells)
    batch = next(make_latent_loader(LatentCache(fitted), batch_size=20, seed=0, random_flip=False, normalize=True))
    prepared = transform(batch, torch.Generator().manual_seed(0))
    assert 0 < int((prepared.labels == 5).sum()) < 20
    left_their_class = 0
    for x0, x1, label, drawn_for in zip(prepared.x0, prepared.x1, prepared.labels, batch["labels"]):
        pool = blind if label == 5 else cells
        group = torch.arange(20) if label == 5 else torch.nonzero(cells.labels == drawn_for).flatten()
        scores = (pool.points.reshape(20, -1)[group] - x0.flatten()).square().sum(1) - pool.potential[group]
        best = group[scores.argmin()]
        torch.testing.assert_close(x1, pool.points[best], atol=0, rtol=0)
        assert label == 5 or label == drawn_for
        left_their_class += int(label == 5 and pool.labels[best] != drawn_for)
    assert left_their_class > 0  # a class-aware pair would have stayed in the class it was drawn for
    null_rows = prepared.labels == 5  # the pairing itself gives the null rows their point's own label
    pairing = dataset_pairing(cells, prepared.x0, batch["labels"], None, null_rows)
    assert torch.equal(pairing.labels[null_rows], blind.labels[pairing.x1_index[null_rows]])
    assert torch.equal(pairing.labels[~null_rows], batch["labels"][~null_rows])
    for setting, refusal in [("objective.class_aware=false", "set objective.class_aware: true"),
                             ("objective.label_dropout=0", "objective.label_dropout is 0"),
                             ("objective.ot_dataset_on=sharded", "not supported with ot_dataset_on 'sharded'"),
                             ("objective.ot_scope=local", "used with ot_scope 'dataset' only")]:
        with pytest.raises(LatentflowError, match=refusal):
            validate_config(config_for(fitted, "objective.ot_potential=aware", "objective.class_aware=true",
                                       "objective.ot_null_potential=potential", setting))
    with pytest.raises(LatentflowError, match="ot_null_potential 'aware' .* is class-aware, .* fit a class-blind"):
        dataset_cells_for(config_for(fitted, "objective.ot_potential=aware", "objective.class_aware=true",
                                     "objective.ot_null_potential=aware"), LatentCache(fitted))


@pytest.mark.parametrize("objective, where", [("otcfm", "loader"), ("meanflow", "loader"), ("rf", "device"),
                                              ("cfm", "sharded"), ("otcfm", "device-null")])
def test_training_with_dataset_scope_runs(fitted: Path, tmp_path: Path, objective: str, where: str) -> None:
    from accelerate.state import AcceleratorState

    from latentflow.train.trainer import train

    AcceleratorState._reset_state(reset_partial_state=True)
    out = tmp_path / "run"
    train(config_for(
        fitted, "model.name=dit", "model.settings={hidden_size: 32, depth: 1, num_heads: 2, patch_size: 2}",
        "data.shuffle_buffer=10", "log.trackers=[csv]", "log.progress_bar=false", "log.every=1", "sample.every=0",
        "train.max_steps=3", "checkpoint.every=0", f"objective.name={objective}", "objective.class_aware=true",
        "objective.ot_potential=aware", "data.num_workers=0", f"output_dir={out}",
        f"objective.ot_dataset_on={where.split('-')[0]}",
        *(["objective.ot_null_potential=potential"] if where.endswith("-null") else []),
    ))
    AcceleratorState._reset_state(reset_partial_state=True)
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert len(rows) == 3 and all(math.isfinite(float(row["loss"])) for row in rows)
    assert all(math.isfinite(float(row["ot_cost"])) for row in rows)  # the dataset pairs' cost is logged


class TwoThreadSum:
    """A sum over two threads that stand for two processes: each hands in its tensor, both get the total; counts
    the sums each asks for."""

    def __init__(self) -> None:
        self.barrier, self.parts, self.calls = threading.Barrier(2), [None, None], [0, 0]

    def for_rank(self, rank: int):
        def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.parts[rank] = tensor.clone()
            self.barrier.wait()
            total = self.parts[0] + self.parts[1]
            self.barrier.wait()
            return total
        return reduce_sum


def test_a_split_class_aware_step_sums_every_class_over_the_processes_at_once(fitted: Path) -> None:
    # five classes, an odd batch (65 + 64 rows): one sum per step for all of them, and the one-process iterate
    points = load_points(LatentCache(fitted), normalized=True, flips=False, class_aware=True)
    settings, steps = FitSettings(steps=300, batch_size=129), 12
    alone = _GroupFits(points, settings, torch.device("cpu"), DrawSplit())
    for _ in range(steps):
        alone.step()
    total, split_fits = TwoThreadSum(), [None, None]

    def run(rank: int) -> None:
        fits = _GroupFits(points, settings, torch.device("cpu"), DrawSplit(rank, 2, total.for_rank(rank)))
        for _ in range(steps):
            fits.step()
        split_fits[rank] = fits

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(points.spans) == 5 and total.calls == [steps, steps]
    for fits in split_fits:
        for mine, reference in zip(fits.fits, alone.fits):
            assert torch.equal(mine.iterate, reference.iterate)
