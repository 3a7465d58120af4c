"""Attention under forward-mode AD: the fused path unchanged, jvp tangents and gradients against known answers
(finite differences, a matmul-softmax reference), through whole tiny DiTs and U-Nets."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from latentflow.errors import LatentflowError
from latentflow.models import attention as attention_module
from latentflow.models import load_model, make_model
from latentflow.models.attention import JVPAttnProcessor, SoftmaxAttentionFunction, attention

TINY_DIT = {"patch_size": 2, "hidden_size": 32, "depth": 2, "num_heads": 2}
LIGHTNING = {**TINY_DIT, "qk_norm": True, "rope": True, "norm": "rmsnorm", "mlp": "swiglu"}
TINY_UNET = {"block_out_channels": (32, 32), "attention_levels": (False, True), "layers_per_block": 1,
             "norm_num_groups": 8}
MODELS = {"dit": ("dit", TINY_DIT), "dit-lightning": ("dit", LIGHTNING), "unet": ("unet", TINY_UNET)}


def reference_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v with plain matmul and softmax (full forward and reverse AD)."""
    return torch.softmax(query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1]), dim=-1) @ value


def random_qkv(seed: int, dtype: torch.dtype = torch.float64, tokens: int = 5) -> tuple[torch.Tensor, ...]:
    """Three (2, 3, tokens, 4) tensors."""
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, tokens, 4, generator=generator, dtype=dtype) for _ in range(3))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def tiny_model(name: str, **settings) -> torch.nn.Module:
    """A tiny float64 model with every weight random (adaLN-zero would otherwise hide the attention)."""
    kind, preset = MODELS[name]
    torch.manual_seed(0)
    model = make_model(kind, in_channels=4, sample_size=8, num_classes=3, **{**preset, **settings}).double()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.1)
    return model


