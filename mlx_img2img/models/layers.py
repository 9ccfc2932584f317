"""Building blocks shared by the UNet and the VAE."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache, partial

import mlx.core as mx
import mlx.nn as nn

from .. import parallel
from . import activations


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
        return self.normalize(x, *self.statistics(x))

    def statistics(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Each (sample, group)'s float32 mean and 1/std over `x`."""
        b, h, w, c = x.shape
        y, count = self._grouped(x), h * w * (c // self.groups)
        # over the pixels first, then each group's channels: two reductions over contiguous axes, several
        # times faster on MLX's CPU backend than one over both axes at once
        mean = y.sum(axis=1, keepdims=True).sum(axis=3, keepdims=True) / count
        var = mx.square(y - mean).sum(axis=1, keepdims=True).sum(axis=3, keepdims=True) / count
        return mean, mx.rsqrt(var + self.eps)

    def normalize(self, x: mx.array, mean: mx.array, inv_std: mx.array) -> mx.array:
        """`x`, or any band of its rows, normalised with the statistics of the whole map (`statistics`)."""
        b, h, w, c = x.shape
        shape = (self.groups, c // self.groups)
        y = _normalizer(x.dtype, parallel.on_cpu())(x.reshape(b, h * w, *shape), mean, inv_std,
                                                    self.weight.reshape(shape), self.bias.reshape(shape))
        return y.reshape(b, h, w, c)

    def _grouped(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        return x.reshape(b, h * w, self.groups, c // self.groups).astype(mx.float32)


@cache
def _normalizer(dtype: mx.Dtype, compiled: bool) -> Callable[..., mx.array]:
    """GroupNorm's normalisation and affine over the grouped (batch, pixels, groups, channels/group) view,
    the output in `dtype` before the affine. Compiled (per shape) into one kernel on the CPU, where its four
    broadcasting operations were four passes over the map; the same operations either way."""
    def normalize(grouped: mx.array, mean: mx.array, inv_std: mx.array, weight: mx.array,
                  bias: mx.array) -> mx.array:
        return ((grouped.astype(mx.float32) - mean) * inv_std).astype(dtype) * weight + bias

    return mx.compile(normalize) if compiled else normalize


def group_norm(groups: int, channels: int, eps: float) -> GroupNorm:
    return GroupNorm(groups, channels, eps)


def norm_silu(norm: GroupNorm, x: mx.array) -> Callable[[mx.array], mx.array]:
    """silu(norm(.)) with the statistics of `x`, for `x` or any band of its rows: the prologue of a
    convolution (Conv2d), which applies it band by band instead of to a full-size copy of `x`."""
    mean, inv_std = norm.statistics(x)
    return lambda rows: activations.silu(norm.normalize(rows, mean, inv_std))


# Attention scores are (batch, heads, queries, keys): 8.6 GB in float16 for SD 1.5 at 1024x1024 where
# the kernel materialises them (Metal for head sizes without a fused kernel; the CPU has its own blocks,
# below). Queries are processed in chunks whose scores stay under this; each query's softmax is its own,
# so it is exact.
ATTENTION_CHUNK_BYTES = 1 << 28
# On the CPU, attention runs in blocks of (sample, head) pairs and queries whose float32 scores fit in about
# a core's share of the cache, each evaluated before the next is made: the products and the softmax's
# passes over a block then stay in the cache, where the whole scores streamed through memory (and MLX,
# left to itself, would schedule every block's scores at once). README, Performance.
CPU_ATTENTION_BLOCK_BYTES = 1 << 22


def scaled_dot_product_attention(q: mx.array, k: mx.array, v: mx.array, scale: float,
                                 causal: bool = False) -> mx.array:
    """softmax(q k^T * scale) v over (..., length, dim) inputs; `causal` hides the keys after each query (the
    queries being the last of the keys' positions). MLX's fused kernel, except on the CPU, where MLX computes
    the same products but its exponential one element at a time: there the softmax is activations.softmax
    (README, Performance)."""
    if not parallel.on_cpu():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if causal else None)
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if causal:
        n, m = scores.shape[-2:]
        hidden = mx.arange(m)[None, :] > mx.arange(m - n, m)[:, None]
        scores = mx.where(hidden, mx.array(-mx.inf, scores.dtype), scores)
    return activations.softmax(scores) @ v


def attention(q: mx.array, k: mx.array, v: mx.array, heads: int, upcast: bool = False) -> mx.array:
    """Multi-head attention over (batch, length, heads * dim) inputs, fused where MLX has it."""
    b, lq, inner = q.shape
    dim = inner // heads
    dtype = q.dtype
    q, k, v = (t.reshape(b, t.shape[1], heads, dim).transpose(0, 2, 1, 3) for t in (q, k, v))
    if upcast:  # diffusers' upcast_attention: softmax(QK^T) in float32 for half-precision models
        q, k, v = q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32)
    scale = 1.0 / math.sqrt(dim)
    if parallel.on_cpu():
        out = _cpu_attention(q, k, v, scale)
    else:
        scores_bytes = b * heads * lq * k.shape[2] * q.dtype.size
        chunk = max(1, lq // -(-scores_bytes // ATTENTION_CHUNK_BYTES))
        pieces = [scaled_dot_product_attention(q[:, :, i:i + chunk], k, v, scale) for i in range(0, lq, chunk)]
        out = pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=2)
    return out.astype(dtype).transpose(0, 2, 1, 3).reshape(b, lq, inner)


def _cpu_attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Attention over (batch, heads, length, dim) inputs in blocks of CPU_ATTENTION_BLOCK_BYTES of scores."""
    b, heads, lq, dim = q.shape
    q, k, v = (t.reshape(b * heads, t.shape[2], dim) for t in (q, k, v))
    row_bytes = k.shape[1] * 4
    queries = max(1, min(lq, CPU_ATTENTION_BLOCK_BYTES // row_bytes))
    pairs = max(1, min(b * heads, CPU_ATTENTION_BLOCK_BYTES // (row_bytes * queries)))
    if (queries, pairs) == (lq, b * heads):
        return scaled_dot_product_attention(q, k, v, scale).reshape(b, heads, lq, dim)
    rows = []
    for p in range(0, b * heads, pairs):
        blocks = []
        for i in range(0, lq, queries):
            blocks.append(scaled_dot_product_attention(q[p:p + pairs, i:i + queries], k[p:p + pairs],
                                                       v[p:p + pairs], scale))
            mx.eval(blocks[-1])
        rows.append(mx.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0])
    return (mx.concatenate(rows) if len(rows) > 1 else rows[0]).reshape(b, heads, lq, dim)


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
# convolved one at a time instead; every output pixel is the same sum (up to its rounding: the BLAS's order
# of summation, or where Winograd's blocks fall, can move the last bit; the same bands give the same result).
CONV_CHUNK_BYTES = 1 << 25

Padding = tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))

# MLX's CPU backend runs a stream's element-wise kernels on one thread, and in a VAE the convolutions'
# prologues (norms, SiLU), Winograd's additions and the copies take a large share beside the products
# (README, Performance: the bands still pay with the fused activations). The eager VAE (one image at a
# time: no batch to split) cuts a map from this size up into one band of output rows per core, evaluated
# together on parallel streams (parallel.evaluate_in_parts). By size and core count only, as every split.
BAND_SPLIT_MIN_PIXELS = 32 * 32


# Winograd's minimal filtering F(2x2, 3x3) computes each 2x2 block of a 3x3 convolution's output from a
# 4x4 block of its input with 16 products per channel pair instead of 36: 16 matrix products over the
# transformed blocks, with additions before and after (B^T d B, A^T m A). On the CPU, where the products are
# the time and MLX's own convolution also pays for unfolding its input, this is faster from maps of about
# 32x32 up and with enough input channels (fewer, and the additions cost more than the products save:
# README, Performance). In float32 it differs from the direct sum by rounding only (relative 1e-6); half
# precision would lose more, and GPUs are left to MLX's own kernels.
WINOGRAD_MIN_PIXELS = 32 * 32  # output pixels per sample
WINOGRAD_MIN_CHANNELS = 32


def _winograd_rows(d0: mx.array, d1: mx.array, d2: mx.array, d3: mx.array) -> tuple[mx.array, ...]:
    """B^T applied along one axis of a 4-row block, given as its four rows."""
    return d0 - d2, d1 + d2, d2 - d1, d1 - d3


def winograd_kernel(weight: mx.array) -> mx.array:
    """G g G^T of an (out, 3, 3, in) kernel: (16, out, in), row-major over the 4x4 transformed block."""
    def g(k0: mx.array, k1: mx.array, k2: mx.array) -> list[mx.array]:
        return [k0, (k0 + k1 + k2) * 0.5, (k0 - k1 + k2) * 0.5, k2]

    rows = g(weight[:, 0], weight[:, 1], weight[:, 2])  # each (out, 3, in)
    return mx.stack([v for r in rows for v in g(r[:, 0], r[:, 1], r[:, 2])])


def winograd_conv3x3(x: mx.array, kernel: mx.array, padding: Padding) -> mx.array:
    """The stride-1 3x3 convolution of NHWC `x` zero-padded by `padding`, given its `winograd_kernel`."""
    b, h, w, c = x.shape
    (top, bottom), (left, right) = padding
    h_out, w_out = h + top + bottom - 2, w + left + right - 2
    th, tw = -(-h_out // 2), -(-w_out // 2)  # output blocks; the last row/column of blocks may stick out
    xp = mx.pad(x, ((0, 0), (top, 2 * th + 2 - h - top), (left, 2 * tw + 2 - w - left), (0, 0)))
    m = []  # m[i][j]: the product for element (i, j) of every transformed block, (b, th, tw, out)
    for i, t in enumerate(_winograd_rows(*(xp[:, k:k + 2 * th:2] for k in range(4)))):
        blocks = _winograd_rows(*(t[:, :, k:k + 2 * tw:2] for k in range(4)))
        m.append([(v.reshape(-1, c) @ kernel[4 * i + j].T).reshape(b, th, tw, -1) for j, v in enumerate(blocks)])
    # A^T m A, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]: first over the block's rows, then its columns
    top_row = [m[0][j] + m[1][j] + m[2][j] for j in range(4)]
    bottom_row = [m[1][j] - m[2][j] - m[3][j] for j in range(4)]
    y = mx.zeros((b, 2 * th, 2 * tw, kernel.shape[1]), x.dtype)
    for i, r in enumerate((top_row, bottom_row)):
        y[:, i::2, 0::2] = r[0] + r[1] + r[2]
        y[:, i::2, 1::2] = r[1] - r[2] - r[3]
    return y if (2 * th, 2 * tw) == (h_out, w_out) else y[:, :h_out, :w_out]


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _rows(x: mx.array, lo: int, hi: int) -> mx.array:
    return x if lo == 0 and hi == x.shape[1] else x[:, lo:hi]


class Conv2d(nn.Conv2d):
    """nn.Conv2d that convolves large maps in bands of rows, bounding the unfolded input's memory.

    `eager` is for modules run outside mx.compile (the VAE), where what is alive at once is what counts:
    each band is evaluated as it is made and written into the output in place (MLX allocates an
    operation's buffers when it queues it, so lazily queued bands are all alive at once, and joining them
    copies them all); a prologue (`__call__`) is applied band by band, not to a full-size copy of the
    input; a large unbanded (strided) convolution is evaluated at once; and 1x1 kernels are one matrix
    product (MLX's 1x1 convolution copies its input twice). Every output value is computed as without it,
    bit for bit.
    """

    eager = False
    keep_kernel_transform = True  # False: Winograd's kernel transform is made at each call, not kept (low memory)

    def settles(self, x: mx.array) -> bool:
        """Whether work on a map like `x` is evaluated at once (eager, and above the banding threshold for
        a same-size kernel): left lazy, it would pile up with the next layer's work, its inputs alive."""
        kh, kw = self.weight.shape[1:3]
        return self.eager and x.nbytes * kh * kw > CONV_CHUNK_BYTES

    def winograd_fits(self, channels: int, out_pixels: int, dtype: mx.Dtype) -> bool:
        """Whether this convolution of a `channels`-channel map into `out_pixels` output pixels (per sample)
        runs as Winograd's F(2x2, 3x3): a plain 3x3 kernel, float32, on the CPU, above the size where it pays,
        in an eager module (the VAE). Not in the UNet: when its guidance halves ran on parallel streams the
        whole call was slower with it, though each convolution alone was faster, and at 32x32 latents only
        its top level's maps are that large (README, Performance)."""
        kh, kw = self.weight.shape[1:3]
        plain = kh == kw == 3 and self.stride == (1, 1) and _pair(self.dilation) == (1, 1) and self.groups == 1
        return (self.eager and plain and dtype == self.weight.dtype == mx.float32
                and channels >= WINOGRAD_MIN_CHANNELS and out_pixels >= WINOGRAD_MIN_PIXELS
                and parallel.on_cpu())

    def winograd_weight(self) -> mx.array:
        """The kernel's Winograd transform, made once per weight array (a LoRA merge or a load gives a new
        one) and kept beside the module, not as a parameter: it is never saved, loaded or counted as one.
        Made the same way at each call where it is not kept, so the pixels are the same either way."""
        if not self.keep_kernel_transform:
            self.__dict__.pop("_winograd", None)
            return winograd_kernel(self.weight)
        cached = self.__dict__.get("_winograd")
        if cached is None or cached[0] is not self.weight:
            cached = (self.weight, winograd_kernel(self.weight))
            object.__setattr__(self, "_winograd", cached)  # nn.Module would file a tuple among its children
        return cached[1]

    def __call__(self, x: mx.array, prologue: Callable[[mx.array], mx.array] | None = None,
                 padding: Padding | None = None) -> mx.array:
        """The convolution of `prologue(x)`, zero-padded by `padding` (default the module's own).
        `prologue` must treat each row on its own (a norm with fixed statistics, an activation)."""
        def rows(lo: int, hi: int) -> mx.array:
            band = _rows(x, lo, hi)
            return band if prologue is None else prologue(band)

        return self.convolve(rows, x.shape, x.dtype, padding)

    def convolve(self, rows: Callable[[int, int], mx.array], shape: tuple[int, ...], dtype: mx.Dtype,
                 padding: Padding | None = None) -> mx.array:
        """The convolution of an NHWC map of `shape` given by `rows(lo, hi)`, its rows lo..hi-1."""
        b, h, w, c = shape
        kh, kw = self.weight.shape[1:3]
        (top, bottom), (left, right) = padding or ((self.padding[0],) * 2, (self.padding[1],) * 2)
        (sh, sw), (dh, dw) = self.stride, _pair(self.dilation)
        span = dh * (kh - 1) + 1  # input rows one output row reads
        h_out = (h + top + bottom - span) // sh + 1
        w_out = (w + left + right - dw * (kw - 1) - 1) // sw + 1
        bias = self.bias if "bias" in self else None
        pointwise = kh == kw == 1 and padding is None and self.padding == (0, 0) and self.groups == 1
        if self.eager and pointwise and self.stride == (dh, dw) == (1, 1):
            y = (rows(0, h).reshape(-1, c) @ self.weight.reshape(-1, c).T).reshape(b, h, w, -1)
            return y if bias is None else y + bias

        kernel = self.winograd_weight() if self.winograd_fits(c, h_out * w_out, dtype) else None  # once for all bands

        def conv(band: mx.array, pad_top: int, pad_bottom: int) -> mx.array:
            if kernel is not None:
                return winograd_conv3x3(band, kernel, ((pad_top, pad_bottom), (left, right)))
            return mx.conv_general(band, self.weight, self.stride, ([pad_top, left], [pad_bottom, right]),
                                   self.dilation, groups=self.groups)

        unfolded = b * h_out * w_out * c * kh * kw * dtype.size
        parts = parallel.cpu_parts(h_out) if self.eager and h_out * w_out >= BAND_SPLIT_MIN_PIXELS else 1
        if kh == 1 or self.stride != (1, 1) or (unfolded <= CONV_CHUNK_BYTES and parts == 1):
            y = conv(rows(0, h), top, bottom)
            y = y if bias is None else y + bias
            if self.eager and unfolded > CONV_CHUNK_BYTES:  # a large strided one: not left to pile up with
                mx.eval(y)  # the next layer's work (bands of strided kernels would change the last bits)
            return y
        step = max(1, min(h_out * CONV_CHUNK_BYTES // unfolded, -(-h_out // parts)))
        spans = [(r, min(h_out, r + step)) for r in range(0, h_out, step)]

        def band(r: int, end: int) -> mx.array:
            lo, hi = r * sh - top, (end - 1) * sh - top + span  # input rows this band reads
            # zero padding only where the band meets an edge: no padded copy of the map
            y = conv(rows(max(lo, 0), min(hi, h)), max(-lo, 0), max(hi - h, 0))
            return y if bias is None else y + bias

        if not self.eager:
            return mx.concatenate([band(*s) for s in spans], axis=1)
        out = None
        for i in range(0, len(spans), parts):
            group = spans[i:i + parts]
            # first what the bands depend on (a norm's statistics, with their temporaries), then the output
            done = parallel.evaluate_in_parts([partial(band, *s) for s in group])
            for (r, end), y in zip(group, done, strict=True):
                if out is None:
                    out = mx.zeros((b, h_out, w_out, y.shape[-1]), y.dtype)
                out[:, r:end] = y
            mx.eval(out)
        return out


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
        h = self.conv1(x, norm_silu(self.norm1, x))
        if temb is not None:
            h = h + self.time_emb_proj(activations.silu(temb))[:, None, None, :]
        h = self.conv2(h, norm_silu(self.norm2, h))
        # Rebound, not named apart: nothing else holds the two terms, so the sum can take over a buffer. The
        # VAE evaluates a large map's sum here, not with the next layer's work, which releases x's buffers.
        h = (self.conv_shortcut(x) if "conv_shortcut" in self else x) + h
        if self.conv2.settles(h):
            mx.eval(h)
        return h


class Downsample2D(nn.Module):
    """Stride-2 convolution. The VAE pads only bottom/right (padding 0 + asymmetric pad), the UNet pads 1."""

    def __init__(self, channels: int, asymmetric_pad: bool = False):
        super().__init__()
        self.asymmetric_pad = asymmetric_pad
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric_pad else 1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(x, padding=((0, 1), (0, 1)) if self.asymmetric_pad else None)


class Upsample2D(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x: mx.array, size: tuple[int, int] | None = None) -> mx.array:
        b, h, w, c = x.shape
        if not self.conv.eager or (size is not None and tuple(size) != (2 * h, 2 * w)):
            return self.conv(upsample_nearest(x, size))

        def rows(lo: int, hi: int) -> mx.array:  # rows lo..hi-1 of the doubled map, from x's rows alone
            return _rows(upsample_nearest(_rows(x, lo // 2, (hi + 1) // 2)), lo % 2, lo % 2 + hi - lo)

        return self.conv.convolve(rows, (b, 2 * h, 2 * w, c), x.dtype)
