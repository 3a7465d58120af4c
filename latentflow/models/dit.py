"""Diffusion Transformer (DiT, Peebles & Xie 2023) as a velocity field on latents.

The network follows the paper's design: the latent is cut into p x p patches, each
patch becomes a token with a fixed 2D sine-cosine position embedding, and a stack of
transformer blocks is conditioned on the time and class embeddings through adaLN-zero
(per-block shift, scale and gate regressed from the conditioning vector, initialised
to zero so every block starts as the identity and the output starts at zero).

Time is our continuous t in [0, 1] (t=0 noise, t=1 data); the embedder scales it by
`time_scale` (1000) before the sinusoidal features so the frequencies match the
integer-timestep models it was designed for. Classes 0..num_classes-1 are real
labels; id `num_classes` is the null class used for classifier-free guidance.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from latentflow.errors import LatentflowError, require_count
from latentflow.models.attention import attention


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sine-cosine features of scalar values.

    Args:
        values: (B,) float tensor.
        dim: number of features (even or odd; an odd dim gets a zero pad).
        max_period: the longest wavelength.

    Returns:
        (B, dim) float32 features [cos | sin].
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    angles = values.float()[:, None] * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, 2*half)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def sincos_position_embedding_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding of a grid_size x grid_size token grid.

    Returns:
        (grid_size**2, dim) float32, row-major over (row, column).
    """
    if dim % 4:
        raise LatentflowError(f"DiT hidden_size must be divisible by 4 for 2D position embeddings, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    row_embedding = sinusoidal_embedding(rows.flatten(), dim // 2)  # (G*G, dim/2)
    col_embedding = sinusoidal_embedding(cols.flatten(), dim // 2)  # (G*G, dim/2)
    return torch.cat([col_embedding, row_embedding], dim=-1)  # (G*G, dim)


def broadcast_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Times as (B,) for a batch x (B, ...): a scalar or one-element tensor is repeated."""
    return t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """adaLN modulation x (1 + scale) + shift: x (B, N, D), shift/scale (B, D) -> (B, N, D).

    `fused`: one `torch.addcmul` (one pass over the tokens in eager mode instead of a multiply and an add).
    """
    if fused:
        return torch.addcmul(shift[:, None], x, 1 + scale[:, None])
    return x * (1 + scale[:, None]) + shift[:, None]


def gated_residual(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """adaLN-zero's gated residual x + gate * update: x and update (B, N, D), gate (B, D) -> (B, N, D).

    `fused`: one `torch.addcmul`, computed in the wider dtype of its inputs (under bf16 autocast the product is
    not rounded to bf16 before the fp32 residual add, as the unfused form's is).
    """
    if fused:
        return torch.addcmul(x, gate[:, None], update)
    return x + gate[:, None] * update


class TimestepEmbedder(nn.Module):
    """Continuous t in [0, 1] -> (B, hidden_size) through sinusoidal features and an MLP."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256, time_scale: float = 1000.0) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.time_scale = time_scale
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_embedding(t * self.time_scale, self.frequency_dim)  # (B, F)
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # (B, D)


def rope_2d_tables(grid_size: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of 2D rotary position embeddings (RoFormer, Su et al. 2021, Eq. 34, applied axially as
    in LightningDiT): the first half of each head's rotated pairs turns with the token's row, the second half
    with its column.

    Returns:
        cos, sin: (grid_size**2, head_dim) float32, row-major over (row, column).
    """
    if head_dim % 4:
        raise LatentflowError(f"DiT rope needs a head size divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    frequencies = base ** (-torch.arange(quarter, dtype=torch.float32) / quarter)  # (d/4,)
    coords = torch.arange(grid_size, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each
    angles = torch.cat([rows.flatten()[:, None] * frequencies, cols.flatten()[:, None] * frequencies], -1)  # (N, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (N, d): pairs (i, i + d/2) share an angle
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, N, d) queries or keys by the position tables (N, d): pairs (i, i + d/2) turn together."""
    first, second = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-second, first], dim=-1) * sin.to(x.dtype)


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm whose scale takes the input's dtype, so that under bf16 autocast the fused kernel runs (torch's
    own falls back to the unfused one, with a warning, when a bf16 input meets a float32 weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


def make_norm(kind: str, size: int, affine: bool = False) -> nn.Module:
    """'layernorm' (DiT) or 'rmsnorm' (LightningDiT) over the last dimension."""
    if kind == "layernorm":
        return nn.LayerNorm(size, elementwise_affine=affine, eps=1e-6)
    if kind == "rmsnorm":
        return RMSNorm(size, elementwise_affine=affine, eps=1e-6)
    raise LatentflowError(f"DiT norm {kind!r} unknown; choose layernorm or rmsnorm")


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention`, optionally with RMS-normalised queries
    and keys (QK-norm) and 2D rotary position embeddings."""

    def __init__(self, hidden_size: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise LatentflowError(f"DiT hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        head_dim = hidden_size // num_heads
        self.q_norm = make_norm("rmsnorm", head_dim, affine=True) if qk_norm else nn.Identity()
        self.k_norm = make_norm("rmsnorm", head_dim, affine=True) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        batch, tokens, dim = x.shape  # (B, N, D)
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)  # (B, N, 3, H, D/H)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, D/H)
        query, key = self.q_norm(query), self.k_norm(key)
        if rope is not None:
            query, key = apply_rope(query, *rope), apply_rope(key, *rope)
        out = attention(query, key, value)  # (B, H, N, D/H)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))  # (B, N, D)


class SwiGLU(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020, Eq. 6): w2(silu(w1 x) * w3 x), hidden width 2/3 of the GELU MLP's so
    the parameter count matches."""

    def __init__(self, hidden_size: int, mlp_hidden: int) -> None:
        super().__init__()
        width = int(2 * mlp_hidden / 3)
        self.w13 = nn.Linear(hidden_size, 2 * width)
        self.w2 = nn.Linear(width, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w13(x).chunk(2, dim=-1)  # (B, N, W) each
        return self.w2(F.silu(gate) * value)  # (B, N, D)


def make_mlp(kind: str, hidden_size: int, mlp_hidden: int) -> nn.Module:
    """'gelu' (DiT) or 'swiglu' (LightningDiT)."""
    if kind == "gelu":
        return nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                             nn.Linear(mlp_hidden, hidden_size))
    if kind == "swiglu":
        return SwiGLU(hidden_size, mlp_hidden)
    raise LatentflowError(f"DiT mlp {kind!r} unknown; choose gelu or swiglu")


class DiTBlock(nn.Module):
    """A transformer block with adaLN-zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, norm: str = "layernorm",
                 qk_norm: bool = False, mlp: str = "gelu", fused_modulation: bool = False) -> None:
        super().__init__()
        self.fused_modulation = fused_modulation
        self.norm1 = make_norm(norm, hidden_size)
        self.attn = Attention(hidden_size, num_heads, qk_norm)
        self.norm2 = make_norm(norm, hidden_size)
        self.mlp = make_mlp(mlp, hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, condition: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        # x (B, N, D), condition (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(condition).chunk(6, -1)
        fused = self.fused_modulation
        attended = self.attn(modulate(self.norm1(x), shift_msa, scale_msa, fused), rope)  # (B, N, D)
        x = gated_residual(x, gate_msa, attended, fused)  # (B, N, D)
        x = gated_residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp, fused)), fused)
        return x  # (B, N, D)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, fused_modulation: bool = False) -> None:
        super().__init__()
        self.fused_modulation = fused_modulation
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(condition).chunk(2, dim=-1)  # (B, D) each
        return self.linear(modulate(self.norm(x), shift, scale, self.fused_modulation))  # (B, N, p*p*C)


class DiT(ModelMixin, ConfigMixin):
    """Diffusion Transformer predicting the velocity (or noise, for ddpm) of latents.

    Args:
        in_channels: latent channels C.
        sample_size: latent side h = w (must be divisible by patch_size).
        patch_size: side p of the square patches.
        hidden_size: token width D.
        depth: number of transformer blocks.
        num_heads: attention heads (must divide hidden_size).
        mlp_ratio: MLP width as a multiple of hidden_size.
        num_classes: number of real classes; 0 means unconditional. Class id `num_classes`
            is the null class for classifier-free guidance.
        time_scale: t in [0, 1] is multiplied by this before the sinusoidal embedding.
        norm: 'layernorm' (DiT) or 'rmsnorm' in the blocks (LightningDiT's options, Yao et al. 2025, which
            report faster convergence; all four are off by default, which is the DiT of Peebles & Xie).
        qk_norm: RMS-normalise queries and keys per head.
        mlp: 'gelu' or 'swiglu'.
        rope: 2D rotary position embeddings on queries and keys (besides the fixed sine-cosine ones).
        flow_map: take a second time r >= t (a flow map's end time, `latentflow.flow.flow_maps`): an embedding of
            r - t is added to the time embedding. Its last layer starts at zero, so a flow map made from a plain
            model's weights starts as that model's velocity field for every r.
        interval_time_scale: r - t is multiplied by this before its sinusoidal embedding (None: `time_scale`, as
            flow maps made before it existed; the trainer gives new flow maps
            `latentflow.flow.flow_maps.INTERVAL_TIME_SCALE`).
        fused_modulation: write each adaLN modulation and gated residual as one `torch.addcmul` (fewer passes over
            the tokens in eager mode; torch.compile fuses either form). Same weights, same function up to
            rounding; off by default (`benchmarks/dit_profile.py` compares both).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        sample_size: int = 32,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        time_scale: float = 1000.0,
        norm: str = "layernorm",
        qk_norm: bool = False,
        mlp: str = "gelu",
        rope: bool = False,
        flow_map: bool = False,
        fused_modulation: bool = False,
        interval_time_scale: float | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("sample_size", sample_size), ("patch_size", patch_size),
                            ("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads)):
            require_count(f"DiT {name}", value, 1)
        require_count("DiT num_classes", num_classes, 0)
        if not (isinstance(mlp_ratio, numbers.Real) and math.isfinite(mlp_ratio) and hidden_size * mlp_ratio >= 1):
            raise LatentflowError(f"DiT mlp_ratio must be a number > 0 (hidden_size x mlp_ratio >= 1), got "
                                  f"{mlp_ratio!r}")
        if sample_size % patch_size:
            raise LatentflowError(f"DiT sample_size {sample_size} is not divisible by patch_size {patch_size}")
        self.grid_size = sample_size // patch_size
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale)
        interval_scale = time_scale if interval_time_scale is None else interval_time_scale
        self.interval_embedder = TimestepEmbedder(hidden_size, time_scale=interval_scale) if flow_map else None
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size) if num_classes > 0 else None
        self.register_buffer(
            "pos_embed", sincos_position_embedding_2d(hidden_size, self.grid_size)[None], persistent=False
        )  # (1, N, D)
        if rope:
            cos, sin = rope_2d_tables(self.grid_size, hidden_size // num_heads)
            self.register_buffer("rope_cos", cos, persistent=False)  # (N, D/H)
            self.register_buffer("rope_sin", sin, persistent=False)  # (N, D/H)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, norm, qk_norm, mlp, fused_modulation)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, fused_modulation)
        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier linears, small embeddings, and zeroed adaLN/output layers (adaLN-zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        weight = self.x_embedder.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        if self.interval_embedder is not None:
            nn.init.normal_(self.interval_embedder.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.interval_embedder.mlp[2].weight)  # starts as the plain field for every r
        for block in [*self.blocks, self.final_layer]:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) tokens -> (B, C, h, w) latents."""
        p, g, c = self.config.patch_size, self.grid_size, self.config.in_channels
        x = tokens.reshape(tokens.shape[0], g, g, p, p, c)  # (B, g, g, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (B, C, g, p, g, p)
        return x.reshape(tokens.shape[0], c, g * p, g * p)  # (B, C, h, w)

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
        r: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the velocity (noise for ddpm; a flow map's average velocity over [t, r]) at x_t.

        Args:
            x_t: (B, C, h, w) latents on the path at time t.
            t: (B,) float times in [0, 1] (a scalar tensor is broadcast).
            class_labels: (B,) long in 0..num_classes (num_classes = null), or None
                (the null class when the model is class-conditional).
            r: (B,) end times r >= t of a flow map (None: r = t, the velocity); only for flow_map models.

        Returns:
            (B, C, h, w) prediction.
        """
        t = broadcast_time(t, x_t)  # (B,)
        x = self.x_embedder(x_t).flatten(2).transpose(1, 2) + self.pos_embed.to(x_t.dtype)  # (B, N, D)
        condition = self.t_embedder(t)  # (B, D)
        if self.interval_embedder is not None:
            interval = torch.zeros_like(t) if r is None else broadcast_time(r, x_t) - t  # (B,)
            condition = condition + self.interval_embedder(interval)  # (B, D)
        elif r is not None:
            raise LatentflowError("this DiT is not a flow map (flow_map=False): call it without r")
        if self.y_embedder is not None:
            condition = condition + self.y_embedder(self._labels_or_null(class_labels, x_t))  # (B, D)
        rope = (self.rope_cos, self.rope_sin) if self.config.rope else None
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(block, x, condition, rope)  # (B, N, D)
            else:
                x = block(x, condition, rope)  # (B, N, D)
        return self.unpatchify(self.final_layer(x, condition))  # (B, C, h, w)

    def _labels_or_null(self, class_labels: torch.Tensor | None, x_t: torch.Tensor) -> torch.Tensor:
        """(B,) labels, the null class when `class_labels` is None."""
        if class_labels is None:
            return torch.full((x_t.shape[0],), self.config.num_classes, dtype=torch.long, device=x_t.device)
        return class_labels.reshape(-1).to(device=x_t.device, dtype=torch.long)
