"""ControlNetModel (SD 1.x/2.x and SDXL), built from its diffusers config.json.

A ControlNet is the UNet's down path and mid block (the same block classes, `UNetDownPath`) with a
small convolutional embedding of the control image added after the input convolution, and a "zero
convolution" (1x1) on each skip and on the mid block's output: those are the residuals the UNet adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..configs import Count, source_of
from ..errors import ModelFormatError
from . import activations
from .layers import Conv2d
from .unet import Context, UNetConfig, UNetDownPath

CHANNEL_ORDERS = ("rgb", "bgr")


@dataclass
class ControlNetConfig(UNetConfig):
    conditioning_channels: Count = 3
    conditioning_embedding_out_channels: tuple[Count, ...] = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"
    global_pool_conditions: bool = False  # residuals averaged over the image (e.g. the shuffle ControlNet)

    # A ControlNet has no up path: its config has no up_block_types (the UNet default is not checked).
    PER_BLOCK: ClassVar[tuple[str, ...]] = tuple(n for n in UNetConfig.PER_BLOCK if n != "up_block_types")

    @classmethod
    def from_dict(cls, d: dict) -> ControlNetConfig:
        config = super().from_dict(d)
        if config.controlnet_conditioning_channel_order not in CHANNEL_ORDERS:
            raise ModelFormatError(f"{source_of(d, 'the ControlNet config')}: controlnet_conditioning_channel_order "
                                   f"must be one of {', '.join(CHANNEL_ORDERS)}")
        if config.time_cond_proj_dim is not None:
            raise ModelFormatError(f"{source_of(d, 'the ControlNet config')}: time_cond_proj_dim is not a "
                                   "ControlNet field")
        return config


class ConditioningEmbedding(nn.Module):
    """The control image (NHWC, in [0, 1]) down to the latents' size and the UNet's first channels."""

    def __init__(self, in_channels: int, channels: tuple[int, ...], out_channels: int):
        super().__init__()
        self.conv_in = Conv2d(in_channels, channels[0], 3, padding=1)
        self.blocks = []
        for a, b in zip(channels[:-1], channels[1:], strict=True):
            self.blocks += [Conv2d(a, a, 3, padding=1), Conv2d(a, b, 3, padding=1, stride=2)]
        self.conv_out = Conv2d(channels[-1], out_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = activations.silu(self.conv_in(x))
        for block in self.blocks:
            x = activations.silu(block(x))
        return self.conv_out(x)


class ControlNetModel(UNetDownPath):
    def __init__(self, config: ControlNetConfig):
        super().__init__(config)
        channels = list(config.block_out_channels)
        layers = config.layers
        self.controlnet_cond_embedding = ConditioningEmbedding(
            config.conditioning_channels, tuple(config.conditioning_embedding_out_channels), channels[0])
        # One zero convolution per skip of the down path (a 1x1 convolution is a linear layer over channels).
        skips = [channels[0]]
        for i, c in enumerate(channels):
            skips += [c] * (layers[i] + (i < len(channels) - 1))
        self.controlnet_down_blocks = [nn.Linear(c, c) for c in skips]
        self.controlnet_mid_block = nn.Linear(channels[-1], channels[-1])

    def embed(self, control: mx.array, dtype: mx.Dtype) -> mx.array:
        """The control image's conditioning embedding (control: NHWC in [0, 1], of the image's size). It
        depends on the image only, not on the step: a run computes it once and hands it to every step."""
        if self.config.controlnet_conditioning_channel_order == "bgr":
            control = control[..., ::-1]
        return self.controlnet_cond_embedding(control.astype(dtype))

    def __call__(self, x: mx.array, timesteps: mx.array, context: Context, embedding: mx.array,
                 text_embeds: mx.array | None = None, time_ids: mx.array | None = None,
                 scale: float = 1.0, guess_mode: bool = False) -> tuple[list[mx.array], mx.array]:
        """The residuals for the UNet (one per skip, and the mid block's) at conditioning `scale`. x: the
        UNet's scaled NHWC input; context: the text states or their projection (`project_context`);
        embedding: `embed(control image)`, of x's batch or of batch 1 (the same control for every sample).
        In `guess_mode` the residuals grow from 0.1x (the first skip) to 1x (mid), as diffusers'."""
        config = self.config
        temb = self.time_embed(mx.broadcast_to(timesteps, (x.shape[0],)), x.dtype, text_embeds, time_ids)
        x = self.conv_in(x) + embedding
        x, skips = self.down(x, temb, context)
        down = [zero(s) for zero, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(x)
        if guess_mode and not config.global_pool_conditions:
            scales = [float(s) * scale for s in np.logspace(-1, 0, len(down) + 1, dtype=np.float32)]
        else:
            scales = [scale] * (len(down) + 1)
        if scales != [1.0] * len(scales):  # (x * 1.0 is x: no pass over the residuals for it)
            down = [d * s for d, s in zip(down, scales, strict=False)]
            mid = mid * scales[-1]
        if config.global_pool_conditions:
            down = [d.mean(axis=(1, 2), keepdims=True) for d in down]
            mid = mid.mean(axis=(1, 2), keepdims=True)
        return down, mid