def model_inputs() -> tuple[torch.Tensor, ...]:
    """x, dx (2, 4, 8, 8), t, dt (2,) in float64, labels (2,); t and t +- h dt are exact in float32 for h=2^-k."""
    generator = torch.Generator().manual_seed(2)
    x, x_tangent = (torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    t, t_tangent = torch.tensor([0.25, 0.75], dtype=torch.float64), torch.tensor([1.0, -0.5], dtype=torch.float64)
    return x, x_tangent, t, t_tangent, torch.tensor([0, 2])


def central_difference(f: Callable[[float], torch.Tensor], step: float) -> torch.Tensor:
    """Fourth-order central difference of s -> f(s) at s = 0."""
    return (8 * (f(step) - f(-step)) - (f(2 * step) - f(-2 * step))) / (12 * step)


# (a) the ordinary path


@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_output_equals_sdpa_and_math(tokens: int) -> None:
    query, key, value = random_qkv(0, tokens=tokens)
    out = attention(query, key, value)
    assert torch.equal(out, F.scaled_dot_product_attention(query, key, value))
    torch.testing.assert_close(out, reference_attention(query, key, value), rtol=1e-12, atol=1e-12)


# (b) tangents


def test_jvp_tangent_equals_finite_differences_and_math_jvp() -> None:
    primals, tangents = random_qkv(0), random_qkv(1)
    out, tangent = torch.func.jvp(attention, primals, tangents)
    step = 1e-6
    plus = reference_attention(*(p + step * d for p, d in zip(primals, tangents)))
    minus = reference_attention(*(p - step * d for p, d in zip(primals, tangents)))
    assert relative_error(tangent, (plus - minus) / (2 * step)) < 1e-8
    reference_out, reference_tangent = torch.func.jvp(reference_attention, primals, tangents)
    torch.testing.assert_close(out, reference_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangent, reference_tangent, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("moving", [(0,), (1,), (2,), (0, 2)])
def test_jvp_with_some_inputs_fixed(moving: tuple[int, ...]) -> None:
    qkv, tangents = random_qkv(0), random_qkv(1)

    def partial(function: Callable) -> Callable:
        def with_fixed(*moved: torch.Tensor) -> torch.Tensor:
            inputs = list(qkv)
            for index, tensor in zip(moving, moved):
                inputs[index] = tensor
            return function(*inputs)
        return with_fixed

    primals, directions = tuple(qkv[i] for i in moving), tuple(tangents[i] for i in moving)
    _, tangent = torch.func.jvp(partial(attention), primals, directions)
    _, expected = torch.func.jvp(partial(reference_attention), primals, directions)
    torch.testing.assert_close(tangent, expected, rtol=1e-12, atol=1e-12)


def test_jvp_under_no_grad() -> None:
    primals, tangents = random_qkv(0), random_qkv(1)
    with torch.no_grad():
        out, tangent = torch.func.jvp(attention, primals, tangents)
    _, expected = torch.func.jvp(reference_attention, primals, tangents)
    assert out.grad_fn is None and tangent.grad_fn is None
    torch.testing.assert_close(tangent, expected, rtol=1e-12, atol=1e-12)


def test_forward_ad_dual_tensors() -> None:
    primals, tangents = random_qkv(0), random_qkv(1)
    with forward_ad.dual_level():
        out = attention(*(forward_ad.make_dual(p, d) for p, d in zip(primals, tangents)))
        tangent = forward_ad.unpack_dual(out).tangent
    _, expected = torch.func.jvp(reference_attention, primals, tangents)
    torch.testing.assert_close(tangent, expected, rtol=1e-12, atol=1e-12)


def test_float32_tangent_close_to_float64() -> None:
    primals, tangents = random_qkv(0, torch.float32), random_qkv(1, torch.float32)
    _, tangent = torch.func.jvp(attention, primals, tangents)
    _, expected = torch.func.jvp(reference_attention, tuple(p.double() for p in primals),
                                 tuple(d.double() for d in tangents))
    assert tangent.dtype == torch.float32
    torch.testing.assert_close(tangent.double(), expected, rtol=1e-5, atol=1e-5)


def test_nested_jvp_and_jacfwd_match_math() -> None:
    (query, key, value), (query_tangent, key_tangent, _) = random_qkv(0), random_qkv(1)

    def second_order(function: Callable) -> torch.Tensor:
        inner = lambda q: torch.func.jvp(lambda p: function(p, key, value), (q,), (query_tangent,))[1]
        return torch.func.jvp(inner, (query,), (key_tangent,))[1]

    torch.testing.assert_close(second_order(attention), second_order(reference_attention), rtol=1e-10, atol=1e-12)
    jacobian = torch.func.jacfwd(lambda q: attention(q, key, value))(query[:1, :1])
    expected = torch.func.jacfwd(lambda q: reference_attention(q, key, value))(query[:1, :1])
    torch.testing.assert_close(jacobian, expected, rtol=1e-10, atol=1e-12)


# (c) gradients through the primal output of a jvp


def test_gradients_through_jvp_primal_equal_autograd() -> None:
    primals = tuple(p.requires_grad_() for p in random_qkv(0))
    out, tangent = torch.func.jvp(attention, primals, random_qkv(1))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    loss = (weights * out).sum() + (out * tangent.detach()).sum()
    grads = torch.autograd.grad(loss, primals)
    reference_out = reference_attention(*primals)
    expected = torch.autograd.grad((weights * reference_out).sum() + (reference_out * tangent.detach()).sum(), primals)
    for grad, reference in zip(grads, expected):
        torch.testing.assert_close(grad, reference, rtol=1e-10, atol=1e-12)


def test_function_backward_passes_gradcheck() -> None:
    primals = tuple(p.requires_grad_() for p in random_qkv(0, tokens=3))
    assert torch.autograd.gradcheck(SoftmaxAttentionFunction.apply, primals)


# (d), (e) whole models


@pytest.mark.parametrize("name", list(MODELS))
def test_model_jvp_equals_finite_differences(name: str) -> None:
    # time_scale 1: the time embedding runs in float32, and at time_scale 1000 its rounding alone puts a 1e-3
    # floor under any finite difference along t; at 1 (with dyadic t and steps) the floor is ~1e-6
    model = tiny_model(name, time_scale=1.0)
    x, x_tangent, t, t_tangent, labels = model_inputs()
    f = lambda x_t, times: model(x_t, times, class_labels=labels)
    with torch.no_grad():
        _, tangent = torch.func.jvp(f, (x, t), (x_tangent, t_tangent))
        expected = central_difference(lambda s: f(x + s * x_tangent, t + s * t_tangent), 2.0**-7)
    assert relative_error(tangent, expected) < 1e-4


@pytest.mark.parametrize("name", list(MODELS))
def test_model_jvp_equals_math_attention_model(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model(name)
    x, x_tangent, t, t_tangent, labels = model_inputs()
    f = lambda x_t, times: model(x_t, times, class_labels=labels)
    out, tangent = torch.func.jvp(f, (x, t), (x_tangent, t_tangent))
    monkeypatch.setattr("latentflow.models.dit.attention", reference_attention)
    monkeypatch.setattr(attention_module, "attention", reference_attention)
    expected_out, expected_tangent = torch.func.jvp(f, (x, t), (x_tangent, t_tangent))
    torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tangent, expected_tangent, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(MODELS))
def test_parameter_gradients_through_model_jvp_primal(name: str) -> None:
    model = tiny_model(name)
    x, x_tangent, t, t_tangent, labels = model_inputs()
    out, _ = torch.func.jvp(lambda a, b: model(a, b, class_labels=labels), (x, t), (x_tangent, t_tangent))
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()), allow_unused=True)
    expected = torch.autograd.grad(model(x, t, class_labels=labels).square().sum(), list(model.parameters()),
                                   allow_unused=True)
    for grad, reference in zip(grads, expected):
        assert (grad is None) == (reference is None)
        if grad is not None:
            torch.testing.assert_close(grad, reference, rtol=1e-9, atol=1e-12)


