"""Flow maps end to end: a meanflow fine-tune (`latentflow train --init`) of a plain run on the real TAEF2 flower
cache, its pipeline sampling in exactly K evaluations, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_training import TINY, cache, fresh_accelerator_state, tiny_config  # noqa: F401  (fixtures)

from latentflow import cli
from latentflow.errors import LatentflowError
from latentflow.flow.flow_maps import INTERVAL_TIME_SCALE
from latentflow.models import load_model, make_model
from latentflow.train.config import load_config
from latentflow.train.logs import CsvLog

MEANFLOW = ["objective.name=meanflow", "objective.flow_map_velocity=teacher", "objective.flow_map_share=0.5",
            "sample.solver=flowmap", "sample.steps=1"]


def train(cache_dir: Path, out: Path, *overrides: str, init: Path | None = None) -> Path:
    empty = out.parent / f"{out.name}.yaml"
    empty.write_text("{}\n")  # every setting comes from the overrides
    args = ["train", "--config", str(empty)]
    for override in [*TINY, f"data.cache={cache_dir}", f"output_dir={out}", *overrides]:
        args += ["--set", override]
    if init is not None:
        args += ["--init", str(init)]
    assert cli.main(args) == 0
    return out


@pytest.fixture(scope="module")
def teacher_run(cache: Path, tmp_path_factory) -> Path:  # noqa: F811
    return train(cache, tmp_path_factory.mktemp("runs") / "rf", "objective.name=rf", "train.max_steps=4")


@pytest.fixture(scope="module")
def meanflow_run(cache: Path, teacher_run: Path, tmp_path_factory) -> Path:  # noqa: F811
    return train(cache, tmp_path_factory.mktemp("runs") / "meanflow", *MEANFLOW, "train.max_steps=3",
                 init=teacher_run)


def test_a_fine_tuned_flow_map_starts_as_its_teacher(cache: Path, teacher_run: Path, tmp_path: Path):  # noqa: F811
    from latentflow.train.trainer import Trainer

    config = tiny_config(cache, tmp_path / "start", *MEANFLOW, f"train.init={teacher_run}")
    trainer = Trainer(config)
    teacher = load_model(teacher_run / "model")
    student = trainer.unwrapped.eval()
    assert student.config.flow_map and not teacher.config.flow_map
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, 8, 8, generator=generator)
    t = torch.rand(6, generator=generator) * 0.5
    labels = torch.tensor([0, 1, 2, 3, 4, 5])  # 5 is the null class
    with torch.no_grad():
        expected = teacher(x, t, labels)
        torch.testing.assert_close(student(x, t, labels, r=t), expected)
        torch.testing.assert_close(student(x, t, labels, r=t + 0.5), expected)  # zero-initialised interval input
    assert config.model.name == "dit" and config.model.settings["hidden_size"] == 32


def test_meanflow_run_trains_exports_and_samples_in_k_evaluations(meanflow_run: Path, teacher_run: Path,
                                                                   tmp_path: Path):
    from latentflow.export import load_pipeline

    rows = (meanflow_run / "log.csv").read_text().splitlines()
    assert len(rows) == 4 and all("nan" not in row for row in rows[1:])
    logged = CsvLog.read(meanflow_run / "log.csv")
    assert all(float(row["error"]) > 0 and 0 < float(row["loss"]) < 1 for row in logged)  # weighted: error beside
    assert all(row["error"] == "" for row in CsvLog.read(teacher_run / "log.csv"))  # rf: the loss is the error
    saved = load_config(meanflow_run / "config.yaml")
    assert saved.train.init == str(teacher_run) and saved.model.settings["flow_map"] is True
    assert saved.model.settings["interval_time_scale"] == INTERVAL_TIME_SCALE == 1.0  # a new flow map's
    assert cli.main(["export", str(meanflow_run), "--out", str(tmp_path / "pipe")]) == 0
    scheduler = json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["prediction_type"], scheduler["solver"], scheduler["num_inference_steps"]) == (
        "average_velocity", "flowmap", 1)
    pipe = load_pipeline(tmp_path / "pipe")
    assert (pipe.transformer.interval_embedder.time_scale, pipe.transformer.t_embedder.time_scale) == (1.0, 1000.0)
    for steps in (1, 2):
        out = pipe(batch_size=3, num_inference_steps=steps, output_type="np",
                   generator=torch.Generator().manual_seed(0))
        assert out.nfe == steps and out.images.shape == (3, 64, 64, 3)
    guided = pipe(batch_size=2, num_inference_steps=2, guidance_scale=2.0, output_type="latent",
                  generator=torch.Generator().manual_seed(0))
    assert guided.nfe == 2
    euler = pipe(batch_size=2, solver="euler", num_inference_steps=3, output_type="latent")
    assert euler.nfe == 3  # the diagonal u(x, t, t) is a velocity field
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((float(args[1][0]), float(kwargs["r"][0]))), with_kwargs=True)
    shifted = pipe(batch_size=2, num_inference_steps=2, time_shift=2.0, output_type="latent")
    hook.remove()
    assert shifted.nfe == 2 and [value for jump in seen for value in jump] == pytest.approx([0, 1 / 3, 1 / 3, 1])
    assert cli.main(["sample", str(tmp_path / "pipe"), "--n", "2", "--steps", "1", "--grid",
                     str(tmp_path / "grid.png")]) == 0


def test_the_flowmap_sampler_is_refused_on_a_plain_field(teacher_run: Path, tmp_path: Path):
    from latentflow.export import load_pipeline

    assert cli.main(["export", str(teacher_run), "--out", str(tmp_path / "plain")]) == 0
    pipe = load_pipeline(tmp_path / "plain")
    with pytest.raises(LatentflowError, match="needs a flow-map model"):
        pipe(batch_size=1, solver="flowmap", num_inference_steps=1)
    with pytest.raises(LatentflowError, match="not a flow map"):
        pipe.transformer(torch.zeros(1, 32, 8, 8), torch.zeros(1), None, r=torch.ones(1))


def test_init_refuses_another_latent_shape_and_a_teacher_without_init(cache: Path, teacher_run: Path,  # noqa: F811
                                                                       tmp_path: Path):
    from latentflow.train.trainer import Trainer

    other = tmp_path / "other_shape"
    model = make_model("dit", in_channels=32, sample_size=4, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                       num_classes=5)
    model.save_pretrained(other / "model")
    (other / "cache_manifest.json").write_text((teacher_run / "cache_manifest.json").read_text())
    config = tiny_config(cache, tmp_path / "a", *MEANFLOW, f"train.init={other}")
    with pytest.raises(LatentflowError, match=r"32, 8, 8.*--init"):
        Trainer(config)
    assert not (tmp_path / "a").exists()
    with pytest.raises(LatentflowError, match="flow_map_velocity 'teacher' learns from the velocity of the run"):
        Trainer(tiny_config(cache, tmp_path / "b", *MEANFLOW))
    with pytest.raises(LatentflowError, match="neither a finished training run"):
        Trainer(tiny_config(cache, tmp_path / "c", *MEANFLOW, f"train.init={tmp_path}"))
    with pytest.raises(LatentflowError, match="differ from --init"):
        Trainer(tiny_config(cache, tmp_path / "d", *MEANFLOW, f"train.init={teacher_run}",
                            "model.settings={hidden_size: 64}"))
    with pytest.raises(LatentflowError, match="sample.solver.*solver .flowmap. needs a flow-map model"):
        Trainer(tiny_config(cache, tmp_path / "e", "sample.solver=flowmap"))


def test_meanflow_from_scratch_with_the_data_velocity_and_guidance(cache: Path, tmp_path: Path):  # noqa: F811
    run = train(cache, tmp_path / "scratch", "objective.name=meanflow", "objective.flow_map_guidance=2.0",
                "train.max_steps=2")
    assert load_model(run / "model").config.flow_map


def test_the_interval_embedding_scale_of_new_old_and_chosen_flow_maps(cache: Path, teacher_run: Path,  # noqa: F811
                                                                     meanflow_run: Path, tmp_path: Path):
    from latentflow.train.trainer import Trainer

    # a flow map saved before interval_time_scale existed (no key in its config) embeds r - t at t's scale
    old = make_model("dit", in_channels=32, sample_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                     num_classes=5, flow_map=True)
    old.save_pretrained(tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    settings = json.loads(config_file.read_text())
    del settings["interval_time_scale"]
    config_file.write_text(json.dumps(settings))
    assert load_model(tmp_path / "old").interval_embedder.time_scale == 1000.0
    unet = make_model("unet", in_channels=32, sample_size=8, block_out_channels=(32, 32),
                      attention_levels=(False, True), norm_num_groups=8, flow_map=True, interval_time_scale=2.0)
    assert (unet.interval_embedder.time_scale, unet.config.time_scale) == (2.0, 1000.0)
    # a fine-tune of a flow map keeps its scale; a new flow map takes the config's
    again = Trainer(tiny_config(cache, tmp_path / "again", *MEANFLOW, f"train.init={meanflow_run}"))
    assert again.unwrapped.interval_embedder.time_scale == 1.0
    chosen = Trainer(tiny_config(cache, tmp_path / "chosen", *MEANFLOW, f"train.init={teacher_run}",
                                 "model.settings={interval_time_scale: 1000.0}"))
    assert chosen.unwrapped.interval_embedder.time_scale == 1000.0
    scratch = Trainer(tiny_config(cache, tmp_path / "scratch", "objective.name=meanflow"))
    assert scratch.unwrapped.interval_embedder.time_scale == 1.0
    like_t = Trainer(tiny_config(cache, tmp_path / "like_t", *MEANFLOW, f"train.init={teacher_run}",
                                 "model.settings={interval_time_scale: null}"))
    assert like_t.unwrapped.interval_embedder.time_scale == 1000.0
    with pytest.raises(LatentflowError, match=r"interval_time_scale=1000.0 \(start model: 1.0\)"):
        Trainer(tiny_config(cache, tmp_path / "changed", *MEANFLOW, f"train.init={meanflow_run}",
                            "model.settings={interval_time_scale: 1000.0}"))
