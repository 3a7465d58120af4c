"""LatentFlowPipeline with tiny real components: outputs, determinism, batching, save/load, NFE, guidance, DDIM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from latentflow.errors import LatentflowError
from latentflow.flow.schedules import shift_times
from latentflow.flow.solvers import ddim_sample, integrate
from latentflow.models import DiT
from latentflow.pipelines.pipeline_latentflow import LatentFlowPipeline
from latentflow.scheduler import LatentFlowScheduler
from latentflow.vae import vae_fingerprint

REPO = Path(__file__).parents[1]
SHARED = REPO.parent / "shared"
TAEF2 = SHARED / "weights" / "taef2"
PIPELINE_FILE = REPO / "pipelines" / "pipeline_latentflow.py"
LABELS = ["daisy", "rose", "tulip"]


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A random 2-level AutoencoderKL: 4 latent channels, 2x down (8x8 latents <-> 16x16 images)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4, sample_size=16,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
    ).eval()


def tiny_dit(num_classes: int = 3, seed: int = 0) -> DiT:
    """A 2-block DiT; its adaLN-zero output layers are perturbed so the field is not identically 0."""
    torch.manual_seed(seed)
    model = DiT(in_channels=4, sample_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2,
                num_classes=num_classes).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model


def make_pipeline(num_classes: int = 3, prediction_type: str = "velocity", **settings) -> LatentFlowPipeline:
    vae = tiny_vae()
    scheduler = LatentFlowScheduler(
        prediction_type=prediction_type, latent_channels=4, latent_size=[8, 8], num_classes=num_classes,
        label_names=LABELS[:num_classes] if num_classes else None, vae_fingerprint=vae_fingerprint(vae),
        num_inference_steps=4, **settings,
    )
    pipe = LatentFlowPipeline(transformer=tiny_dit(num_classes), vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe() -> LatentFlowPipeline:
    return make_pipeline()


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class CallCounter:
    """Counts forward calls of a module (a forward hook) and the batch sizes it saw."""

    def __init__(self, module: torch.nn.Module):
        self.calls, self.batch_sizes = 0, []
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        self.calls += 1
        self.batch_sizes.append(inputs[0].shape[0])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# outputs


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types_shapes_and_ranges(pipe, output_type):
    out = pipe(batch_size=2, generator=seeded(), output_type=output_type, class_labels=[0, 2])
    assert out.nfe == 4
    assert out.class_labels.tolist() == [0, 2]
    images = out.images
    if output_type == "pil":
        assert len(images) == 2 and all(isinstance(i, Image.Image) and i.size == (16, 16) for i in images)
        assert all(i.mode == "RGB" for i in images)
    elif output_type == "np":
        assert isinstance(images, np.ndarray) and images.shape == (2, 16, 16, 3) and images.dtype == np.float32
        assert images.min() >= 0 and images.max() <= 1 and images.std() > 0
    elif output_type == "pt":
        assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    else:
        assert images.shape == (2, 4, 8, 8) and torch.isfinite(images).all()


def test_image_size(pipe):
    assert pipe.image_size() == (16, 16)


def test_latent_output_decodes_to_the_image_output(pipe):
    latents = pipe(batch_size=2, generator=seeded(3), output_type="latent", class_labels=[1, 1]).images
    images = pipe(batch_size=2, generator=seeded(3), output_type="pt", class_labels=[1, 1]).images
    decoded = (pipe.decode_latents(latents) / 2 + 0.5).clamp(0, 1)
    assert torch.allclose(decoded, images, atol=1e-6)


def test_same_generator_same_images_and_different_seed_differs(pipe):
    first = pipe(batch_size=3, generator=seeded(7), output_type="np").images
    again = pipe(batch_size=3, generator=seeded(7), output_type="np").images
    other = pipe(batch_size=3, generator=seeded(8), output_type="np").images
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


def test_batch_of_four_equals_four_single_calls(pipe):
    latents = torch.randn(4, 4, 8, 8, generator=seeded(1))
    labels = [0, 1, 2, 1]
    batch = pipe(latents=latents, class_labels=labels, output_type="np", solver="midpoint").images
    singles = np.concatenate([
        pipe(latents=latents[i : i + 1], class_labels=[labels[i]], output_type="np", solver="midpoint").images
        for i in range(4)
    ])
    np.testing.assert_allclose(batch, singles, atol=1e-5)


def test_class_names_and_errors(pipe):
    by_name = pipe(batch_size=2, generator=seeded(), class_labels="tulip", output_type="latent")
    assert by_name.class_labels.tolist() == [2, 2]
    assert pipe(batch_size=2, class_labels=torch.tensor(1), output_type="latent").class_labels.tolist() == [1, 1]
    drawn = pipe(batch_size=6, generator=seeded(), output_type="latent").class_labels
    assert drawn.shape == (6,) and 0 <= drawn.min() and drawn.max() < 3
    with pytest.raises(LatentflowError, match="daisy"):
        pipe(class_labels="sunflower")
    with pytest.raises(LatentflowError, match="output_type"):
        pipe(output_type="jpeg")
    with pytest.raises(LatentflowError, match="unknown solver"):
        pipe(solver="leapfrog")
    with pytest.raises(LatentflowError, match="latents have shape"):
        pipe(latents=torch.zeros(1, 3, 8, 8))
    with pytest.raises(LatentflowError, match="batch_size must be an integer >= 1, got 0"):
        pipe(batch_size=0)
    with pytest.raises(LatentflowError, match="num_inference_steps must be an integer >= 1, got 0"):
        pipe(num_inference_steps=0)
    with pytest.raises(LatentflowError, match="guidance_scale must be >= 0"):
        pipe(guidance_scale=-1.0)
    with pytest.raises(LatentflowError, match="got 2 generators for a batch of 3"):
        pipe(batch_size=3, generator=[seeded(0), seeded(1)])


@pytest.mark.parametrize("arguments, message", [
    ({"guidance_scale": -0.5}, r"guidance_scale must be >= 0 and finite \(1 means no guidance\), got -0.5"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be >= 0 and finite .*got nan"),
    ({"guidance_scale": float("inf")}, "guidance_scale must be >= 0 and finite .*got inf"),
    ({"guidance_scale": "2"}, "guidance_scale must be >= 0 and finite .*got '2'"),
    ({"latents": torch.zeros(4, 8, 8)}, r"latents have shape \(4, 8, 8\); expected \(B, \*\(4, 8, 8\)\) with B >= 1"),
    ({"latents": torch.zeros(0, 4, 8, 8)}, r"latents have shape \(0, 4, 8, 8\).*with B >= 1"),
    ({"latents": torch.zeros(1, 4, 8, 4)}, r"latents have shape \(1, 4, 8, 4\)"),
    ({"latents": np.zeros((1, 4, 8, 8))}, "latents must be a torch.Tensor of shape .*got ndarray"),
    ({"latents": torch.zeros(2, 4, 8, 8), "generator": [torch.Generator()] * 3},
     "got 3 generators for a batch of 2; pass one torch.Generator, or a list of 2"),
    ({"class_labels": [0, 1, 2], "generator": [torch.Generator()] * 2}, "got 2 generators for a batch of 3"),
    ({"batch_size": 2, "generator": []}, "got 0 generators for a batch of 2"),
    ({"batch_size": 2, "generator": [torch.Generator(), 7]}, "generator list holds something other than"),
    ({"class_labels": []}, "class_labels is empty; give one label, or one per image"),
    # these four were sampled: NaN images (with numpy's cast warning), a bool or 0.5 taken as a class, use_guide "no"
    ({"latents": torch.full((1, 4, 8, 8), float("nan"))}, "latents hold NaN or infinite values; pass finite noise"),
    ({"latents": torch.zeros(1, 4, 8, 8, dtype=torch.long)}, "latents must be floating-point noise .*got torch.int64"),
    ({"class_labels": True}, "class label True is neither a class name nor an integer id"),
    ({"class_labels": torch.tensor([0.5, 1.0])}, "class label 0.5 is neither a class name nor an integer id"),
    ({"class_labels": torch.tensor([[0, 1]])}, r"class_labels tensor has shape \(1, 2\); give one label \(0-D\) or one "
                                               r"per image \(B,\)"),  # was "got 2 class labels for a batch of 1"
    ({"use_guide": "no"}, "use_guide must be True or False, got 'no'"),
    ({"solver": "dopri5", "atol": 0.0}, r"atol must be a finite number > 0 \(an adaptive .*\), got 0.0"),
    ({"solver": "dopri5", "rtol": float("nan")}, "rtol must be a finite number > 0 .*got nan"),
    ({"solver": "dopri5", "atol": True}, "atol must be a finite number > 0 .*got True"),
    ({"solver": "dopri5", "num_inference_steps": 8}, r"num_inference_steps=8: solver 'dopri5' picks its own steps "
                                                     r"\(its accuracy is atol\), so the count would be ignored"),
    ({"atol": 1e-3}, r"atol=0.001: solver 'euler' takes a number of steps \(num_inference_steps\), not a tolerance"),
    ({"solver": "midpoint", "rtol": 1e-3}, r"rtol=0.001: solver 'midpoint' takes a number of steps"),
    ({"eta": -0.5}, r"eta must be a finite number >= 0 \(DDIM: 0 deterministic, 1 ancestral\), got -0.5"),
    ({"eta": 1.0}, "eta=1 is DDIM's stochasticity, and solver 'euler' integrates a deterministic ODE; leave eta unset"),
])
def test_bad_inputs_name_the_argument_and_what_is_valid(pipe, arguments, message):
    with CallCounter(pipe.transformer) as counter, pytest.raises(LatentflowError, match=message) as raised:
        pipe(output_type="latent", **arguments)
    assert "\n" not in str(raised.value) and counter.calls == 0  # one line, refused before any evaluation


def test_good_generator_lists_and_numpy_guidance_scales_pass(pipe):
    latents = torch.randn(2, 4, 8, 8, generator=seeded(9))
    listed = pipe(latents=latents, class_labels=[0, 1], generator=[seeded(1), seeded(2)], output_type="latent")
    scalar = pipe(latents=latents, class_labels=[0, 1], guidance_scale=np.float32(1.0), use_guide=np.bool_(True),
                  output_type="latent")
    assert torch.equal(listed.images, scalar.images)  # latents given: generators only draw what is missing
    deterministic = pipe(latents=latents, class_labels=[0, 1], eta=0.0, output_type="latent")  # as reflow asks
    assert torch.equal(deterministic.images, scalar.images)
    tolerances = [pipe(latents=latents, class_labels=[0, 1], solver="dopri5", atol=atol, rtol=atol,
                       output_type="latent").images for atol in (np.float32(1e-3), 1e-3)]
    assert torch.equal(*tolerances)


# ---------------------------------------------------------------------------------------------------------------
# NFE and the solvers


@pytest.mark.parametrize(("solver", "steps", "per_step"), [("euler", 3, 1), ("midpoint", 3, 2), ("rk4", 2, 4)])
def test_fixed_step_nfe_counts_model_calls(pipe, solver, steps, per_step):
    with CallCounter(pipe.transformer) as counter:
        out = pipe(batch_size=2, num_inference_steps=steps, solver=solver, generator=seeded(), output_type="latent")
    assert out.nfe == counter.calls == steps * per_step


def test_dopri5_reports_its_true_nfe(pipe):
    with CallCounter(pipe.transformer) as counter:
        out = pipe(batch_size=2, solver="dopri5", atol=1e-2, rtol=1e-2, generator=seeded(), output_type="latent")
    assert out.nfe == counter.calls
    assert out.nfe > 6  # at least the initial evaluation and one 6-stage step
    with CallCounter(pipe.transformer) as counter:
        tighter = pipe(batch_size=2, solver="dopri5", atol=1e-3, rtol=1e-3, generator=seeded(), output_type="latent")
    assert tighter.nfe == counter.calls and tighter.nfe > out.nfe


def test_pipeline_matches_direct_integration(pipe):
    latents = torch.randn(2, 4, 8, 8, generator=seeded(2))
    labels = torch.tensor([0, 1])
    expected = integrate(lambda x, t: pipe.transformer(x, t, class_labels=labels), latents, "rk4", steps=3)
    out = pipe(latents=latents, class_labels=labels, solver="rk4", num_inference_steps=3, output_type="latent")
    assert torch.allclose(out.images, expected.x, atol=1e-6) and out.nfe == expected.nfe


# ---------------------------------------------------------------------------------------------------------------
# classifier-free guidance


def test_guidance_scale_one_is_no_guidance_and_costs_no_extra_evaluations(pipe):
    latents = torch.randn(2, 4, 8, 8, generator=seeded(4))
    labels = torch.tensor([2, 0])
    expected = integrate(lambda x, t: pipe.transformer(x, t, class_labels=labels), latents, "euler", steps=4)
    with CallCounter(pipe.transformer) as counter:
        out = pipe(latents=latents, class_labels=labels, guidance_scale=1.0, output_type="latent")
    assert torch.allclose(out.images, expected.x, atol=1e-6)
    assert counter.calls == out.nfe == 4 and counter.batch_sizes == [2] * 4


def test_guidance_combines_class_and_null_predictions(pipe):
    latents = torch.randn(2, 4, 8, 8, generator=seeded(5))
    labels = torch.tensor([1, 2])
    null = torch.full_like(labels, 3)  # the null class id is num_classes
    scale = 3.0

    def guided(x, t):
        conditional = pipe.transformer(x, t, class_labels=labels)
        unconditional = pipe.transformer(x, t, class_labels=null)
        return unconditional + scale * (conditional - unconditional)

    expected = integrate(guided, latents, "euler", steps=4)
    with CallCounter(pipe.transformer) as counter:
        out = pipe(latents=latents, class_labels=labels, guidance_scale=scale, output_type="latent")
    assert torch.allclose(out.images, expected.x, atol=1e-5)
    assert out.nfe == counter.calls == 4 and counter.batch_sizes == [4] * 4  # cond + null in one batch
    unguided = pipe(latents=latents, class_labels=labels, output_type="latent").images
    assert (out.images - unguided).abs().max() > 1e-3


def test_guidance_interval_guides_only_inside_and_skips_the_null_half_outside(pipe):
    latents = torch.randn(2, 4, 8, 8, generator=seeded(5))
    labels = torch.tensor([1, 2])
    null = torch.full_like(labels, 3)
    scale, low, high = 3.0, 0.3, 0.6  # euler 4 evaluates at t = 0, 0.25, 0.5, 0.75: only t = 0.5 is inside

    def guided(x, t):
        conditional = pipe.transformer(x, t, class_labels=labels)
        if not low <= float(t[0]) <= high:
            return conditional
        unconditional = pipe.transformer(x, t, class_labels=null)
        return unconditional + scale * (conditional - unconditional)

    expected = integrate(guided, latents, "euler", steps=4)
    with CallCounter(pipe.transformer) as counter:
        out = pipe(latents=latents, class_labels=labels, guidance_scale=scale, guidance_interval=(low, high),
                   output_type="latent")
    assert torch.allclose(out.images, expected.x, atol=1e-5)
    assert out.nfe == counter.calls == 4 and counter.batch_sizes == [2, 2, 4, 2]
    everywhere = pipe(latents=latents, class_labels=labels, guidance_scale=scale, guidance_interval=(0.0, 1.0),
                      output_type="latent").images
    assert torch.allclose(everywhere, pipe(latents=latents, class_labels=labels, guidance_scale=scale,
                                           output_type="latent").images)
    assert (everywhere - out.images).abs().max() > 1e-3


def test_guidance_interval_mixes_per_sample_times():
    from latentflow.flow.guidance import guided_field

    def model(x, t, labels):  # conditional 1, unconditional 0: guided 3 inside, conditional 1 outside
        return (labels != 3).float().view(-1, 1) * torch.ones_like(x)

    field = guided_field(model, torch.tensor([0, 1, 2]), 3, 3.0, interval=(0.2, 0.5))
    out = field(torch.zeros(3, 2), torch.tensor([0.1, 0.2, 0.7]))
    assert out[:, 0].tolist() == [1.0, 3.0, 1.0]


def test_a_guide_gives_the_unconditional_branch():
    """Known answer: f = g(null) + w (f(c) - g(null)); the guide sees the null class only, and not at w = 1."""
    from latentflow.flow.guidance import guided_field

    seen = []

    def model(x, t, labels):  # conditional: 1 + label
        return (1.0 + labels.float()).view(-1, 1) * torch.ones_like(x)

    def guide(x, t, labels):
        seen.append(labels.tolist())
        return torch.full_like(x, 0.5)

    labels = torch.tensor([0, 2])
    out = guided_field(model, labels, 3, 3.0, guide=guide)(torch.zeros(2, 2), torch.tensor([0.1, 0.1]))
    assert out[:, 0].tolist() == [0.5 + 3.0 * (1.0 - 0.5), 0.5 + 3.0 * (3.0 - 0.5)] and seen == [[3, 3]]
    inside_only = guided_field(model, labels, 3, 3.0, interval=(0.5, 1.0), guide=guide)
    assert inside_only(torch.zeros(2, 2), torch.tensor([0.1, 0.1]))[:, 0].tolist() == [1.0, 3.0] and len(seen) == 1
    guided_field(model, labels, 3, 1.0, guide=guide)(torch.zeros(2, 2), torch.tensor([0.1, 0.1]))
    assert len(seen) == 1


def test_pipeline_guide_samples_its_known_answer_and_round_trips(pipe, tmp_path):
    guide = tiny_dit(seed=7)
    guided = LatentFlowPipeline(transformer=pipe.transformer, vae=pipe.vae, scheduler=pipe.scheduler, guide=guide)
    guided.set_progress_bar_config(disable=True)
    latents = torch.randn(2, 4, 8, 8, generator=seeded(5))
    labels, null, scale = torch.tensor([1, 2]), torch.tensor([3, 3]), 3.0

    def field(x, t):
        unconditional = guide(x, t, class_labels=null)
        return unconditional + scale * (pipe.transformer(x, t, class_labels=labels) - unconditional)

    expected = integrate(field, latents, "euler", steps=4).x
    out = guided(latents=latents, class_labels=labels, guidance_scale=scale, output_type="latent")
    assert torch.allclose(out.images, expected, atol=1e-5) and out.nfe == 4
    own = guided(latents=latents, class_labels=labels, guidance_scale=scale, use_guide=False, output_type="latent")
    plain = pipe(latents=latents, class_labels=labels, guidance_scale=scale, output_type="latent")
    assert torch.equal(own.images, plain.images) and (own.images - out.images).abs().max() > 1e-3

    guided.save_pretrained(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "model_index.json").read_text())["guide"] == ["latentflow.models.dit", "DiT"]
    loaded = LatentFlowPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    again = loaded(latents=latents, class_labels=labels, guidance_scale=scale, output_type="latent").images
    assert torch.equal(again, out.images)
    without = LatentFlowPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True, guide=None)
    without.set_progress_bar_config(disable=True)
    assert without.guide is None
    assert torch.equal(without(latents=latents, class_labels=labels, guidance_scale=scale, output_type="latent").images,
                       plain.images)


def test_a_guide_in_another_dtype_answers_in_the_models_dtype(pipe):
    guide = tiny_dit(seed=7).to(torch.float64)
    guided = LatentFlowPipeline(transformer=pipe.transformer, vae=pipe.vae, scheduler=pipe.scheduler, guide=guide)
    x, t, labels = torch.randn(2, 4, 8, 8, generator=seeded(3)), torch.full((2,), 0.3), torch.tensor([1, 2])
    out = guided._guided_field(labels, 3.0)(x, t)
    unconditional = guide(x.double(), t, class_labels=torch.tensor([3, 3])).float()
    assert out.dtype == torch.float32
    assert torch.allclose(out, unconditional + 3.0 * (pipe.transformer(x, t, class_labels=labels) - unconditional),
                          atol=1e-5)


def test_a_folder_saved_before_guides_existed_loads_without_one(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    index_file = tmp_path / "pipe" / "model_index.json"
    index = json.loads(index_file.read_text())
    assert index.pop("guide") == [None, None]
    index_file.write_text(json.dumps(index))
    loaded = LatentFlowPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    assert loaded.guide is None


def test_a_guide_of_other_latents_is_refused(pipe):
    other = DiT(in_channels=4, sample_size=4, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=3)
    with pytest.raises(LatentflowError, match="guide sample_size=4 but transformer sample_size=8"):
        LatentFlowPipeline(transformer=pipe.transformer, vae=pipe.vae, scheduler=pipe.scheduler, guide=other)
    other = DiT(in_channels=4, sample_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=2)
    with pytest.raises(LatentflowError, match="guide num_classes=2 but scheduler num_classes=3"):
        LatentFlowPipeline(transformer=pipe.transformer, vae=pipe.vae, scheduler=pipe.scheduler, guide=other)


@pytest.mark.parametrize("interval", [(0.5, 0.2), (-0.1, 0.5), (0.2, 1.5), (0.3,), (True, 0.5)])
def test_bad_guidance_intervals_are_refused(pipe, interval):
    with pytest.raises(LatentflowError, match="guidance_interval must be two times 0 <= low < high <= 1"):
        pipe(batch_size=1, class_labels=[0], guidance_scale=2.0, guidance_interval=interval, output_type="latent")


def test_configurable_null_class():
    pipe = make_pipeline(null_class=0)
    latents = torch.randn(1, 4, 8, 8, generator=seeded(6))
    labels = torch.tensor([2])

    def guided(x, t):
        conditional = pipe.transformer(x, t, class_labels=labels)
        unconditional = pipe.transformer(x, t, class_labels=torch.tensor([0]))
        return unconditional + 2.0 * (conditional - unconditional)

    expected = integrate(guided, latents, "euler", steps=4).x
    out = pipe(latents=latents, class_labels=labels, guidance_scale=2.0, output_type="latent").images
    assert torch.allclose(out, expected, atol=1e-5)


def test_unconditional_model_refuses_labels_and_guidance():
    pipe = make_pipeline(num_classes=0)
    out = pipe(batch_size=2, generator=seeded(), output_type="np")
    assert out.images.shape == (2, 16, 16, 3) and out.class_labels is None
    with pytest.raises(LatentflowError, match="unconditional"):
        pipe(class_labels=[0])
    with pytest.raises(LatentflowError, match="guidance_scale"):
        pipe(guidance_scale=2.0)


# ---------------------------------------------------------------------------------------------------------------
# DDPM models sample with DDIM


def test_ddpm_model_samples_with_ddim():
    pipe = make_pipeline(prediction_type="noise", eta=0.0)
    assert pipe.scheduler.default_solver == "ddim"
    latents = torch.randn(2, 4, 8, 8, generator=seeded(9))
    labels = torch.tensor([0, 1])
    expected = ddim_sample(lambda x, t: pipe.transformer(x, t, class_labels=labels), latents,
                           pipe.scheduler.ddpm_schedule(), steps=5, eta=0.0)
    with CallCounter(pipe.transformer) as counter:
        out = pipe(latents=latents, class_labels=labels, num_inference_steps=5, output_type="latent")
    assert torch.allclose(out.images, expected.x, atol=1e-6)
    assert out.nfe == counter.calls == 5

    images = pipe(latents=latents, class_labels=labels, num_inference_steps=5, output_type="np").images
    assert images.shape == (2, 16, 16, 3) and 0 <= images.min() and images.max() <= 1
    stochastic = [pipe(latents=latents, class_labels=labels, num_inference_steps=5, eta=1.0,
                       generator=seeded(s), output_type="latent").images for s in (1, 1, 2)]
    assert torch.equal(stochastic[0], stochastic[1])
    assert (stochastic[0] - stochastic[2]).abs().max() > 1e-3
    assert (stochastic[0] - out.images).abs().max() > 1e-3
    with pytest.raises(LatentflowError, match="ddim"):
        pipe(solver="euler")


# ---------------------------------------------------------------------------------------------------------------
# step callbacks


def test_step_callback_sees_every_step_and_can_edit_latents(pipe):
    latents = torch.randn(2, 4, 8, 8, generator=seeded(10))
    labels = [0, 1]
    seen = []

    def record(p, step, t, tensors):
        seen.append((step, round(t, 6), tensors["latents"].shape))
        return tensors

    plain = pipe(latents=latents, class_labels=labels, solver="midpoint", output_type="latent")
    with_callback = pipe(latents=latents, class_labels=labels, solver="midpoint", output_type="latent",
                         callback_on_step_end=record)
    assert [s[:2] for s in seen] == [(0, 0.25), (1, 0.5), (2, 0.75), (3, 1.0)]
    assert with_callback.nfe == plain.nfe == 8
    assert torch.allclose(with_callback.images, plain.images, atol=1e-5)

    zeroed = pipe(latents=latents, class_labels=labels, output_type="latent",
                  callback_on_step_end=lambda p, step, t, tensors: {"latents": torch.zeros_like(tensors["latents"])})
    assert torch.equal(zeroed.images, torch.zeros_like(zeroed.images))
    with pytest.raises(LatentflowError, match="callback_on_step_end"):
        pipe(solver="dopri5", callback_on_step_end=record)


def test_time_shift_integrates_on_the_shifted_grid_from_call_or_scheduler(pipe):
    latents = torch.randn(2, 4, 8, 8, generator=seeded(12))
    labels = torch.tensor([0, 1])
    shifted = pipe(latents=latents, class_labels=[0, 1], solver="euler", time_shift=2.0, output_type="latent")
    grid = shift_times(torch.linspace(0, 1, 5), 2.0)
    x = latents.clone()
    with torch.no_grad():
        for start, stop in zip(grid[:-1], grid[1:]):  # euler by hand on t = 0, 0.143, 0.333, 0.6, 1
            x = x + (stop - start) * pipe.transformer(x, start.expand(2), class_labels=labels)
    torch.testing.assert_close(shifted.images, x, atol=1e-5, rtol=1e-5)
    even = pipe(latents=latents, class_labels=[0, 1], solver="euler", output_type="latent")
    assert (shifted.images - even.images).abs().max() > 1e-3  # the shift changed the grid

    steps_seen = []
    stepwise = pipe(latents=latents, class_labels=[0, 1], solver="euler", time_shift=2.0, output_type="latent",
                    callback_on_step_end=lambda p, step, t, tensors: steps_seen.append(round(t, 4)))
    assert steps_seen == [round(float(t), 4) for t in grid[1:]]
    torch.testing.assert_close(stepwise.images, shifted.images, atol=1e-5, rtol=1e-5)

    default = make_pipeline(time_shift=2.0)  # the scheduler's default, overridden by the call
    torch.testing.assert_close(default(latents=latents, class_labels=[0, 1], output_type="latent").images,
                               shifted.images, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(default(latents=latents, class_labels=[0, 1], output_type="latent",
                                       time_shift=1.0).images, even.images, atol=1e-5, rtol=1e-5)
    with pytest.raises(LatentflowError, match="sets its own times"):
        pipe(solver="dopri5", time_shift=2.0)
    with pytest.raises(LatentflowError, match="time shift must be"):
        LatentFlowScheduler(time_shift=0.0)


# ---------------------------------------------------------------------------------------------------------------
# save / load and consistency checks


def test_save_then_from_pretrained_gives_identical_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["transformer"] == ["latentflow.models.dit", "DiT"]
    assert index["scheduler"] == ["latentflow.scheduler", "LatentFlowScheduler"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    loaded = LatentFlowPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    expected = pipe(batch_size=2, generator=seeded(11), output_type="np").images
    np.testing.assert_array_equal(loaded(batch_size=2, generator=seeded(11), output_type="np").images, expected)


_LOAD_WITH_DIFFUSERS = """
import sys, numpy as np, torch
from diffusers import DiffusionPipeline
assert "latentflow" not in sys.modules
for index, custom in enumerate(sys.argv[2:4]):  # the repository's pipeline file, then the saved folder itself
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], custom_pipeline=custom, trust_remote_code=True,
                                             local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, generator=torch.Generator().manual_seed(11), output_type="np")
    np.save(sys.argv[4] + f"{index}.npy", out.images)
    print(type(pipe).__name__, type(pipe.scheduler).__module__, out.nfe)