# the U-Net processor


def test_unet_processor_matches_attn_processor_2_0() -> None:
    torch.manual_seed(0)
    model = make_model("unet", in_channels=4, sample_size=8, num_classes=3, **TINY_UNET)
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.1)
    processors = [m.processor for m in model.modules() if hasattr(m, "set_processor")]
    assert len(processors) == 4 and all(isinstance(p, JVPAttnProcessor) for p in processors)  # down, mid, 2 up
    x, _, t, _, labels = model_inputs()
    x, t = x.float(), t.float()
    with torch.no_grad():
        out = model(x, t, class_labels=labels)
        for module in model.modules():
            if hasattr(module, "set_processor"):
                module.set_processor(AttnProcessor2_0())
        expected = model(x, t, class_labels=labels)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_saved_unet_gets_the_processor_back(tmp_path) -> None:
    model = tiny_model("unet").float()
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert all(isinstance(m.processor, JVPAttnProcessor) for m in loaded.modules() if hasattr(m, "set_processor"))
    x, x_tangent, t, t_tangent, labels = (tensor.float() if tensor.is_floating_point() else tensor
                                          for tensor in model_inputs())
    f = lambda network: torch.func.jvp(lambda a, b: network(a, b, class_labels=labels), (x, t), (x_tangent, t_tangent))
    for value, expected in zip(f(loaded), f(model)):
        torch.testing.assert_close(value, expected, rtol=0, atol=0)


def test_processor_refuses_cross_attention() -> None:
    block = next(m for m in tiny_model("unet").modules() if hasattr(m, "set_processor"))
    hidden = torch.randn(1, 4, 32, dtype=torch.float64)
    with pytest.raises(LatentflowError, match="self-attention only"):
        block(hidden, encoder_hidden_states=hidden)


# (f) the ordinary path never enters the custom Function


@pytest.mark.parametrize("name", list(MODELS))
def test_ordinary_path_uses_fused_sdpa_only(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = SoftmaxAttentionFunction.apply
    monkeypatch.setattr(SoftmaxAttentionFunction, "apply", lambda *a: calls.append(1) or original(*a))
    model = tiny_model(name)
    x, x_tangent, t, t_tangent, labels = model_inputs()
    model(x, t, class_labels=labels).sum().backward()
    with torch.no_grad():
        model(x, t, class_labels=labels)
    assert calls == []
    torch.func.jvp(lambda a, b: model(a, b, class_labels=labels), (x, t), (x_tangent, t_tangent))
    assert calls


def test_ordinary_output_has_the_native_sdpa_backward() -> None:
    query, key, value = (p.requires_grad_() for p in random_qkv(0))
    grad_fn = attention(query, key, value).grad_fn
    assert grad_fn is not None and "ScaledDotProduct" in type(grad_fn).__name__
    assert type(grad_fn) is type(F.scaled_dot_product_attention(query, key, value).grad_fn)
