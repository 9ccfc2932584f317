"""AutoencoderKL encoder and decoder, built from the checkpoint's config.json."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..configs import Count, config_from_dict
from .layers import Conv2d, Downsample2D, ResnetBlock2D, Upsample2D, attention, group_norm


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

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        if "attentions" in self:
            x = self.attentions[0](x)
        return self.resnets[1](x)


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

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        if "downsamplers" in self:
            x = self.downsamplers[0](x)
        if "upsamplers" in self:
            x = self.upsamplers[0](x)
        return x


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
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(self.mid_block(x))))


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
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


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
        for _, module in self.named_modules():  # the VAE runs eagerly: bound its convolutions' memory
            if isinstance(module, Conv2d):
                module.eval_bands = True

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
