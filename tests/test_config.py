"""YAML configs: shipped files load, unknown keys and wrong types are refused, overrides work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from latentflow.errors import LatentflowError
from latentflow.models import make_model
from latentflow.train.config import Config, config_to_dict, load_config, save_config, validate_config

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("name", ["flowers64_dit_s2_otcfm.yaml", "flowers64_demo.yaml", "flowers64_otcfm_2k.yaml",
                                  "flowers64_hour.yaml", "flowers128_demo.yaml", "flowers64_dataset_ot.yaml",
                                  "imagenet256_dit_xl2_otcfm.yaml"])
def test_shipped_configs_load_validate_and_build_their_model(name: str) -> None:
    config = load_config(CONFIGS / name)
    validate_config(config, num_processes=8 if "imagenet" in name else 1)
    assert isinstance(config.optim.lr, float)
    if "imagenet" in name:
        assert (config.model.name, config.data.batch_size, config.optim.lr) == ("DiT-XL/2", 256, 1e-4)
        assert config.train.ema_decay == 0.9999 and config.objective.ot_scope == "global"
    else:
        model = make_model(config.model.name, in_channels=32, sample_size=8, num_classes=5, **config.model.settings)
        assert sum(p.numel() for p in model.parameters()) < 10e6  # small enough for a 2-core CPU


def test_the_128_px_config_is_the_hour_configs_recipe() -> None:
    """flowers128_demo.yaml says it is flowers64_hour.yaml at 128 px: only the cache and output folder may differ."""
    names = ("flowers64_hour.yaml", "flowers128_demo.yaml")
    hour, big = (config_to_dict(load_config(CONFIGS / name)) for name in names)
    for config in (hour, big):
        config.pop("output_dir")
        config["data"].pop("cache")
    assert big == hour


@pytest.mark.parametrize("name", ["cpu_2proc", "1gpu", "8gpu"])
def test_accelerate_configs_are_yaml_with_process_counts(name: str) -> None:
    data = yaml.safe_load((CONFIGS / "accelerate" / f"{name}.yaml").read_text())
    assert data["num_processes"] == {"cpu_2proc": 2, "1gpu": 1, "8gpu": 8}[name]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_lists_valid_keys(tmp_path: Path) -> None:
    with pytest.raises(LatentflowError, match=r"optim: unknown key\(s\) \['learning_rate'\].*lr \(float\)"):
        load_config(write(tmp_path, {"optim": {"learning_rate": 1e-3}}))
    with pytest.raises(LatentflowError, match=r"unknown key\(s\) \['trian'\].*train"):
        load_config(write(tmp_path, {"trian": {}}))


def test_wrong_type_names_field_and_expected_type(tmp_path: Path) -> None:
    with pytest.raises(LatentflowError, match=r"train.max_steps: expected int, got str 'many'"):
        load_config(write(tmp_path, {"train": {"max_steps": "many"}}))
    with pytest.raises(LatentflowError, match=r"objective.name: 'otfm' is not valid; expected one of 'rf'"):
        load_config(write(tmp_path, {"objective": {"name": "otfm"}}))
    with pytest.raises(LatentflowError, match=r"train.max_steps: expected int, got bool"):
        load_config(write(tmp_path, {"train": {"max_steps": True}}))


def test_overrides_are_parsed_as_yaml_and_checked(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {"data": {"cache": "c"}}),
                         ["train.max_steps=7", "optim.lr=3e-4", "model.settings.depth=2", "log.trackers=[]",
                          "objective.sigma=null"])
    assert (config.train.max_steps, config.optim.lr, config.model.settings, config.log.trackers) == (7, 3e-4,
                                                                                                     {"depth": 2}, [])
    assert config.objective.sigma is None
    with pytest.raises(LatentflowError, match="unknown key"):
        load_config(None, ["train.max_step=7"])
    with pytest.raises(LatentflowError, match="section.key=value"):
        load_config(None, ["train.max_steps"])


def test_a_file_or_override_that_is_not_yaml_is_one_line_naming_it(tmp_path: Path) -> None:
    """Found trying the command from outside: a YAML syntax error was a 40-line traceback."""
    with pytest.raises(LatentflowError, match=f"config file {tmp_path} is a folder; give a YAML file"):
        load_config(tmp_path)  # was "does not exist"
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  max_steps: [\n")
    with pytest.raises(LatentflowError, match=rf"{broken}: not valid YAML \(.* at line 3, column 1\)"):
        load_config(broken)
    with pytest.raises(LatentflowError, match=r"override 'train.max_steps=\[': not valid YAML"):
        load_config(None, ["train.max_steps=["])
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"a: \x00\x01")
    with pytest.raises(LatentflowError, match=rf"{binary}: not valid YAML"):
        load_config(binary)


def test_impossible_values_are_refused() -> None:
    config = load_config(None, ["data.cache=x", "data.batch_size=4", "optim.grad_accumulation=2"])
    validate_config(config, num_processes=2)
    with pytest.raises(LatentflowError, match=r"batch_size 4 must be a positive multiple of processes \(8\)"):
        validate_config(config, num_processes=8)
    with pytest.raises(LatentflowError, match="ot_scope 'global' needs an OT objective"):
        validate_config(load_config(None, ["data.cache=x", "objective.name=rf", "objective.ot_scope=global"]))
    flow_map = ["data.cache=x", "objective.name=meanflow", "objective.ot_scope=global", "sample.solver=flowmap"]
    with pytest.raises(LatentflowError, match="or meanflow with flow_map_pairing 'ot'"):
        validate_config(load_config(None, flow_map))
    validate_config(load_config(None, [*flow_map, "objective.flow_map_pairing=ot"]))
    with pytest.raises(LatentflowError, match="flow_map_pairing"):
        load_config(None, ["objective.flow_map_pairing=sinkhorn"])
    # YAML reads an unquoted no as False: a choice named "no" takes it back
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(LatentflowError, match="train.mixed_precision: True is not valid"):
        load_config(None, ["train.mixed_precision=yes"])
    with pytest.raises(LatentflowError, match="data.cache"):
        validate_config(Config())
    validate_config(load_config(None, ["data.cache=x", "train.max_steps=10", "train.guide_step=9"]))
    for step in (0, 10):
        with pytest.raises(LatentflowError, match=rf"train.guide_step must be a step in \[1, train.max_steps\) or "
                                                  rf"null, got {step}"):
            validate_config(load_config(None, ["data.cache=x", "train.max_steps=10", f"train.guide_step={step}"]))
    for setting in ("data.num_workers=-1", "data.shuffle_buffer=-1"):  # -1 workers was torch's traceback
        with pytest.raises(LatentflowError, match=r"data.num_workers and data.shuffle_buffer must be >= 0 \(0: none\)"):
            validate_config(load_config(None, ["data.cache=x", setting]))


def test_saved_config_loads_back_equal(tmp_path: Path) -> None:
    config = load_config(CONFIGS / "flowers64_dit_s2_otcfm.yaml", ["train.max_steps=3"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_preview_settings_are_checked_before_the_first_step() -> None:
    # these failed only at the first preview, sample.every steps into the run
    base = ["data.cache=x"]
    with pytest.raises(LatentflowError, match=r"sample.solver \(objective 'otcfm'\): unknown solver 'dopri6'"):
        validate_config(load_config(None, [*base, "objective.name=otcfm", "sample.solver=dopri6"]))
    with pytest.raises(LatentflowError, match=r"sample.solver \(objective 'rf'\): solver 'flowmap' needs a flow-map"):
        validate_config(load_config(None, [*base, "objective.name=rf", "sample.solver=flowmap"]))
    for scale in ("-1", ".nan", ".inf"):
        with pytest.raises(LatentflowError, match=r"sample.guidance_scale \(objective 'rf'\): guidance_scale must be "
                                                  r">= 0 and finite"):
            validate_config(load_config(None, [*base, "objective.name=rf", f"sample.guidance_scale={scale}"]))
    # what each objective's previews do sample with is accepted; a noise model previews with ddim whatever it names
    validate_config(load_config(None, [*base, "objective.name=meanflow", "sample.solver=flowmap"]))
    validate_config(load_config(None, [*base, "objective.name=rf", "sample.solver=dopri5", "sample.guidance_scale=0"]))
    validate_config(load_config(None, [*base, "objective.name=ddpm", "sample.solver=euler"]))


def test_optimizer_and_seed_settings_that_were_tracebacks_are_refused() -> None:
    # torch's "Invalid weight_decay value" and numpy's "Seed must be between 0 and 2**32 - 1", at the trainer's start
    for setting, message in (("optim.weight_decay=-1", r"optim.weight_decay must be >= 0, got -1.0"),
                             ("optim.weight_decay=.nan", r"optim.weight_decay must be >= 0, got nan"),
                             ("train.seed=-1", r"train.seed must be in \[0, 2\*\*32\), got -1"),
                             ("sample.seed=4294967296", r"sample.seed must be in \[0, 2\*\*32\), got 4294967296")):
        with pytest.raises(LatentflowError, match=message):
            validate_config(load_config(None, ["data.cache=x", setting]))
    validate_config(load_config(None, ["data.cache=x", "optim.weight_decay=0.01", "train.seed=4294967295"]))
