"""UNet2DConditionModel (SD 1.x, 2.x and SDXL), built from the checkpoint's config.json."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import mlx.core as mx
import mlx.nn as nn

from ..configs import Count, config_from_dict, source_of
from ..errors import ModelFormatError
from . import activations
from .layers import Conv2d, Downsample2D, ResnetBlock2D, Upsample2D, attention, group_norm

SUPPORTED_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
SUPPORTED_UP = ("CrossAttnUpBlock2D", "UpBlock2D")


def _per_block(value: int | list[int], n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


@dataclass
class UNetConfig:
    in_channels: Count = 4
    out_channels: Count = 4
    block_out_channels: tuple[Count, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: Count | list[Count] = 2
    attention_head_dim: Count | list[Count] = 8
    num_attention_heads: Count | list[Count] | None = None
    cross_attention_dim: Count = 768
    transformer_layers_per_block: Count | list[Count] = 1
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: Count = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    addition_embed_type: str | None = None
    addition_time_embed_dim: Count | None = None
    projection_class_embeddings_input_dim: Count | None = None
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    time_cond_proj_dim: Count | None = None

    # Fields that hold one value per block when they are lists.
    PER_BLOCK: ClassVar[tuple[str, ...]] = ("down_block_types", "up_block_types", "layers_per_block",
                                            "attention_head_dim", "num_attention_heads",
                                            "transformer_layers_per_block")

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        config = config_from_dict(cls, d)
        n = len(config.block_out_channels)
        for name in cls.PER_BLOCK:
            value = getattr(config, name)
            if isinstance(value, (list, tuple)) and len(value) != n:
                raise ModelFormatError(f"{source_of(d, f'the {cls.__name__}')}: {name} has {len(value)} entries, "
                                       f"not one per block ({n}, as block_out_channels)")
        unsupported = [t for t in config.down_block_types if t not in SUPPORTED_DOWN]
        unsupported += [t for t in config.up_block_types if t not in SUPPORTED_UP]
        if config.mid_block_type != "UNetMidBlock2DCrossAttn":
            unsupported.append(config.mid_block_type)
        if config.addition_embed_type not in (None, "text_time"):
            unsupported.append(f"addition_embed_type={config.addition_embed_type}")
        if unsupported:
            raise ValueError(f"unsupported UNet parts: {', '.join(map(str, unsupported))}")
        return config

    @property
    def is_sdxl(self) -> bool:
        """SDXL conditions the UNet on the pooled text embedding and the image's size ("text_time")."""
        return self.addition_embed_type == "text_time"

    @property
    def heads(self) -> list[int]:
        # diffusers' historical naming: attention_head_dim holds the number of heads when
        # num_attention_heads is not given.
        n = len(self.block_out_channels)
        return _per_block(self.num_attention_heads or self.attention_head_dim, n)

    @property
    def layers(self) -> list[int]:
        """Resnet layers of each down block (the up blocks have one more)."""
        return _per_block(self.layers_per_block, len(self.block_out_channels))

    @property
    def depths(self) -> list[int]:
        """Transformer layers of each block's attentions."""
        return _per_block(self.transformer_layers_per_block, len(self.block_out_channels))


def timestep_embedding(t: mx.array, dim: int, flip_sin_to_cos: bool, shift: float) -> mx.array:
    """Sinusoidal embedding of (fractional) timesteps, computed in float32."""
    half = dim // 2
    exponent = -math.log(10000) * mx.arange(half, dtype=mx.float32) / (half - shift)
    args = t.astype(mx.float32)[:, None] * mx.exp(exponent)[None]
    sin, cos = mx.sin(args), mx.cos(args)
    return mx.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


def guidance_embedding(guidance_scale: mx.array, dim: int) -> mx.array:
    """LCM's sinusoidal embedding of (guidance_scale - 1), for UNets distilled with guidance built in."""
    half = dim // 2
    w = (guidance_scale.astype(mx.float32) - 1.0) * 1000.0
    args = w[:, None] * mx.exp(mx.arange(half, dtype=mx.float32) * -(math.log(10000.0) / (half - 1)))[None]
    emb = mx.concatenate([mx.sin(args), mx.cos(args)], axis=-1)
    return mx.pad(emb, [(0, 0), (0, dim % 2)])


class TimestepEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int, cond_dim: int | None = None):
        super().__init__()
        if cond_dim is not None:
            self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False)
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, condition: mx.array | None = None) -> mx.array:
        if condition is not None:
            x = x + self.cond_proj(condition)
        return self.linear_2(activations.silu(self.linear_1(x)))


# The text context as the UNet's cross-attentions take it: the (batch, tokens, dim) states, or a dict whose
# "keys_values" are their keys and values already projected (`UNetDownPath.project_context`). A denoising
# loop keeps one context for all its steps, so it projects it once instead of at every step: the same
# products, so the same result, without their cost per step (large beside the rest of a step at small sizes).
Context = mx.array | dict


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = [nn.Linear(dim, dim)]
        self.cross = context_dim is not None

    slot = -1  # a cross-attention's place in a projected context's keys_values (set by project_context)

    def __call__(self, x: mx.array, context: Context | None = None) -> mx.array:
        if isinstance(context, dict):
            k, v = context["keys_values"][self.slot]
        else:
            source = x if context is None else context
            k, v = self.to_k(source), self.to_v(source)
        return self.to_out[0](attention(self.to_q(x), k, v, self.heads, self.upcast))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def __call__(self, x: mx.array) -> mx.array:
        value, gate = mx.split(self.proj(x), 2, axis=-1)
        return activations.gated_gelu(value, gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = [GEGLU(dim, dim * 4), nn.Dropout(0.0), nn.Linear(dim * 4, dim)]

    def __call__(self, x: mx.array) -> mx.array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def __call__(self, x: mx.array, context: Context) -> mx.array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    def __init__(self, channels: int, heads: int, depth: int, config: UNetConfig):
        super().__init__()
        self.norm = group_norm(config.norm_num_groups, channels, 1e-6)
        # A 1x1 convolution on NHWC is a linear layer over channels; the loader squeezes conv weights.
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = [
            BasicTransformerBlock(channels, heads, config.cross_attention_dim, config.upcast_attention)
            for _ in range(depth)
        ]
        self.proj_out = nn.Linear(channels, channels)

    def __call__(self, x: mx.array, context: Context) -> mx.array:
        b, h, w, c = x.shape
        y = self.proj_in(self.norm(x).reshape(b, h * w, c))
        for block in self.transformer_blocks:
            y = block(y, context)
        return x + self.proj_out(y).reshape(b, h, w, c)


class UNetBlock(nn.Module):
    """A down or up block: resnets, optional cross-attention after each, optional resampler at the end."""

    def __init__(self, in_channels: list[int], out_channels: int, temb: int, config: UNetConfig,
                 heads: int | None, depth: int, resampler: nn.Module | None, kind: str):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = [ResnetBlock2D(c, out_channels, groups, eps, temb) for c in in_channels]
        if heads is not None:
            self.attentions = [Transformer2DModel(out_channels, heads, depth, config) for _ in in_channels]
        if resampler is not None:
            setattr(self, f"{kind}samplers", [resampler])


class UNetMidBlock(nn.Module):
    def __init__(self, channels: int, temb: int, heads: int, depth: int, config: UNetConfig):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = [ResnetBlock2D(channels, channels, groups, eps, temb) for _ in range(2)]
        self.attentions = [Transformer2DModel(channels, heads, depth, config)]

    def __call__(self, x: mx.array, temb: mx.array, context: Context) -> mx.array:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class UNetDownPath(nn.Module):
    """The UNet's first half: time embedding, input convolution, down blocks and mid block. The UNet adds
    its up path to it; a ControlNet is this half with a conditioning input and zero convolutions."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        channels = list(config.block_out_channels)
        n = len(channels)
        heads, layers, depths = config.heads, config.layers, config.depths
        temb = channels[0] * 4

        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb, config.time_cond_proj_dim)
        if config.is_sdxl:
            self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, temb)

        self.down_blocks = []
        prev = channels[0]
        for i, kind in enumerate(config.down_block_types):
            final = i == n - 1
            ins = [prev] + [channels[i]] * (layers[i] - 1)
            self.down_blocks.append(UNetBlock(
                ins, channels[i], temb, config, heads[i] if kind.startswith("CrossAttn") else None, depths[i],
                None if final else Downsample2D(channels[i]), "down"))
            prev = channels[i]

        self.mid_block = UNetMidBlock(channels[-1], temb, heads[-1], depths[-1], config)

    def time_embed(self, timesteps: mx.array, dtype: mx.Dtype, text_embeds: mx.array | None,
                   time_ids: mx.array | None, timestep_cond: mx.array | None = None) -> mx.array:
        c = self.config
        t_emb = timestep_embedding(timesteps, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        emb = self.time_embedding(t_emb.astype(dtype), None if timestep_cond is None else timestep_cond.astype(dtype))
        if "add_embedding" in self:
            b = time_ids.shape[0]
            ids = timestep_embedding(time_ids.reshape(-1), c.addition_time_embed_dim, c.flip_sin_to_cos,
                                     c.freq_shift).reshape(b, -1)
            emb = emb + self.add_embedding(mx.concatenate([text_embeds, ids.astype(text_embeds.dtype)], -1)
                                           .astype(dtype))
        return emb

    def project_context(self, context: mx.array) -> dict:
        """`context`'s keys and values for each cross-attention, as `Context` describes."""
        attentions = [m for _, m in self.named_modules() if isinstance(m, Attention) and m.cross]
        for slot, a in enumerate(attentions):
            a.slot = slot
        return {"keys_values": [(a.to_k(context), a.to_v(context)) for a in attentions]}

    def down(self, x: mx.array, temb: mx.array, context: Context) -> tuple[mx.array, list[mx.array]]:
        """The down blocks and the mid block on `x` (after conv_in): the mid block's output and the skips
        (conv_in's output, then each resnet's or attention's and each downsampler's)."""
        skips = [x]
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                x = resnet(x, temb)
                if "attentions" in block:
                    x = block.attentions[i](x, context)
                skips.append(x)
            if "downsamplers" in block:
                x = block.downsamplers[0](x)
                skips.append(x)
        return self.mid_block(x, temb, context), skips


class UNet2DConditionModel(UNetDownPath):
    def __init__(self, config: UNetConfig):
        super().__init__(config)
        channels = list(config.block_out_channels)
        n = len(channels)
        heads, layers, depths = config.heads, config.layers, config.depths
        temb = channels[0] * 4

        self.up_blocks = []
        rev_channels, rev_heads = channels[::-1], heads[::-1]
        rev_layers, rev_depths = layers[::-1], depths[::-1]
        prev = rev_channels[0]
        for i, kind in enumerate(config.up_block_types):
            final = i == n - 1
            out = rev_channels[i]
            skip_in = rev_channels[min(i + 1, n - 1)]
            count = rev_layers[i] + 1
            ins = [(prev if j == 0 else out) + (skip_in if j == count - 1 else out) for j in range(count)]
            self.up_blocks.append(UNetBlock(
                ins, out, temb, config, rev_heads[i] if kind.startswith("CrossAttn") else None, rev_depths[i],
                None if final else Upsample2D(out), "up"))
            prev = out

        self.conv_norm_out = group_norm(config.norm_num_groups, channels[0], config.norm_eps)
        self.conv_out = Conv2d(channels[0], config.out_channels, 3, padding=1)

    def __call__(self, x: mx.array, timesteps: mx.array, context: Context,
                 text_embeds: mx.array | None = None, time_ids: mx.array | None = None,
                 timestep_cond: mx.array | None = None, down_residuals: Sequence[mx.array] | None = None,
                 mid_residual: mx.array | None = None) -> mx.array:
        """x: NHWC latents; timesteps: (batch,) floats; context: (batch, tokens, dim), or projected (`Context`);
        SDXL's pooled text_embeds and time_ids; LCM's timestep_cond (the guidance embedding); a ControlNet's
        residuals, added to the skips (one per skip) and to the mid block's output."""
        temb = self.time_embed(mx.broadcast_to(timesteps, (x.shape[0],)), x.dtype, text_embeds, time_ids,
                               timestep_cond)
        x, skips = self.down(self.conv_in(x), temb, context)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"{len(down_residuals)} down-block residuals for a UNet with {len(skips)} skips")
            skips = [s + r for s, r in zip(skips, down_residuals, strict=True)]
        if mid_residual is not None:
            x = x + mid_residual

        for block in self.up_blocks:
            for i, resnet in enumerate(block.resnets):
                x = resnet(mx.concatenate([x, skips.pop()], axis=-1), temb)
                if "attentions" in block:
                    x = block.attentions[i](x, context)
            if "upsamplers" in block:
                # Upsample to the size of the next skip, which odd latent sizes need.
                x = block.upsamplers[0](x, skips[-1].shape[1:3])
        return self.conv_out(activations.silu(self.conv_norm_out(x)))
