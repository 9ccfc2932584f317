"""ControlNet at run time: control images (preprocessors, sizing) and the step hook that adds the residuals.

A control image is what the ControlNet was trained to follow: white scribble or line strokes on black,
Canny edges, a depth map. `preprocess` makes one from the input image itself: "invert" turns a dark-on-light
pencil sketch into light-on-dark lines, "canny" runs the Canny edge detector (the one ControlNet's canny
models were trained with: OpenCV's, reproduced here in numpy), "none" takes the image as it is. Depth and
lineart detectors need models of their own: give their output as a ready control image instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from PIL import Image

from .events import StepContext, StepHook
from .parallel import map_batch

PREPROCESSORS = ("invert", "canny", "none")
CANNY_LOW, CANNY_HIGH = 100, 200  # ControlNet's canny annotator's thresholds


# ------------------------------------------------------------------------------------------ preprocessors


def preprocess(image: Image.Image, how: str, low: float = CANNY_LOW, high: float = CANNY_HIGH) -> Image.Image:
    """The control image made from `image` by the preprocessor `how` (see PREPROCESSORS)."""
    if how not in PREPROCESSORS:
        raise ValueError(f"control preprocessor must be one of {', '.join(PREPROCESSORS)}, not {how!r:.40}")
    image = image.convert("RGB")
    if how == "invert":
        return invert(image)
    if how == "canny":
        return canny(image, low, high)
    return image


def default_preprocess(controlnet: str) -> str:
    """The preprocessor a ControlNet's name asks for: edges for canny models, inverted strokes for scribble,
    lineart and sketch ones, else the input as it is (a depth ControlNet then needs --control-image)."""
    name = str(controlnet).lower()
    if "canny" in name:
        return "canny"
    return "invert" if any(kind in name for kind in ("scribble", "lineart", "sketch")) else "none"


def invert(image: Image.Image) -> Image.Image:
    """Dark strokes on light paper -> light strokes on black (what scribble and lineart ControlNets take)."""
    return Image.fromarray(255 - np.asarray(image.convert("RGB")))


def canny(image: Image.Image, low: float = CANNY_LOW, high: float = CANNY_HIGH, sigma: float = 0.0) -> Image.Image:
    """Canny edges of `image` as white on black (RGB), as OpenCV's `Canny(image, low, high)` finds them."""
    edges = canny_edges(np.asarray(image.convert("RGB")), low, high, sigma)
    return Image.fromarray(np.repeat(edges[..., None] * np.uint8(255), 3, axis=-1))


