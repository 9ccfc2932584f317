"""The tiny autoencoder's decoder (TAESD, TAESDXL: diffusers' AutoencoderTiny layout), for live previews.

It decodes the UNet's (scaled) latents straight to an image of full size at a small fraction of the VAE's
cost: latents are soft-clamped (tanh), then convolutions, ReLU blocks with a residual and nearest
upsamplings, and the output is moved from [0, 1] to [-1, 1] as diffusers' AutoencoderTiny.decode does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..configs import Count, config_from_dict
from .layers import Conv2d, upsample_nearest


@dataclass
class TinyAutoencoderConfig:
    out_channels: Count = 3
    latent_channels: Count = 4
    decoder_block_out_channels: tuple[Count, ...] = (64, 64, 64, 64)
    num_decoder_blocks: tuple[Count, ...] = (3, 3, 3, 1)
    upsampling_scaling_factor: Count = 2
    latent_magnitude: float = 3.0

    @classmethod
    def from_dict(cls, d: dict) -> TinyAutoencoderConfig:
        config = config_from_dict(cls, d)
        if len(config.num_decoder_blocks) != len(config.decoder_block_out_channels):
            raise ValueError("num_decoder_blocks and decoder_block_out_channels must have the same length")
        if config.upsampling_scaling_factor != 2 or d.get("upsample_fn", "nearest") != "nearest" or d.get(
                "act_fn", "relu") != "relu":
            raise ValueError("only AutoencoderTiny's nearest x2 upsampling with ReLU is supported")
        return config


class _Block(nn.Module):
    """Three 3x3 convolutions with ReLUs between, plus the input (through a 1x1 convolution when the
    channels change), then ReLU."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv = [Conv2d(channels_in, channels_out, 3, padding=1), nn.ReLU(),
                     Conv2d(channels_out, channels_out, 3, padding=1), nn.ReLU(),
                     Conv2d(channels_out, channels_out, 3, padding=1)]
        if channels_in != channels_out:
            self.skip = nn.Conv2d(channels_in, channels_out, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        y = x
        for layer in self.conv:
            y = layer(y)
        return nn.relu(y + (self.skip(x) if "skip" in self else x))


class _Upsample(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return upsample_nearest(x)


class TinyDecoder(nn.Module):
    """NHWC latents -> NHWC images in [-1, 1]. `layers` is indexed as diffusers' DecoderTiny.layers, so the
    checkpoint's keys load as they are."""

    def __init__(self, config: TinyAutoencoderConfig):
        super().__init__()
        self.config = config
        channels = config.decoder_block_out_channels
        # the VAE's banded convolution: at full size an unbanded 3x3 layer unfolds hundreds of MB (and is slower)
        layers: list[nn.Module] = [Conv2d(config.latent_channels, channels[0], 3, padding=1), nn.ReLU()]
        for i, (width, blocks) in enumerate(zip(channels, config.num_decoder_blocks, strict=True)):
            last = i == len(channels) - 1
            layers += [_Block(width, width) for _ in range(blocks)]
            if not last:
                layers.append(_Upsample())
            layers.append(Conv2d(width, config.out_channels if last else width, 3, padding=1, bias=last))
        self.layers = layers

    def __call__(self, latents: mx.array) -> mx.array:
        m = self.config.latent_magnitude
        x = mx.tanh(latents / m) * m
        for layer in self.layers:
            x = layer(x)
        return x * 2 - 1


def load_tiny_decoder(folder: str | Path, dtype: mx.Dtype = mx.float32) -> TinyDecoder:
    """The decoder of an AutoencoderTiny folder (config.json and safetensors weights)."""
    from ..loading import load_module
    from ..loading.folder import load_weights
    from ..weights import read_json

    folder = Path(folder)
    decoder = TinyDecoder(TinyAutoencoderConfig.from_dict(read_json(folder / "config.json")))
    weights = {k.removeprefix("decoder."): v for k, v in load_weights(folder, dtype).items()
               if k.startswith("decoder.")}
    load_module(decoder, weights, f"{folder}/decoder")
    decoder.eval()
    return decoder