"""


def test_diffusion_pipeline_with_custom_pipeline_loads_offline_in_a_fresh_interpreter(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    expected = pipe(batch_size=2, generator=seeded(11), output_type="np").images
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    assert (tmp_path / "pipe" / "pipeline.py").read_text() == PIPELINE_FILE.read_text()
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_WITH_DIFFUSERS, str(tmp_path / "pipe"), str(PIPELINE_FILE),
         str(tmp_path / "pipe"), str(tmp_path / "images")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-6:] == ["LatentFlowPipeline", "latentflow.scheduler", "4"] * 2
    for index in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"images{index}.npy"), expected)


def test_a_different_vae_is_refused(pipe, tmp_path):
    other = tiny_vae(seed=1)
    with pytest.raises(LatentflowError, match="not the one the latents were encoded with"):
        LatentFlowPipeline(transformer=pipe.transformer, vae=other, scheduler=pipe.scheduler)
    pipe.save_pretrained(tmp_path / "pipe")
    with pytest.raises(LatentflowError, match="weights_sha256"):
        LatentFlowPipeline.from_pretrained(tmp_path / "pipe", vae=other, local_files_only=True)


def test_mismatched_shapes_and_classes_are_refused(pipe):
    with pytest.raises(LatentflowError, match="latent_channels"):
        LatentFlowPipeline(transformer=pipe.transformer, vae=pipe.vae,
                           scheduler=LatentFlowScheduler(latent_channels=8, latent_size=[8, 8], num_classes=3))
    with pytest.raises(LatentflowError, match="num_classes"):
        LatentFlowPipeline(transformer=pipe.transformer, vae=pipe.vae,
                           scheduler=LatentFlowScheduler(latent_channels=4, latent_size=[8, 8], num_classes=0))


def test_to_device_and_progress_bar_config(pipe, capsys):
    moved = pipe.to("cpu")
    assert moved.device.type == "cpu"
    pipe.set_progress_bar_config(disable=False)
    try:
        pipe(batch_size=1, generator=seeded(), output_type="latent", class_labels=[0])
    finally:
        pipe.set_progress_bar_config(disable=True)
    assert "4/4" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# the real TAEF2 VAE


@pytest.mark.slow
@pytest.mark.skipif(not TAEF2.is_dir(), reason=f"TAEF2 weights not found at {TAEF2}")
def test_pipeline_with_the_real_taef2_vae_round_trips_through_save_and_load(tmp_path):
    from latentflow.vae import load_vae

    vae = load_vae(TAEF2)
    torch.manual_seed(0)
    model = DiT(in_channels=32, sample_size=4, patch_size=2, hidden_size=32, depth=1, num_heads=2).eval()
    scheduler = LatentFlowScheduler(latent_channels=32, latent_size=[4, 4], vae_fingerprint=vae_fingerprint(vae.module))
    pipe = LatentFlowPipeline(transformer=model, vae=vae.module, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    # the zero-initialised DiT is the zero field: x1 = x0, so the pipeline decodes its own noise like FrozenVAE
    latents = torch.randn(2, 32, 4, 4, generator=seeded(0))
    images = pipe(latents=latents, output_type="pt").images
    assert images.shape == (2, 3, 32, 32)
    assert torch.allclose(images, (vae.decode(latents) / 2 + 0.5).clamp(0, 1), atol=1e-5)

    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["vae"] == ["latentflow.vae", "PooledAutoencoderTiny"]
    loaded = LatentFlowPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert torch.equal(loaded(latents=latents, output_type="pt").images, images)
