"""Run a spatial function over overlapping tiles and blend the seams: VAE encode and decode of images
larger than memory allows, with the same code for both directions."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np


def _starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering [0, size): evenly strided, the last one flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def _ramp(length: int, overlap: int, at_start: bool, at_end: bool) -> np.ndarray:
    """1-D blend weights: rising over the overlap on sides that touch another tile, flat at image edges."""
    i = np.arange(length, dtype=np.float32) + 0.5
    w = np.ones(length, np.float32)
    if overlap > 0 and not at_start:
        w = np.minimum(w, i / overlap)
    if overlap > 0 and not at_end:
        w = np.minimum(w, (length - i) / overlap)
    return w


def map_tiles(fn: Callable[[mx.array], mx.array], x: mx.array, tile: int, overlap: int,
              scale: float, align: int = 1) -> mx.array:
    """Apply `fn` (NHWC -> NHWC with spatial sizes times `scale`) to `x` in tiles of `tile` pixels that
    overlap by `overlap`, blending the overlaps linearly. `align` keeps tile origins on multiples of it
    (the VAE encoder needs whole latent pixels). A single tile is just `fn(x)`."""
    b, h, w, _ = x.shape
    if h <= tile and w <= tile:
        return fn(x)
    stride = max(align, (tile - overlap) // align * align)
    ys, xs = _starts(h, tile, stride), _starts(w, tile, stride)
    ys, xs = [y // align * align for y in ys], [x0 // align * align for x0 in xs]
    out, weight = None, None
    for y0 in ys:
        for x0 in xs:
            piece = fn(x[:, y0:y0 + tile, x0:x0 + tile])
            ph, pw = piece.shape[1:3]
            oy, ox, ov = int(y0 * scale), int(x0 * scale), int(overlap * scale)
            wy = _ramp(ph, ov, y0 == ys[0], y0 == ys[-1])
            wx = _ramp(pw, ov, x0 == xs[0], x0 == xs[-1])
            mask = mx.array(np.outer(wy, wx))[None, :, :, None]
            if out is None:
                out = mx.zeros((b, int(h * scale), int(w * scale), piece.shape[-1]), dtype=mx.float32)
                weight = mx.zeros((1, out.shape[1], out.shape[2], 1), dtype=mx.float32)
            out[:, oy:oy + ph, ox:ox + pw] += piece.astype(mx.float32) * mask
            weight[:, oy:oy + ph, ox:ox + pw] += mask
            mx.eval(out, weight)  # one tile's activations at a time
    return (out / weight).astype(piece.dtype)
