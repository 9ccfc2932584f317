"""Inpainting and outpainting: change only the masked region of an image, or extend its canvas.

The mask is white where the image is repainted and black where it is kept. It is prepared as diffusers'
VaeImageProcessor prepares masks (greyscale, Lanczos-resized, binarised at one half), then reaches the
one denoising loop as a step hook (InpaintHook):

- a dedicated inpainting UNet (9 input channels) takes the mask and the masked image's latents beside
  the latents at every step;
- an ordinary UNet (4 channels) denoises as in img2img, and after each step the original latents,
  noised to the next timestep, are put back outside the mask,

as diffusers' StableDiffusionInpaintPipeline and StableDiffusionXLInpaintPipeline do. `padding_mask_crop`
works on the mask's bounding box only, at the working size, and pastes the result back (diffusers' crop
and AUTOMATIC1111's "inpaint only masked"). From AUTOMATIC1111: `mask_blur` (a Gaussian of that sigma
in pixels, cut at 2.5 sigma), `inpaint_fill` (what the masked area starts from) and the paste-back of the
original pixels outside the blurred mask (`keep_unmasked`), so the VAE's round trip cannot change them.
Outpainting (`outpaint_canvas`) extends the canvas, fills the new area from the image's edges and makes
the mask, with a soft seam that lies in the new area so the original pixels are kept exactly.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from PIL import Image, ImageFilter

from .errors import ImageInputError
from .events import StepContext, StepHook

INPAINT_FILLS = ("original", "fill", "latent_noise", "latent_nothing")
BLUR_EXTENT = 2.5  # the blur's kernel reaches this many sigmas (AUTOMATIC1111's OpenCV kernel size)

MaskInput = Image.Image | str | os.PathLike | np.ndarray


class MaskError(ImageInputError):
    """A mask that cannot be used: not an image, nothing to repaint, or the wrong size in a series."""


# ------------------------------------------------------------------------------------------ the mask


def as_mask(mask: MaskInput) -> Image.Image:
    """A PIL image, a path or a numpy array (HxW, uint8 or float in [0, 1]) as an 8-bit greyscale mask."""
    if isinstance(mask, Image.Image):
        return mask.convert("L") if mask.mode != "L" else mask
    if isinstance(mask, np.ndarray):
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.ndim != 2 or mask.size == 0:
            raise MaskError(f"a mask array must be HxW, not shape {mask.shape}")
        if mask.dtype != np.uint8:
            values = np.nan_to_num(mask.astype(np.float64))
            mask = np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)
        return Image.fromarray(mask, mode="L")
    if isinstance(mask, str | os.PathLike):
        from .images import load_mask

        return load_mask(mask)
    raise TypeError(f"mask_image must be a PIL image, a path or a numpy array, not {type(mask).__name__}")


def gaussian_blur(values: np.ndarray, sigma: float) -> np.ndarray:
    """An HxW float array blurred by a Gaussian of `sigma` pixels whose kernel stops at BLUR_EXTENT sigmas
    (so pixels farther than that from the mask stay exactly 0), edges mirrored as OpenCV does."""
    radius = int(BLUR_EXTENT * sigma + 0.5)
    if sigma <= 0 or radius == 0:
        return values.astype(np.float64)
    taps = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(taps**2) / (2 * sigma * sigma))
    kernel /= kernel.sum()
    out = values.astype(np.float64)
    for axis in (0, 1):
        n = out.shape[axis]
        widths = [(0, 0), (0, 0)]
        widths[axis] = (radius, radius)
        # mirrored without repeating the edge pixel (OpenCV's default border); numpy reflects again as needed
        padded = np.pad(out, widths, mode="reflect" if n > 1 else "edge")
        acc = np.zeros_like(out)
        for k, weight in enumerate(kernel):
            acc += weight * (padded[k:k + n] if axis == 0 else padded[:, k:k + n])
        out = acc
    return out


def crop_region(mask: np.ndarray, width: int, height: int, pad: int) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2): the bounding box of the mask's non-zero pixels, grown by `pad` on each side and then
    to the aspect ratio `width`/`height` (centred, moved back inside the image), as diffusers' crop does."""
    h, w = mask.shape
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    x1, x2 = max(int(cols[0]) - pad, 0), min(int(cols[-1]) + 1 + pad, w)
    y1, y2 = max(int(rows[0]) - pad, 0), min(int(rows[-1]) + 1 + pad, h)
    target = width / height
    if (x2 - x1) / (y2 - y1) > target:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / target - (y2 - y1)), h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * target - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, extra: int, limit: int) -> tuple[int, int]:
    """[lo, hi) grown by `extra` (half each side), shifted back inside [0, limit), at most [0, limit)."""
    lo, hi = lo - extra // 2, hi + extra - extra // 2
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    if lo < 0:
        lo, hi = 0, hi - lo
    return lo, min(hi, limit)