def canny_edges(pixels: np.ndarray, low: float, high: float, sigma: float = 0.0) -> np.ndarray:
    """The Canny edge map (bool, H x W) of an H x W or H x W x C 8-bit image: an optional Gaussian blur
    (`sigma`, pixels; OpenCV's Canny and ControlNet's annotator have none), 3x3 Sobel gradients (edges
    replicated; of a colour image, the channel with the largest gradient), their L1 magnitude, non-maximum
    suppression along the gradient's direction (OpenCV's sectors and tie rules), then hysteresis: pixels
    above `high` are edges, and so is every pixel above `low` connected to one (8-neighbourhood)."""
    if not (math.isfinite(low) and math.isfinite(high)) or min(low, high) < 0:
        raise ValueError(f"Canny thresholds must be non-negative numbers, not {low}, {high}")
    low, high = sorted((low, high))
    image = pixels.astype(np.float64)
    if image.ndim == 2:
        image = image[..., None]
    if sigma > 0:  # rounded to whole levels again, as an 8-bit blurred image is
        image = np.round(_gaussian(image, sigma))
    low, high = math.floor(low), math.floor(high)  # integer gradients against floored thresholds, as OpenCV's
    padded = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]

    def at(dy: int, dx: int) -> np.ndarray:
        return padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    magnitude = np.abs(gx) + np.abs(gy)
    best = np.argmax(magnitude, axis=-1)[..., None]  # the first channel on ties
    gx, gy, magnitude = (np.take_along_axis(a, best, axis=-1)[..., 0] for a in (gx, gy, magnitude))

    m = np.pad(magnitude, 1)  # zero outside the image
    def near(dy: int, dx: int) -> np.ndarray:
        return m[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    # OpenCV's fixed-point sector test: tan(22.5 deg) in 15 fractional bits.
    ax, ay = np.abs(gx), np.abs(gy) * 32768
    tg22 = ax * 13573
    horizontal = ay < tg22
    vertical = ~horizontal & (ay > tg22 + ax * 65536)
    diagonal = ~horizontal & ~vertical
    same_sign = (gx < 0) == (gy < 0)  # OpenCV's (xs ^ ys) >= 0: a zero counts as positive
    maximum = np.where(horizontal, (magnitude > near(0, -1)) & (magnitude >= near(0, 1)), False)
    maximum |= vertical & (magnitude > near(-1, 0)) & (magnitude >= near(1, 0))
    maximum |= diagonal & same_sign & (magnitude > near(-1, -1)) & (magnitude > near(1, 1))
    maximum |= diagonal & ~same_sign & (magnitude > near(-1, 1)) & (magnitude > near(1, -1))
    candidate = maximum & (magnitude > low)
    return _hysteresis(candidate, candidate & (magnitude > high))


def _gaussian(image: np.ndarray, sigma: float) -> np.ndarray:
    """A separable Gaussian blur (radius 3 sigma, edges replicated) of an H x W x C array."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(image, pad, mode="edge")
        n = image.shape[axis]
        image = sum(t * np.take(padded, np.arange(i, i + n), axis=axis) for i, t in enumerate(taps))
    return image


def _hysteresis(candidate: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """The candidates 8-connected (through candidates) to a strong pixel."""
    h, w = candidate.shape
    edges = strong.copy()
    stack = list(zip(*np.nonzero(strong), strict=True))
    while stack:
        y, x = stack.pop()
        for ny in range(max(0, y - 1), min(h, y + 2)):
            for nx in range(max(0, x - 1), min(w, x + 2)):
                if candidate[ny, nx] and not edges[ny, nx]:
                    edges[ny, nx] = True
                    stack.append((ny, nx))
    return edges


# ------------------------------------------------------------------------------------------ at run time


def control_pixels(image: Image.Image, width: int, height: int) -> mx.array:
    """A control image as the ControlNet takes it: RGB in [0, 1], (1, height, width, 3), resized (Lanczos)
    to the input's working size when it differs."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return mx.array(np.asarray(image, dtype=np.float32) / 255.0)[None]


@dataclass
class Control:
    """One ControlNet in a call: its model, control image(s) (N, H, W, 3) in [0, 1] (one, or one per prompt),
    conditioning scale and guidance window (fractions of the steps run)."""

    net: object  # models.controlnet.ControlNetModel
    image: mx.array
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    def active(self, k: int, n: int) -> bool:
        """Whether it runs at step k (from 0) of n, as diffusers' controlnet_keep decides."""
        return self.scale != 0.0 and not (k / n < self.start or (k + 1) / n > self.end)


class ControlNetHook(StepHook):
    """Runs the ControlNets on each step's input inside their windows and hands their summed residuals to
    the UNet (for the whole guided batch). In `guess_mode` with guidance they see only the prompt's half,
    and the negative half gets no residuals, as in diffusers. What does not change from step to step is
    computed once, at each ControlNet's first step: its embedding of the control image (for every step and
    both halves of guidance) and its cross-attentions' keys and values of the text context."""

    def __init__(self, controls: Sequence[Control], conditioning, start: int, steps: int, guess_mode: bool = False):
        self.controls, self.conditioning = list(controls), conditioning
        self.start, self.steps, self.guess_mode = start, steps, guess_mode
        self._embeddings: dict[int, mx.array] = {}
        self._contexts: dict[int, dict] = {}

    def unet_extras(self, x: mx.array, step: StepContext) -> dict:
        active = [i for i, c in enumerate(self.controls) if c.active(step.index - self.start, self.steps)]
        if not active:
            return {}
        cond = self.conditioning
        guided, half = cond.guided, self.guess_mode and cond.guided
        pooled, time_ids = cond.pooled, cond.time_ids
        context = cond.context
        if half:  # the prompt's half only: [negative..., positive...]
            b = cond.batch
            context, pooled, time_ids = (None if a is None else a[b:] for a in (context, pooled, time_ids))
        elif guided:
            x = mx.concatenate([x, x], axis=0)
        t = mx.array([float(step.sampler.timesteps[step.index])], dtype=mx.float32)
        down, mid = None, None
        for i in active:
            control = self.controls[i]
            if i not in self._contexts:
                self._contexts[i] = map_batch(control.net.project_context, context.shape[0], context)
            d, m = map_batch(control.net, x.shape[0], x, t, self._contexts[i],
                             self._embedding(i, x.dtype, x.shape[0]), pooled, time_ids, scale=control.scale,
                             guess_mode=self.guess_mode)
            down = d if down is None else [a + b for a, b in zip(down, d, strict=True)]
            mid = m if mid is None else mid + m
        if half:
            down = [mx.concatenate([mx.zeros_like(r), r], axis=0) for r in down]
            mid = mx.concatenate([mx.zeros_like(mid), mid], axis=0)
        return {"down_residuals": down, "mid_residual": mid}

    def _embedding(self, i: int, dtype: mx.Dtype, batch: int) -> mx.array:
        """ControlNet i's embedding of its control image(s) for a `batch`-sized input, computed once: one
        image stays batch 1 (added by broadcasting), one per prompt is laid out as the batch."""
        if i not in self._embeddings:
            control = self.controls[i]
            n = control.image.shape[0]
            embedding = map_batch(control.net.embed, n, control.image, dtype)
            if n > 1:
                embedding = mx.repeat(embedding, self.conditioning.batch // n, axis=0)
                embedding = mx.concatenate([embedding] * (batch // embedding.shape[0]), axis=0)
            mx.eval(embedding)
            self._embeddings[i] = embedding
        return self._embeddings[i]
