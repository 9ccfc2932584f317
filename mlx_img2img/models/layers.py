"""Building blocks shared by the UNet and the VAE."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


class GroupNorm(nn.Module):
    """Group normalisation over NHWC with torch's channel grouping (what the checkpoints were trained with).

    Statistics are reduced in place over a (batch, pixels, groups, channels/group) view, in float32:
    no transposed copies (MLX's pytorch_compatible GroupNorm makes two), and half precision stays stable.
    """

    def __init__(self, groups: int, channels: int, eps: float):
        super().__init__()
        self.groups = groups
        self.eps = eps
        self.weight = mx.ones((channels,))
        self.bias = mx.zeros((channels,))

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        y = x.reshape(b, h * w, self.groups, c // self.groups).astype(mx.float32)
        mean = y.mean(axis=(1, 3), keepdims=True)
        var = mx.square(y - mean).mean(axis=(1, 3), keepdims=True)
        y = ((y - mean) * mx.rsqrt(var + self.eps)).reshape(b, h, w, c).astype(x.dtype)
        return y * self.weight + self.bias


def group_norm(groups: int, channels: int, eps: float) -> GroupNorm:
    return GroupNorm(groups, channels, eps)


# Attention scores are (batch, heads, queries, keys): 8.6 GB in float16 for SD 1.5 at 1024x1024 where
# the kernel materialises them (MLX's CPU backend; Metal for head sizes without a fused kernel). Queries
# are processed in chunks whose scores stay under this; each query's softmax is its own, so it is exact.
ATTENTION_CHUNK_BYTES = 1 << 28


def attention(q: mx.array, k: mx.array, v: mx.array, heads: int, upcast: bool = False) -> mx.array:
    """Multi-head attention over (batch, length, heads * dim) inputs, fused where MLX has it."""
    b, lq, inner = q.shape
    dim = inner // heads
    dtype = q.dtype
    q, k, v = (t.reshape(b, t.shape[1], heads, dim).transpose(0, 2, 1, 3) for t in (q, k, v))
    if upcast:  # diffusers' upcast_attention: softmax(QK^T) in float32 for half-precision models
        q, k, v = q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32)
    scores_bytes = b * heads * lq * k.shape[2] * q.dtype.size
    chunk = max(1, lq // -(-scores_bytes // ATTENTION_CHUNK_BYTES))
    scale = 1.0 / math.sqrt(dim)
    pieces = [mx.fast.scaled_dot_product_attention(q[:, :, i:i + chunk], k, v, scale=scale)
              for i in range(0, lq, chunk)]
    out = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=2)
    return out.astype(dtype).transpose(0, 2, 1, 3).reshape(b, lq, inner)


def upsample_nearest(x: mx.array, size: tuple[int, int] | None = None) -> mx.array:
    """Nearest-neighbour upsampling of NHWC `x`: by 2, or to `size` the way torch's interpolate picks pixels."""
    b, h, w, c = x.shape
    if size is None or tuple(size) == (2 * h, 2 * w):
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return x.reshape(b, 2 * h, 2 * w, c)
    rows = mx.array([math.floor(i * h / size[0]) for i in range(size[0])])
    cols = mx.array([math.floor(j * w / size[1]) for j in range(size[1])])
    return x[:, rows][:, :, cols]


# MLX's CPU convolution unfolds its input into kernel-size-squared copies (im2col) before one matrix
# product: 2.4 GB for a single 3x3 layer of a 512x512 VAE decode. Above this, bands of output rows are
# convolved one at a time instead; every output pixel is the same dot product, so the result is unchanged.
CONV_CHUNK_BYTES = 1 << 25


class Conv2d(nn.Conv2d):
    """nn.Conv2d that convolves large maps in bands of rows, bounding the unfolded input's memory.

    `eval_bands` evaluates each band as it is made: MLX allocates an operation's buffers when it queues
    it, so lazily queued bands are all alive at once. Only for modules run outside mx.compile (the VAE).
    """

    eval_bands = False

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        kh, kw = self.weight.shape[1:3]
        unfolded = b * h * w * c * kh * kw * x.dtype.size
        if kh == 1 or self.stride != (1, 1) or unfolded <= CONV_CHUNK_BYTES:
            return super().__call__(x)
        rows = max(1, h * CONV_CHUNK_BYTES // unfolded)
        pad_h, pad_w = self.padding
        h_out = h + 2 * pad_h - kh + 1
        bands = []
        for r in range(0, h_out, rows):
            lo, hi = r - pad_h, min(h_out, r + rows) - pad_h + kh - 1  # input rows this band reads
            band = x[:, max(lo, 0):min(hi, h)]
            if lo < 0 or hi > h:  # zero padding only where the band meets an edge: no padded copy of x
                band = mx.pad(band, [(0, 0), (max(-lo, 0), max(hi - h, 0)), (0, 0), (0, 0)])
            bands.append(mx.conv2d(band, self.weight, padding=(0, pad_w), dilation=self.dilation,
                                   groups=self.groups))
            if self.eval_bands:
                mx.eval(bands[-1])
        y = mx.concatenate(bands, axis=1)
        return y + self.bias if "bias" in self else y


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float,
                 temb_channels: int | None = None):
        super().__init__()
        self.norm1 = group_norm(groups, in_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = group_norm(groups, out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def __call__(self, x: mx.array, temb: mx.array | None = None) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(nn.silu(temb))[:, None, None, :]
        h = self.conv2(nn.silu(self.norm2(h)))
        shortcut = self.conv_shortcut(x) if "conv_shortcut" in self else x
        return shortcut + h


class Downsample2D(nn.Module):
    """Stride-2 convolution. The VAE pads only bottom/right (padding 0 + asymmetric pad), the UNet pads 1."""

    def __init__(self, channels: int, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def __call__(self, x: mx.array) -> mx.array:
        if self.asymmetric_pad:
            x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array, size: tuple[int, int] | None = None) -> mx.array:
        return self.conv(upsample_nearest(x, size))