def resize_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` scaled to fit inside width x height (aspect kept), centred; the bands left over repeat its
    edge rows or columns (diffusers' "fill" resize, which its crop uses to reach the working size)."""
    scale_w = width if width / height < image.width / image.height else image.width * height // image.height
    scale_h = height if width / height >= image.width / image.height else image.height * width // image.width
    resized = image.resize((scale_w, scale_h), Image.Resampling.LANCZOS)
    out = Image.new(image.mode, (width, height))
    x, y = width // 2 - scale_w // 2, height // 2 - scale_h // 2
    out.paste(resized, (x, y))
    if y > 0:  # bands above and below: the first and last rows stretched
        out.paste(resized.resize((width, y), box=(0, 0, width, 0)), (0, 0))
        out.paste(resized.resize((width, y), box=(0, scale_h, width, scale_h)), (0, y + scale_h))
    elif x > 0:
        out.paste(resized.resize((x, height), box=(0, 0, 0, height)), (0, 0))
        out.paste(resized.resize((x, height), box=(scale_w, 0, scale_w, height)), (x + scale_w, 0))
    return out


def resize_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` scaled to cover width x height (aspect kept), centred, the overflow cut (diffusers' "crop")."""
    scale_w = width if width / height > image.width / image.height else image.width * height // image.height
    scale_h = height if width / height <= image.width / image.height else image.height * width // image.width
    out = Image.new(image.mode, (width, height))
    out.paste(image.resize((scale_w, scale_h), Image.Resampling.LANCZOS),
              (width // 2 - scale_w // 2, height // 2 - scale_h // 2))
    return out


def fill_from_surroundings(image: Image.Image, repaint: np.ndarray) -> Image.Image:
    """The masked pixels replaced by the average colour of the kept pixels around them, from a wide
    neighbourhood down to a narrow one (the narrowest that reaches any kept pixel wins), so the model
    starts from the surrounding colours rather than from what was there (AUTOMATIC1111's "fill")."""
    pixels = np.asarray(image, dtype=np.float64)
    keep = (repaint < 0.5).astype(np.float64)
    out = pixels.copy()
    todo = repaint >= 0.5
    for sigma in (1, 4, 16, 64):
        if not todo.any():
            break
        weight = gaussian_blur(keep, sigma)
        reached = todo & (weight > 1e-6)
        for c in range(pixels.shape[-1]):
            colour = gaussian_blur(pixels[..., c] * keep, sigma)
            out[..., c][reached] = colour[reached] / weight[reached]
        todo &= ~reached
    if todo.any():  # a neighbourhood far wider than 64 px: the mean of what is kept
        out[todo] = pixels[keep > 0].mean(axis=0) if keep.any() else 127.5
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------ preparation


@dataclass
class InpaintInput:
    """An inpainting job prepared at the working size."""

    original: Image.Image  # the input at the working size: what the paste-back keeps
    soft_mask: np.ndarray  # HxW in [0, 1] at the original's size (blurred): how much of the result shows
    image: Image.Image  # what the model works on: the original, or its crop resized up; pre-filled
    mask: np.ndarray  # HxW in {0, 1} at the image's size (binarised): 1 = repaint
    box: tuple[int, int, int, int] | None  # the crop in the original (padding_mask_crop)
    paste: bool  # paste the result into the original (keep_unmasked; always with a crop, as diffusers)
    fill: str

    def masked_pixels(self) -> np.ndarray:
        """The working image in [-1, 1] with the repainted area at 0, as the inpainting UNet sees it."""
        return (np.asarray(self.image, np.float32) / 127.5 - 1.0) * (self.mask < 0.5)[..., None]

    def latent_mask(self, factor: int) -> mx.array:
        """The mask at the latents' size, (1, h, w, 1): the nearest pixel of each latent's top-left corner,
        as torch's default interpolation gives."""
        return mx.array(self.mask[::factor, ::factor][None, :, :, None].astype(np.float32))

    def finish(self, generated: Image.Image) -> Image.Image:
        """The model's output back in the original: into the crop, and the original kept outside the mask."""
        if self.box is not None:
            x1, y1, x2, y2 = self.box
            canvas = self.original.copy()
            canvas.paste(resize_crop(generated, x2 - x1, y2 - y1), (x1, y1))
            generated = canvas
        return paste_unmasked(self.original, generated, self.soft_mask) if self.paste else generated


def prepare(image: Image.Image, mask: MaskInput, mask_blur: float = 0.0, inpaint_fill: str = "original",
            padding_mask_crop: int | None = None, keep_unmasked: bool = False) -> InpaintInput:
    """Bring the mask to the image (a mask of another size is resized, with a warning), blur it, crop both
    to the mask's box when asked, binarise the mask at the working size, and pre-fill the masked area."""
    if inpaint_fill not in INPAINT_FILLS:
        raise ValueError(f"inpaint_fill must be one of {', '.join(INPAINT_FILLS)}, not {inpaint_fill!r:.40}")
    if isinstance(mask_blur, bool) or not isinstance(mask_blur, int | float) or not 0 <= mask_blur <= 256:
        raise ValueError(f"mask_blur must be a number of pixels from 0 to 256, not {mask_blur!r:.40}")
    if padding_mask_crop is not None and (isinstance(padding_mask_crop, bool) or not isinstance(
            padding_mask_crop, int) or padding_mask_crop < 0):
        raise ValueError(f"padding_mask_crop must be a whole number of pixels >= 0, not {padding_mask_crop!r:.40}")
    grey, soft = _blurred(as_mask(mask), image.size, mask_blur, warn=True)
    if not (np.asarray(grey) >= 128).any():
        raise MaskError("the mask is all black (nothing to repaint): white marks what changes")
    work, box = image, None
    if padding_mask_crop is not None:
        box = crop_region(np.asarray(grey), image.width, image.height, padding_mask_crop)
        work = resize_fill(image.crop(box), image.width, image.height)
        grey = resize_fill(grey.crop(box), image.width, image.height)
    elif grey.size != work.size:
        grey = grey.resize(work.size, Image.Resampling.LANCZOS)
    binary = (np.asarray(grey, np.float32) / 255 >= 0.5).astype(np.float32)
    if inpaint_fill == "fill":
        work = fill_from_surroundings(work, binary)
    return InpaintInput(original=image, soft_mask=soft, image=work, mask=binary, box=box,
                        paste=keep_unmasked or box is not None, fill=inpaint_fill)


def _blurred(grey: Image.Image, size: tuple[int, int], mask_blur: float, warn: bool = False
             ) -> tuple[Image.Image, np.ndarray]:
    """The mask at `size` (resized, with a warning when `warn`) and blurred: as an image and in [0, 1]."""
    if grey.size != size:
        if warn:
            warnings.warn(f"the mask ({grey.width}x{grey.height}) is resized to the image ({size[0]}x{size[1]})",
                          stacklevel=4)
        grey = grey.resize(size, Image.Resampling.LANCZOS)
    soft = np.asarray(grey, np.float64) / 255
    if mask_blur > 0:
        soft = gaussian_blur(soft, mask_blur)
        grey = Image.fromarray(np.clip(np.rint(soft * 255), 0, 255).astype(np.uint8), mode="L")
    return grey, soft


def keep_unmasked(original: Image.Image, generated: Image.Image, mask: MaskInput, mask_blur: float = 0.0
                  ) -> Image.Image:
    """`generated` (resized to the original) with the original's pixels back outside the blurred mask."""
    return paste_unmasked(original, generated, _blurred(as_mask(mask), original.size, mask_blur)[1])


def paste_unmasked(original: Image.Image, generated: Image.Image, soft_mask: np.ndarray) -> Image.Image:
    """`generated` where the mask is white, `original` where it is black, blended across the grey."""
    alpha = soft_mask.astype(np.float64)[..., None]
    a, b = np.asarray(original, np.float64), np.asarray(generated.resize(original.size), np.float64)
    return Image.fromarray(np.clip(np.rint(b * alpha + a * (1 - alpha)), 0, 255).astype(np.uint8))


def fill_latents(latents: mx.array, mask: mx.array, fill: str, noise: mx.array | None = None) -> mx.array:
    """The image latents the run starts from, with the masked area replaced: by noise ("latent_noise") or
    by zeros ("latent_nothing"); as they are otherwise."""
    if fill == "latent_noise":
        return latents * (1 - mask) + noise * mask
    if fill == "latent_nothing":
        return latents * (1 - mask)
    return latents


# ------------------------------------------------------------------------------------------ the hook


class InpaintHook(StepHook):
    """The per-step part of inpainting. With `masked_latents` (an inpainting UNet) the mask and the masked
    image's latents are concatenated to the UNet's input; without them, the original latents noised to the
    next timestep (with the start noise) replace the latents outside the mask after each step. Arrays are
    NHWC with the run's batch."""

    def __init__(self, mask: mx.array, masked_latents: mx.array | None, image_latents: mx.array | None,
                 noise: mx.array):
        self.mask, self.masked_latents = mask, masked_latents
        self.image_latents, self.noise = image_latents, noise

    def unet_input(self, x: mx.array, step: StepContext) -> mx.array:
        if self.masked_latents is None:
            return x
        return mx.concatenate([x, self.mask.astype(x.dtype), self.masked_latents.astype(x.dtype)], axis=-1)

    def after_step(self, x: mx.array, step: StepContext) -> mx.array:
        if self.masked_latents is not None:
            return x
        kept = self.image_latents
        if not step.last:  # the last step lands on the clean latents
            kept = step.sampler.add_noise(kept, self.noise, step.index + 1)
        return (kept * (1 - self.mask) + x * self.mask).astype(x.dtype)


def init_noise_sigma(sampler) -> float:
    """The scale of pure-noise start latents on a sampler's own scale (diffusers' `init_noise_sigma`):
    1 for the variance-preserving samplers; for the Euler family the largest sigma, or sqrt(sigma^2 + 1)
    with "leading" timestep spacing."""
    if not getattr(sampler, "_variance_exploding", False):
        return 1.0
    top = float(np.max(sampler.sigmas))
    return top if sampler.config["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(top * top + 1)


# ------------------------------------------------------------------------------------------ outpainting


def parse_margins(text: str) -> tuple[str, ...]:
    """TOP,RIGHT,BOTTOM,LEFT in CSS order (one value: all sides; two: vertical, horizontal; three: top,
    horizontal, bottom), each pixels ("64") or a percentage of the image's side ("25%")."""
    parts = [p.strip() for p in str(text).split(",")]
    if not 1 <= len(parts) <= 4 or not all(re.fullmatch(r"\d+(\.\d+)?%?", p) for p in parts):
        raise ValueError(f"outpaint: {text!r:.40} is not TOP,RIGHT,BOTTOM,LEFT margins (e.g. 64 or 0,25%,0,25%)")
    if len(parts) == 3:
        parts.append(parts[1])
    top, right, bottom, left = (parts * (4 // len(parts)))[:4]
    return top, right, bottom, left


def margins_in_pixels(margins: tuple[str, ...], width: int, height: int, multiple: int = 8,
                      limit: int = 8192) -> tuple[int, int, int, int]:
    """(top, right, bottom, left) in pixels; where the canvas would not be a multiple of `multiple`, the
    margins of that axis grow a little (the bottom or the right first), so the original is never resized."""
    def px(value: str, side: int) -> int:
        return round(side * float(value[:-1]) / 100) if value.endswith("%") else int(float(value))

    top, right, bottom, left = (px(margins[0], height), px(margins[1], width), px(margins[2], height),
                                px(margins[3], width))
    if top + bottom:
        extra = -(height + top + bottom) % multiple
        bottom, top = (bottom + extra, top) if bottom else (bottom, top + extra)
    if left + right:
        extra = -(width + left + right) % multiple
        right, left = (right + extra, left) if right else (right, left + extra)
    if not top + right + bottom + left:
        raise ValueError("outpaint: every margin is 0, nothing to extend")
    if max(width + left + right, height + top + bottom) > limit:
        raise ValueError(f"outpaint: the canvas would be {width + left + right}x{height + top + bottom}, "
                         f"over {limit} pixels on a side")
    return top, right, bottom, left


def outpaint_canvas(image: Image.Image, margins: tuple[int, int, int, int], seam: float = 4.0
                    ) -> tuple[Image.Image, Image.Image]:
    """The extended canvas and its mask. The new area starts from the image's edge pixels stretched outward
    and blurred (colour for the model to start from); the mask is white there, with a soft seam of about
    2.5 x `seam` pixels rising from black at the original's edge, so a paste-back keeps the original exactly
    and fades into the new content."""
    top, right, bottom, left = margins
    pixels = np.asarray(image.convert("RGB"))
    padded = np.pad(pixels, ((top, bottom), (left, right), (0, 0)), mode="edge")
    new = np.ones(padded.shape[:2], bool)
    new[top:top + image.height, left:left + image.width] = False
    canvas = Image.fromarray(padded)
    blurred = np.asarray(canvas.filter(ImageFilter.GaussianBlur(max(margins) / 4)))
    padded = np.where(new[..., None], blurred, padded)
    ramp = np.clip(2 * gaussian_blur(new.astype(np.float64), seam) - 1, 0, 1) if seam > 0 else new * 1.0
    ramp[~new] = 0.0
    mask = Image.fromarray(np.rint(ramp * 255).astype(np.uint8), mode="L")
    return Image.fromarray(padded.astype(np.uint8)), mask
