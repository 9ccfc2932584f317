"""AutoencoderKL encoder and decoder, built from the checkpoint's config.json."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..configs import Count, config_from_dict
from .layers import Conv2d, Downsample2D, ResnetBlock2D, Upsample2D, attention, group_norm, norm_silu


@dataclass
class VAEConfig:
    in_channels: Count = 3
    out_channels: Count = 3
    latent_channels: Count = 4
    block_out_channels: tuple[Count, ...] = (128, 256, 512, 512)
    layers_per_block: Count = 2
    norm_num_groups: Count = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        return config_from_dict(cls, d)

    @property
    def scale_factor(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.block_out_channels) - 1)


Layer = Callable[[mx.array], mx.array]


def in_turn(layers: list[Layer], x: mx.array) -> mx.array:
    """`x` through `layers` one after the other. Encoder and decoder run their blocks' layers through one
    loop, not block by block: a block's caller would hold the block's input while its later layers run
    (at 1024x1024 the decoder's last block gets a 1 GiB input, twice its other maps)."""
    for layer in layers:
        x = layer(x)
    return x


class VAEAttention(nn.Module):
    """Single-head self-attention over all pixels, with its own group norm and residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(groups, channels, 1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        y = self.group_norm(x).reshape(b, h * w, c)
        y = attention(self.to_q(y), self.to_k(y), self.to_v(y), heads=1)
        return x + self.to_out[0](y).reshape(b, h, w, c)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, groups, 1e-6) for _ in range(2)]
        if add_attention:
            self.attentions = [VAEAttention(channels, groups)]

    def layers(self) -> list[Layer]:
        return [self.resnets[0], *self.get("attentions", []), self.resnets[1]]

    def __call__(self, x: mx.array) -> mx.array:
        return in_turn(self.layers(), x)


class ResampleBlock(nn.Module):
    """DownEncoderBlock2D or UpDecoderBlock2D: resnets, then an optional down- or upsampler."""

    def __init__(self, in_channels: int, out_channels: int, count: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, 1e-6)
                        for i in range(count)]
        if resample == "down":
            self.downsamplers = [Downsample2D(out_channels, asymmetric_pad=True)]
        elif resample == "up":
            self.upsamplers = [Upsample2D(out_channels)]

    def layers(self) -> list[Layer]:
        return [*self.resnets, *self.get("downsamplers", []), *self.get("upsamplers", [])]

    def __call__(self, x: mx.array) -> mx.array:
        return in_turn(self.layers(), x)


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g, n = list(c.block_out_channels), c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = [
            ResampleBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, g, None if i == n - 1 else "down")
            for i in range(n)
        ]
        self.mid_block = MidBlock(ch[-1], g, c.mid_block_add_attention)
        self.conv_norm_out = group_norm(g, ch[-1], 1e-6)
        self.conv_out = Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        return in_turn([self.conv_in, *(layer for block in self.down_blocks for layer in block.layers()),
                        *self.mid_block.layers(), lambda x: self.conv_out(x, norm_silu(self.conv_norm_out, x))], x)


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, g, n = list(c.block_out_channels)[::-1], c.norm_num_groups, len(c.block_out_channels)
        self.conv_in = Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, c.mid_block_add_attention)
        self.up_blocks = [
            ResampleBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, g, None if i == n - 1 else "up")
            for i in range(n)
        ]
        self.conv_norm_out = group_norm(g, ch[-1], 1e-6)
        self.conv_out = Conv2d(ch[-1], c.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        return in_turn([self.conv_in, *self.mid_block.layers(),
                        *(layer for block in self.up_blocks for layer in block.layers()),
                        lambda x: self.conv_out(x, norm_silu(self.conv_norm_out, x))], z)


class AutoencoderKL(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent = config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = Conv2d(2 * latent, 2 * latent, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = Conv2d(latent, latent, 1)
        for conv in self._convolutions():  # the VAE runs eagerly: bound what is alive at once
            conv.eager = True

    def _convolutions(self) -> list[Conv2d]:
        return [m for _, m in self.named_modules() if isinstance(m, Conv2d)]

    def keep_kernel_transforms(self, keep: bool) -> None:
        """Whether the convolutions keep Winograd transforms of their kernels beside them, on the CPU (16/9
        of their weights' memory more), or make them at each call (slower, the same pixels)."""
        for conv in self._convolutions():
            conv.keep_kernel_transform = keep

    def encode(self, images: mx.array) -> tuple[mx.array, mx.array]:
        """NHWC images in [-1, 1] -> (mean, std) of the latent posterior, unscaled."""
        moments = self.encoder(images)
        if "quant_conv" in self:
            moments = self.quant_conv(moments)
        mean, logvar = mx.split(moments, 2, axis=-1)
        return mean, mx.exp(0.5 * mx.clip(logvar, -30.0, 20.0))

    def decode(self, latents: mx.array) -> mx.array:
        """Unscaled NHWC latents -> NHWC images in about [-1, 1]."""
        if "post_quant_conv" in self:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)
