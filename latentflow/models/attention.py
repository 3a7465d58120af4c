"""Softmax attention that also works under forward-mode automatic differentiation.

MeanFlow (Geng et al. 2025) regresses the network u on its identity u = v - (t - r) du/dt (Eq. 6), whose total
derivative du/dt = v d_x u + d_t u is one Jacobian-vector product, `torch.func.jvp`, through the whole backbone.
PyTorch's fused `F.scaled_dot_product_attention` has no forward-mode derivative on CPU (its flash kernel raises
NotImplementedError), so a DiT or U-Net could not be pushed through `jvp`.

`attention` keeps the ordinary path untouched: when no input carries a forward-mode tangent it calls
`F.scaled_dot_product_attention` directly, with its own kernel and native backward. Only when a tangent is
present (inside `torch.func.jvp` or a `torch.autograd.forward_ad.dual_level` with dual inputs) does it go
through `SoftmaxAttentionFunction`, whose forward still calls the fused kernel and whose `jvp` and `backward`
are the closed-form derivatives of softmax attention written in matmuls. The backward lets the primal output
of a `jvp` call be backpropagated to the parameters, as MeanFlow does with u while the tangent is detached.

`JVPAttnProcessor` does the same for the diffusers `Attention` blocks inside `UNet2DModel`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import nn

from latentflow.errors import LatentflowError


def has_forward_tangent(*tensors: torch.Tensor) -> bool:
    """Whether any tensor carries a forward-mode tangent at the current level.

    `torch.autograd.forward_ad.unpack_dual` is public and sees both kinds of tangent: the dual tensors of a
    `forward_ad.dual_level` and the tensors inside `torch.func.jvp` (which opens a dual level itself). Outside
    any dual level it returns at once (about half a microsecond per tensor), so the ordinary path pays nothing.
    """
    return any(forward_ad.unpack_dual(tensor).tangent is not None for tensor in tensors)


def nested_jvp_depth() -> int:
    """How many `torch.func.jvp` levels are open (2 or more: forward-over-forward, e.g. jacfwd(jacfwd(f))).

    torch has no public query for this, so it reads the private functorch interpreter stack; a torch without
    `get_interpreter_stack` answers 0, which only loses the nested case (see `attention`).
    """
    get_stack = getattr(torch._C._functorch, "get_interpreter_stack", None)
    jvp = getattr(getattr(torch._C._functorch, "TransformType", None), "Jvp", None)
    if get_stack is None or jvp is None:
        return 0
    return sum(interpreter.key() == jvp for interpreter in get_stack() or ())


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Softmax attention softmax(q k^T / sqrt(d)) v (Vaswani et al. 2017, Eq. 1), usable under `torch.func.jvp`.

    Three paths: no tangent on any input -> `F.scaled_dot_product_attention` (the ordinary path); one level of
    forward AD -> `SoftmaxAttentionFunction` (fused forward, closed-form jvp and backward); nested `torch.func.jvp`
    -> `math_attention`, because torch drops the second-order term of an `autograd.Function`'s jvp (its tangent
    would silently miss d(dO) under jvp-of-jvp) and because SDPA would see a tangent of an outer level only.
    While torch.compile traces, the fused call is taken at once, so the compiled ordinary path has no graph break.

    Args:
        query: (B, H, N, d).
        key: (B, H, M, d).
        value: (B, H, M, d_v).

    Returns:
        (B, H, N, d_v), the same as `F.scaled_dot_product_attention(query, key, value)` (no mask, no dropout).
    """
    if torch.compiler.is_compiling():
        return F.scaled_dot_product_attention(query, key, value)
    if nested_jvp_depth() > 1:
        return math_attention(query, key, value)
    if has_forward_tangent(query, key, value):
        return SoftmaxAttentionFunction.apply(query, key, value)
    return F.scaled_dot_product_attention(query, key, value)


def math_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v written out in matmuls (every torch transform, every order; N x N memory).

    Args:
        query: (B, H, N, d).
        key: (B, H, M, d).
        value: (B, H, M, d_v).

    Returns:
        (B, H, N, d_v).
    """
    return attention_probabilities(query, key) @ value


def attention_probabilities(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """P = softmax(q k^T / sqrt(d)), the softmax taken in at least float32.

    Args:
        query: (B, H, N, d).
        key: (B, H, M, d).

    Returns:
        (B, H, N, M) in the dtype of `query`; each row sums to one.
    """
    scores = query @ key.transpose(-2, -1) * _scale(query)  # (B, H, N, M)
    return torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)


def _scale(query: torch.Tensor) -> float:
    """SDPA's default scale 1/sqrt(d) for queries (..., d)."""
    return 1.0 / math.sqrt(query.shape[-1])


