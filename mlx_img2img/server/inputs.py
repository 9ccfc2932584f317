"""Request bodies into work: images decoded within limits, the native job JSON, and the plan.

Every value is checked by its request field (request.py), as a flag or a stored value is; the models a
body names are looked up among the listed ones (models.Catalog.find), never opened from the body.
"""

from __future__ import annotations

import base64
import binascii
import io
import secrets
import warnings
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from .. import images
from ..generation import Planner
from ..request import BY_NAME, Request, RequestError
from .engine import Work
from .models import Catalog, ModelEntry

DEFAULT_MAX_PIXELS = 4096 * 4096  # an input image over this is refused (a decompression bomb, or far beyond use)

# Request fields a job may not set: how models are loaded is the server's (serve --dtype ...; a listed model loads
# with its own prediction type), and a VAE, a folder or a LoRA would be a path from the body (LoRAs:
# <lora:NAME:WEIGHT> in the prompt, from the server's folder).
SERVER_FIELDS = ("dtype", "quantize", "low_memory", "vae_tile", "memory_limit", "prediction_type", "vae", "controlnet",
                 "control_image", "models_dir", "lora", "lora_dir", "embedding")
UNSERVED_FIELDS = ("passes", "sweep", "pass_prompts", "outpaint")  # one strength per job here; no canvas
NATIVE_FIELDS = tuple(f.name for f in BY_NAME.values() if f.name not in SERVER_FIELDS + UNSERVED_FIELDS)


def decode_base64(value: Any, what: str) -> bytes:
    """Base64 text, with or without a data: URL prefix (``data:image/png;base64,``)."""
    if not isinstance(value, str) or not value:
        raise RequestError(f"{what}: give an image as base64 text")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:  # wrapped lines (base64 without -w 0): the copy without whitespace only then
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{what}: not valid base64") from None


def open_image(data: bytes, what: str, max_pixels: int = DEFAULT_MAX_PIXELS, load: bool = True) -> Image.Image:
    """Image bytes as a PIL image, refused above `max_pixels` before its pixels are decoded; with `load`, as
    an upright sRGB RGB image (images.to_rgb), as the command line reads files."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise RequestError(f"{what}: {w}x{h} pixels is over the limit of {max_pixels:,} pixels")
            if not load:
                return im
            im.load()
            return images.to_rgb(im)
    except Image.DecompressionBombError:
        raise RequestError(f"{what}: too many pixels (over the limit of {max_pixels:,})") from None
    except UnidentifiedImageError:
        raise RequestError(f"{what}: not an image, or not a format that can be read") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        if isinstance(e, RequestError):
            raise
        raise RequestError(f"{what}: truncated or corrupt image ({' '.join(str(e).split())})") from None


def decode_image(value: Any, what: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    return open_image(decode_base64(value, what), what, max_pixels)


def plan_work(request: Request, catalog: Catalog, model: ModelEntry, refiner: ModelEntry | None,
              inputs: list[Image.Image], mask: Image.Image | None = None) -> Work:
    """The checked request planned on its models' configs (no weights loaded): a planning error is the
    request's. A random seed (none given, or -1) is decided here, so that it can be reported."""
    request = request.validate()
    planner = Planner(request, catalog.info(model), catalog.info(refiner) if refiner else None, catalog.folder)
    seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
    request.seed = seed
    return Work(request, planner, model, refiner, inputs, [(seed + k) % 2**32 for k in range(request.num_images)],
                mask)


def native_work(body: Any, catalog: Catalog, current: ModelEntry, max_pixels: int = DEFAULT_MAX_PIXELS) -> Work:
    """A native job: the request's fields by name (unknown ones refused) and `image` (base64)."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    values = dict(body)
    image = decode_image(values.pop("image", None), "image", max_pixels)
    mask = values.pop("mask", None)
    if mask is not None:  # base64, as the image; white: repaint
        mask = decode_image(mask, "mask", max_pixels).convert("L")
        if values.pop("invert_mask", False) is True:
            mask = ImageOps.invert(mask)
        if max(mask.getextrema()) < 128:
            raise RequestError("mask: it is all black (nothing to repaint)")
        mask = mask if mask.size == image.size else mask.resize(image.size, Image.Resampling.LANCZOS)
    refused = sorted(set(values) & set(SERVER_FIELDS))
    if refused:
        raise RequestError(f"{', '.join(refused)}: set when the server starts (mlx-img2img serve --help)")
    unserved = sorted(set(values) & set(UNSERVED_FIELDS))
    if unserved:
        raise RequestError(f"{', '.join(unserved)}: not served; one job runs one strength")
    model = catalog.find(values.pop("model"), "model") if values.get("model") is not None else current
    refiner = catalog.find(values.pop("refiner"), "refiner") if values.get("refiner") is not None else None
    values.pop("model", None), values.pop("refiner", None)
    values["model"] = model.title
    if refiner is not None:
        values["refiner"] = refiner.title
    return plan_work(Request.from_values(values), catalog, model, refiner, [image], mask)
