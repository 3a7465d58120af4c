"""A pipeline folder exported by latentflow 0.1.0 (before the package was rearranged) still loads, by both routes,
and makes the same images (tests/fixtures/README.md says how the fixture was made)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentflow import cli
from latentflow.pipelines import LatentFlowPipeline

FIXTURES = Path(__file__).parent / "fixtures"
LEGACY = FIXTURES / "pipeline_v0.1.0"
REPO = Path(__file__).parents[1]


@pytest.fixture()
def legacy(tmp_path: Path) -> Path:
    """A writable copy of the 0.1.0 folder (diffusers may write beside a custom pipeline)."""
    return Path(shutil.copytree(LEGACY, tmp_path / "legacy"))


def test_the_fixture_names_the_module_paths_of_0_1_0() -> None:
    index = json.loads((LEGACY / "model_index.json").read_text())
    assert index["scheduler"] == ["latentflow.export", "LatentFlowScheduler"]
    assert index["vae"] == ["latentflow.vae", "PooledAutoencoderTiny"]
    assert index["transformer"] == ["latentflow.models.dit", "DiT"]
    assert "from latentflow.solvers import" in (LEGACY / "pipeline.py").read_text()


def test_from_pretrained_gives_the_images_0_1_0_made(legacy: Path) -> None:
    pipe = LatentFlowPipeline.from_pretrained(str(legacy), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, class_labels=[0, 1], guidance_scale=2.0, num_inference_steps=2, solver="euler",
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_allclose(images, np.load(FIXTURES / "pipeline_v0.1.0_images.npy"), atol=1e-6)


def test_latentflow_sample_writes_the_pngs_0_1_0_wrote(legacy: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples"
    assert cli.main(["sample", str(legacy), "--n", "3", "--class", "b", "--guidance-scale", "2.0", "--steps", "2",
                     "--solver", "midpoint", "--seed", "3", "--outdir", str(out)]) == 0
    written = np.stack([np.asarray(Image.open(out / f"{i:06d}.png").convert("RGB")) for i in range(3)])
    np.testing.assert_array_equal(written, np.load(FIXTURES / "pipeline_v0.1.0_sample_cli.npy"))


_LOAD_WITH_CUSTOM_PIPELINE = """
import sys, numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], custom_pipeline=sys.argv[1], trust_remote_code=True,
                                         local_files_only=True)
pipe.set_progress_bar_config(disable=True)
out = pipe(batch_size=2, class_labels=[0, 1], guidance_scale=2.0, num_inference_steps=2, solver="euler",
           generator=torch.Generator().manual_seed(0), output_type="np")
np.save(sys.argv[2], out.images)
print(type(pipe).__name__, type(pipe).__module__.split(".")[-1], type(pipe.scheduler).__name__, out.nfe)
"""


@pytest.mark.slow
def test_custom_pipeline_route_runs_the_0_1_0_pipeline_file_with_the_same_images(legacy: Path, tmp_path: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", _LOAD_WITH_CUSTOM_PIPELINE, str(legacy), str(tmp_path / "x.npy")],
                            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # the class comes from the folder's own pipeline.py (0.1.0's), the scheduler through latentflow.export
    assert result.stdout.split()[-4:] == ["LatentFlowPipeline", "pipeline", "LatentFlowScheduler", "2"]
    np.testing.assert_allclose(np.load(tmp_path / "x.npy"), np.load(FIXTURES / "pipeline_v0.1.0_images.npy"),
                               atol=1e-6)


def test_a_checkout_imports_the_pipeline_as_pipelines() -> None:
    """In a source checkout `from pipelines import LatentFlowPipeline` (as the README shows) is the same file."""
    code = "from pipelines import LatentFlowPipeline; import inspect; print(inspect.getfile(LatentFlowPipeline))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert Path(result.stdout.strip()) == REPO / "pipelines" / "pipeline_latentflow.py"
