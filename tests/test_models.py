"""DiT and U-Net backbones: shapes, adaLN-zero init, class conditioning, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from latentflow.errors import LatentflowError
from latentflow.models import MODEL_PRESETS, DiT, UNet, load_model, make_model

TINY_DIT = {"hidden_size": 32, "depth": 2, "num_heads": 2, "patch_size": 2}
TINY_UNET = {"block_out_channels": (32, 32), "attention_levels": (False, True), "layers_per_block": 1,
             "attention_head_dim": 8, "norm_num_groups": 8}


def tiny(kind: str, num_classes: int = 3, in_channels: int = 4, sample_size: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    settings = TINY_DIT if kind == "dit" else TINY_UNET
    return make_model(kind, in_channels=in_channels, sample_size=sample_size, num_classes=num_classes, **settings)


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Move every weight off its (partly zero) init so outputs depend on all inputs."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("kind", ["dit", "unet"])
@pytest.mark.parametrize("in_channels,sample_size", [(4, 8), (32, 8), (3, 16)])
def test_output_shape_matches_input(kind: str, in_channels: int, sample_size: int) -> None:
    model = tiny(kind, in_channels=in_channels, sample_size=sample_size)
    x_t = torch.randn(3, in_channels, sample_size, sample_size)
    out = model(x_t, torch.rand(3), torch.tensor([0, 1, 3]))
    assert out.shape == x_t.shape


def test_dit_adaln_zero_init_gives_zero_output() -> None:
    model = tiny("dit")
    out = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 2]))
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_labels_and_time_change_output_and_none_means_null_class(kind: str) -> None:
    model = randomize(tiny(kind, num_classes=3)).eval()
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        out_a = model(x_t, t, torch.tensor([0, 1]))
        out_b = model(x_t, t, torch.tensor([2, 2]))
        out_null = model(x_t, t, torch.tensor([3, 3]))  # null id = num_classes
        out_none = model(x_t, t)
        out_later = model(x_t, t + 0.1, torch.tensor([0, 1]))
    assert not torch.allclose(out_a, out_b, atol=1e-4)
    assert not torch.allclose(out_a, out_later, atol=1e-4)
    torch.testing.assert_close(out_none, out_null)


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_save_pretrained_round_trip_is_exact(kind: str, tmp_path) -> None:
    model = randomize(tiny(kind)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((tmp_path / "config.json").read_text())["num_classes"] == 3
    loaded = load_model(tmp_path).eval()
    assert type(loaded) is type(model)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x_t, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_t, t, torch.tensor([1, 0])), model(x_t, t, torch.tensor([1, 0])))


def test_from_pretrained_by_class() -> None:
    assert DiT.from_config(tiny("dit").config).config.hidden_size == 32
    assert UNet.from_config(tiny("unet").config).config.num_classes == 3


@pytest.mark.parametrize("kind", ["dit", "unet"])
def test_gradient_checkpointing_gives_same_gradients(kind: str) -> None:
    model = randomize(tiny(kind))
    x_t, t, labels = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3])

    def gradients() -> list[torch.Tensor]:
        model.zero_grad()
        model(x_t, t, labels).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = gradients()
    model.enable_gradient_checkpointing()
    for a, b in zip(plain, gradients()):
        torch.testing.assert_close(a, b)


def test_presets_have_the_dit_paper_sizes() -> None:
    assert {f"DiT-{s}/{p}" for s in "S B L XL".split() for p in (2, 4, 8)} <= set(MODEL_PRESETS)
    model = make_model("DiT-S/2", in_channels=4, sample_size=32, num_classes=1000)
    parameters = sum(p.numel() for p in model.parameters())
    assert 32e6 < parameters < 34e6  # the paper's DiT-S/2 has 33M parameters
    assert MODEL_PRESETS["DiT-XL/2"][1] == {"hidden_size": 1152, "depth": 28, "num_heads": 16, "patch_size": 2}


def test_unknown_name_or_setting_lists_choices() -> None:
    with pytest.raises(LatentflowError, match="DiT-XL/2"):
        make_model("DiT-XXL/2")
    with pytest.raises(LatentflowError, match="hidden_size"):
        make_model("DiT-S/2", hiden_size=3)
    with pytest.raises(LatentflowError, match="divisible"):
        make_model("dit", sample_size=9, patch_size=2)


def test_bf16_autocast_forward_runs_on_cpu() -> None:
    model = randomize(tiny("dit"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


LIGHTNING = {"norm": "rmsnorm", "qk_norm": True, "mlp": "swiglu", "rope": True}


def small_dit(**options) -> DiT:
    return DiT(in_channels=4, sample_size=8, patch_size=2, hidden_size=32, depth=2, num_heads=2, num_classes=3,
               **options)


def test_the_default_dit_is_unchanged_by_the_options() -> None:
    plain = small_dit()
    assert plain.config.norm == "layernorm" and not plain.config.rope
    assert not any(".w13." in name or "q_norm" in name for name, _ in plain.named_parameters())


@pytest.mark.parametrize("option", [{"norm": "rmsnorm"}, {"qk_norm": True}, {"mlp": "swiglu"}, {"rope": True},
                                    LIGHTNING])
def test_block_options_start_at_zero_learn_and_round_trip(option: dict, tmp_path) -> None:
    torch.manual_seed(0)
    model = small_dit(**option)
    x, t, labels = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    assert torch.equal(model(x, t, labels), torch.zeros_like(x))  # adaLN-zero holds with every option
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        (model(x, t, labels) - x).square().mean().backward()
        optimizer.step()
    output = model(x, t, labels)
    assert output.abs().sum() > 0
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(DiT.from_pretrained(tmp_path)(x, t, labels), output, rtol=0, atol=0)


def test_swiglu_keeps_the_parameter_count() -> None:
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert abs(count(small_dit(mlp="swiglu")) / count(small_dit()) - 1) < 0.02


def test_rope_scores_depend_only_on_the_offset_between_tokens() -> None:
    from latentflow.models.dit import apply_rope, rope_2d_tables

    grid, dim = 4, 8
    cos, sin = rope_2d_tables(grid, dim)
    query, key = torch.randn(dim), torch.randn(dim)

    def score(q_at: tuple[int, int], k_at: tuple[int, int]) -> torch.Tensor:
        positions = torch.tensor([q_at[0] * grid + q_at[1], k_at[0] * grid + k_at[1]])
        rotated_q = apply_rope(query[None, None, None], cos[positions[:1]], sin[positions[:1]])
        rotated_k = apply_rope(key[None, None, None], cos[positions[1:]], sin[positions[1:]])
        return (rotated_q * rotated_k).sum()

    torch.testing.assert_close(score((0, 1), (2, 2)), score((1, 2), (3, 3)))  # the same offset (2, 1)
    torch.testing.assert_close(score((3, 0), (3, 0)), (query * key).sum())  # no offset: no rotation left
    assert not torch.allclose(score((0, 0), (0, 1)), score((0, 0), (1, 0)))  # rows and columns differ
    with pytest.raises(LatentflowError, match="divisible by 4"):
        rope_2d_tables(4, 6)


def test_unknown_block_options_list_the_choices() -> None:
    with pytest.raises(LatentflowError, match="layernorm or rmsnorm"):
        small_dit(norm="batchnorm")
    with pytest.raises(LatentflowError, match="gelu or swiglu"):
        small_dit(mlp="relu")


@pytest.mark.parametrize(("name", "settings", "message"), [
    ("dit", {"depth": 0}, "DiT depth must be an integer >= 1, got 0"),  # built, and trained, with no blocks
    ("dit", {"num_heads": 0}, "DiT num_heads must be an integer >= 1"),  # ZeroDivisionError
    ("dit", {"num_heads": -2}, "DiT num_heads must be an integer >= 1"),  # built
    ("dit", {"patch_size": 0}, "DiT patch_size must be an integer >= 1"),
    ("dit", {"hidden_size": 0}, "DiT hidden_size must be an integer >= 1"),
    ("dit", {"mlp_ratio": 0}, r"DiT mlp_ratio must be a number > 0"),  # built with an empty MLP
    ("dit", {"mlp_ratio": -1}, r"DiT mlp_ratio must be a number > 0"),  # torch's negative-dimension error
    ("unet", {"layers_per_block": 0}, "UNet layers_per_block must be an integer >= 1"),
    ("unet", {"attention_head_dim": 0}, "UNet attention_head_dim must be an integer >= 1"),
    ("unet", {"norm_num_groups": 0}, "UNet norm_num_groups must be an integer >= 1"),
    ("unet", {"block_out_channels": [30, 60], "attention_levels": [False, True]},
     r"UNet block_out_channels must be one or more integers divisible by norm_num_groups \(32\), got \[30, 60\]"),
    ("unet", {"block_out_channels": [], "attention_levels": []}, "UNet block_out_channels must be one or more"),
    ("unet", {"sample_size": 6}, r"UNet sample_size 6 is not divisible by 4 \(2 \*\* \(levels - 1\) for 3 levels\)"),
])
def test_impossible_model_settings_are_one_line_naming_the_setting(name: str, settings: dict, message: str) -> None:
    # each of these was a traceback from torch or diffusers (at construction or at the first forward) or a model
    # built without the part the setting names
    with pytest.raises(LatentflowError, match=message):
        make_model(name, **{"in_channels": 4, "sample_size": 8, **settings})


@pytest.mark.parametrize("option", [{}, LIGHTNING])
def test_fused_modulation_computes_the_same_dit(option: dict) -> None:
    """The addcmul form of adaLN modulate and gate: same weights, same outputs and gradients (fp32; bf16 autocast
    within bf16 rounding, the fused gate's product being kept in fp32)."""
    plain = randomize(small_dit(**option))
    fused = small_dit(**option, fused_modulation=True)
    fused.load_state_dict(plain.state_dict())
    x, t, labels = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    outputs = [model(x, t, labels) for model in (plain, fused)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for output in outputs:
        output.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = [model(x, t, labels).float() for model in (plain, fused)]
    torch.testing.assert_close(low[1], low[0], rtol=0.02, atol=0.02)
    bf16_error = [(output - outputs[0]).abs().max() for output in low]  # against the fp32 output
    assert bf16_error[1] <= 2 * bf16_error[0]  # the fused form is no less accurate than bf16 itself
    assert not plain.config.fused_modulation and fused.config.fused_modulation


def test_rmsnorm_matches_torch_and_runs_fused_under_bf16_autocast() -> None:
    import warnings

    from latentflow.models.dit import make_norm

    norm = make_norm("rmsnorm", 16, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    reference = torch.nn.RMSNorm(16, eps=1e-6)
    reference.load_state_dict(norm.state_dict())
    x = torch.randn(4, 16)
    assert torch.allclose(norm(x), reference(x), atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it cannot dispatch to the fused kernel
        out = norm(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), reference(x), atol=3e-2)