def attention_tangent(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    query_tangent: torch.Tensor | None, key_tangent: torch.Tensor | None, value_tangent: torch.Tensor | None,
) -> torch.Tensor:
    """Tangent dO of O = P v, P = softmax(S), S = scale q k^T, along (dq, dk, dv); None means a zero tangent.

    dS = scale (dq k^T + q dk^T); dP = P * (dS - rowsum(P * dS)) (the softmax Jacobian); dO = dP v + P dv.

    Args:
        query, key, value: (B, H, N, d), (B, H, M, d), (B, H, M, d_v).
        query_tangent, key_tangent, value_tangent: the same shapes, or None.

    Returns:
        (B, H, N, d_v).
    """
    probabilities = attention_probabilities(query, key)  # (B, H, N, M)
    terms = []
    score_tangent = _score_tangent(query, key, query_tangent, key_tangent)  # (B, H, N, M) or None
    if score_tangent is not None:
        weighted = probabilities * score_tangent  # P * dS
        probability_tangent = weighted - probabilities * weighted.sum(-1, keepdim=True)  # dP, (B, H, N, M)
        terms.append(probability_tangent @ value)  # (B, H, N, d_v)
    if value_tangent is not None:
        terms.append(probabilities @ value_tangent)  # (B, H, N, d_v)
    if not terms:
        return value.new_zeros(*query.shape[:-1], value.shape[-1])
    return sum(terms[1:], start=terms[0])


def _score_tangent(query: torch.Tensor, key: torch.Tensor, query_tangent: torch.Tensor | None,
                   key_tangent: torch.Tensor | None) -> torch.Tensor | None:
    """dS = scale (dq k^T + q dk^T), (B, H, N, M); None when both tangents are None."""
    parts = []
    if query_tangent is not None:
        parts.append(query_tangent @ key.transpose(-2, -1))
    if key_tangent is not None:
        parts.append(query @ key_tangent.transpose(-2, -1))
    if not parts:
        return None
    return sum(parts[1:], start=parts[0]) * _scale(query)


def attention_gradients(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor, out_grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of softmax attention O = softmax(scale q k^T) v given dL/dO.

    dv = P^T dO; dP = dO v^T; dS = P * (dP - rowsum(dO * O)); dq = scale dS k; dk = scale dS^T q.

    Args:
        query, key, value: (B, H, N, d), (B, H, M, d), (B, H, M, d_v).
        out: (B, H, N, d_v), the attention output O.
        out_grad: (B, H, N, d_v), dL/dO.

    Returns:
        dL/dq (B, H, N, d), dL/dk (B, H, M, d), dL/dv (B, H, M, d_v).
    """
    probabilities = attention_probabilities(query, key)  # (B, H, N, M)
    value_grad = probabilities.transpose(-2, -1) @ out_grad  # (B, H, M, d_v)
    probability_grad = out_grad @ value.transpose(-2, -1)  # (B, H, N, M)
    row_term = (out_grad * out).sum(-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP), (B, H, N, 1)
    score_grad = probabilities * (probability_grad - row_term) * _scale(query)  # scale dS, (B, H, N, M)
    return score_grad @ key, score_grad.transpose(-2, -1) @ query, value_grad


class SoftmaxAttentionFunction(torch.autograd.Function):
    """Fused SDPA forward with explicit forward-mode (`jvp`) and reverse-mode (`backward`) derivatives.

    Written in the `setup_context` style so `torch.func` transforms (jvp, grad, vmap) accept it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(query, key, value)  # (B, H, N, d_v)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        query, key, value = inputs
        ctx.save_for_backward(query, key, value, output)
        ctx.save_for_forward(query, key, value)

    @staticmethod
    def jvp(ctx: Any, query_tangent: torch.Tensor | None, key_tangent: torch.Tensor | None,
            value_tangent: torch.Tensor | None) -> torch.Tensor:
        query, key, value = ctx.saved_tensors[:3]
        return attention_tangent(query, key, value, query_tangent, key_tangent, value_tangent)

    @staticmethod
    def backward(ctx: Any, out_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        query, key, value, out = ctx.saved_tensors
        return attention_gradients(query, key, value, out, out_grad)


class JVPAttnProcessor:
    """A diffusers attention processor computing what `AttnProcessor2_0` computes for the self-attention blocks
    of `UNet2DModel` (optional group norm, heads, output projection, residual, rescale), through `attention`.

    Cross-attention, masks and spatial norms are not used by `UNet2DModel` and are refused.
    """

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 temb: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention of (B, C, H, W) or (B, N, C) hidden states; returns the same shape."""
        if encoder_hidden_states is not None or attention_mask is not None or attn.spatial_norm is not None:
            raise LatentflowError("JVPAttnProcessor does self-attention only (no encoder states, mask or spatial "
                                  "norm); use diffusers' AttnProcessor2_0 for such blocks")
        residual = hidden_states
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)  # (B, N=H*W, C)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)  # (B, N, C)
        out = self._heads_attention(attn, hidden_states)  # (B, N, inner)
        out = attn.to_out[1](attn.to_out[0](out))  # (B, N, C): projection, dropout
        if image_shape is not None:
            # contiguous: reshape returns a channels-last view here, and group_norm's forward-AD formula (in the
            # next ResNet block) calls view() on the tangent, which fails on that layout
            out = out.transpose(1, 2).reshape(image_shape).contiguous()  # (B, C, H, W)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    @staticmethod
    def _heads_attention(attn: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, N, heads * head_dim) through the query/key/value projections and `attention`."""
        batch = hidden_states.shape[0]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
                             for x in (query, key, value))  # 3 x (B, heads, N, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = attention(query, key, value)  # (B, heads, N, head_dim)
        return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)


def use_jvp_attention(model: nn.Module) -> int:
    """Give every diffusers `Attention` block of `model` a `JVPAttnProcessor` (processors are not saved state,
    so this belongs in the constructor). Returns how many blocks were set."""
    blocks = [module for module in model.modules() if hasattr(module, "set_processor")]
    for block in blocks:
        block.set_processor(JVPAttnProcessor())
    return len(blocks)
