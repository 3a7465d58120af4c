"""A U-Net velocity field built on diffusers' `UNet2DModel`.

`UNet2DModel` embeds integer-like timesteps; our continuous t in [0, 1] is scaled by
`time_scale` (1000) first. Class conditioning uses the U-Net's own class embedding
table with one extra row: id `num_classes` is the null class for classifier-free
guidance, as in `DiT`.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from torch import nn

from latentflow.errors import LatentflowError, require_count
from latentflow.models.attention import use_jvp_attention
from latentflow.models.dit import TimestepEmbedder, broadcast_time


def _check_settings(in_channels: int, sample_size: int, block_out_channels: tuple[int, ...], layers_per_block: int,
                    attention_head_dim: int, norm_num_groups: int, num_classes: int) -> None:
    """Refuse U-Net settings that diffusers would turn into a traceback at construction or at the first forward."""
    for name, value in (("in_channels", in_channels), ("sample_size", sample_size),
                        ("layers_per_block", layers_per_block), ("attention_head_dim", attention_head_dim),
                        ("norm_num_groups", norm_num_groups)):
        require_count(f"UNet {name}", value, 1)
    require_count("UNet num_classes", num_classes, 0)
    channels = list(block_out_channels)
    if not channels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 or c % norm_num_groups
                           for c in channels):
        raise LatentflowError(f"UNet block_out_channels must be one or more integers divisible by norm_num_groups "
                              f"({norm_num_groups}), got {channels}")
    factor = 2 ** (len(channels) - 1)
    if sample_size % factor:
        raise LatentflowError(f"UNet sample_size {sample_size} is not divisible by {factor} (2 ** (levels - 1) for "
                              f"{len(channels)} levels); use fewer levels in block_out_channels or another "
                              f"resolution")


class UNet(ModelMixin, ConfigMixin):
    """U-Net predicting the velocity (or noise, for ddpm) of latents.

    Args:
        in_channels: latent channels C.
        sample_size: latent side h = w (divisible by 2**(levels-1)).
        block_out_channels: channels per resolution level.
        attention_levels: for each level, whether its blocks use self-attention.
        layers_per_block: ResNet blocks per level.
        attention_head_dim: channels per attention head.
        norm_num_groups: GroupNorm groups (must divide every entry of block_out_channels).
        num_classes: number of real classes; 0 means unconditional; id num_classes is null.
        time_scale: t in [0, 1] is multiplied by this before the sinusoidal embedding.
        flow_map: take a second time r >= t (a flow map's end time): an embedding of r - t, whose last layer
            starts at zero, is added to the U-Net's time embedding (through a forward hook on its
            `time_embedding`, so the wrapped `UNet2DModel` and its weight names stay as they are).
        interval_time_scale: r - t is multiplied by this before its sinusoidal embedding (None: `time_scale`, as
            flow maps made before it existed; the trainer gives new flow maps
            `latentflow.flow.flow_maps.INTERVAL_TIME_SCALE`).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        sample_size: int = 32,
        block_out_channels: tuple[int, ...] = (128, 256, 256),
        attention_levels: tuple[bool, ...] = (False, True, True),
        layers_per_block: int = 2,
        attention_head_dim: int = 32,
        norm_num_groups: int = 32,
        num_classes: int = 0,
        time_scale: float = 1000.0,
        flow_map: bool = False,
        interval_time_scale: float | None = None,
    ) -> None:
        super().__init__()
        _check_settings(in_channels, sample_size, block_out_channels, layers_per_block, attention_head_dim,
                        norm_num_groups, num_classes)
        if len(attention_levels) != len(block_out_channels):
            raise LatentflowError(
                f"UNet attention_levels {list(attention_levels)} must have one entry per block_out_channels "
                f"level {list(block_out_channels)}"
            )
        down = tuple("AttnDownBlock2D" if attn else "DownBlock2D" for attn in attention_levels)
        up = tuple("AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(attention_levels))
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=in_channels,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            num_class_embeds=num_classes + 1 if num_classes > 0 else None,
        )
        use_jvp_attention(self.unet)  # attention blocks that also work under torch.func.jvp
        self.interval_embedder = None
        self._interval_embedding: torch.Tensor | None = None  # set for the length of one forward call
        if flow_map:
            interval_scale = time_scale if interval_time_scale is None else interval_time_scale
            self.interval_embedder = TimestepEmbedder(block_out_channels[0] * 4, time_scale=interval_scale)
            nn.init.zeros_(self.interval_embedder.mlp[2].weight)
            nn.init.zeros_(self.interval_embedder.mlp[2].bias)
            self.unet.time_embedding.register_forward_hook(self._add_interval_embedding)

    def _add_interval_embedding(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output if self._interval_embedding is None else output + self._interval_embedding.to(output.dtype)

    def forward(
        self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None,
        r: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the velocity (noise for ddpm; a flow map's average velocity over [t, r]) at x_t.

        Args:
            x_t: (B, C, h, w) latents at time t.
            t: (B,) float times in [0, 1] (a scalar tensor is broadcast).
            class_labels: (B,) long in 0..num_classes, or None (the null class when conditional).
            r: (B,) end times r >= t of a flow map (None: r = t, the velocity); only for flow_map models.

        Returns:
            (B, C, h, w) prediction.
        """
        t = broadcast_time(t, x_t)  # (B,)
        if self.interval_embedder is None and r is not None:
            raise LatentflowError("this UNet is not a flow map (flow_map=False): call it without r")
        if self.interval_embedder is not None:
            interval = torch.zeros_like(t) if r is None else broadcast_time(r, x_t) - t  # (B,)
            self._interval_embedding = self.interval_embedder(interval)  # (B, 4 * block_out_channels[0])
        try:
            return self._unet_forward(x_t, t, class_labels)
        finally:
            self._interval_embedding = None

    def _unet_forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        labels = None
        if self.config.num_classes > 0:
            if class_labels is None:
                labels = torch.full((x_t.shape[0],), self.config.num_classes, dtype=torch.long, device=x_t.device)
            else:
                labels = class_labels.reshape(-1).to(device=x_t.device, dtype=torch.long)  # (B,)
        timesteps = t.float() * self.config.time_scale  # (B,)
        return self.unet(x_t, timesteps, class_labels=labels).sample  # (B, C, h, w)
