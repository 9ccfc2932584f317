"""Image files in and out.

- ``load_image``: whatever a user has lying around (PNG, JPEG, WebP, TIFF, BMP, GIF; EXIF rotation,
  alpha, greyscale, palette, 16-bit, CMYK, colour profiles) becomes a plain sRGB ``RGB`` image, or an
  ``ImageInputError`` with one clear line.
- Sizes: ``fit_image`` gives the output its size (``--width/--height`` with fit|crop|pad|stretch);
  ``model_size`` picks the size the model works at (multiples of 8, capped); ``resize_to`` goes back.
- ``save_png``: atomic write (temporary file in the same folder, then a rename), never clobbering an
  existing file unless asked, with an AUTOMATIC1111 ``parameters`` chunk and the full settings as JSON.
- ``read_metadata`` / ``parse_parameters``: read those back, also from images made by other tools.
- ``contact_sheet``: a labelled grid.
"""

from __future__ import annotations

import fcntl
import glob
import io
import json
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageCms, ImageDraw, ImageFont, ImageOps, PngImagePlugin, UnidentifiedImageError

from .errors import ImageInputError
from .schedulers import SAMPLERS

try:  # HEIC/HEIF (iPhone photos) when the optional plugin is installed
    from pillow_heif import register_heif_opener  # type: ignore[import-not-found]

    register_heif_opener()
except ImportError:  # pragma: no cover - optional
    pass

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".heic", ".heif")
RESIZE_MODES = ("fit", "crop", "pad", "stretch")
MAX_INPUT_PIXELS = 100_000_000  # larger images are refused: a decompression bomb, or far beyond any use
# stored settings longer than this are refused: settings text of this tool or AUTOMATIC1111 stays far below it
MAX_METADATA_CHARS = 256 * 1024
STALE_TEMP_SECONDS = 2.0  # an unlocked temporary file of a save older than this is left over from a crash
DEFAULT_MAX_SIDE = 1024  # the model never works above this many pixels on the longer side
MIN_SIDE = 64  # nor below this: 8 latent pixels
WHITE = (255, 255, 255)

PARAMETERS_KEY = "parameters"  # AUTOMATIC1111's text chunk
SETTINGS_KEY = "mlx-img2img"  # our full settings, as JSON

# our scheduler names -> the names AUTOMATIC1111 writes in "Sampler:"
A1111_SAMPLERS = {s.name: s.a1111_label for s in SAMPLERS.values()}

Size = tuple[int, int]


# --------------------------------------------------------------------------------------------- loading


def load_image(path: str | os.PathLike[str], max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """Read an image file as an sRGB ``RGB`` image, upright, alpha composited on white."""
    return _read(path, max_pixels, to_rgb)


def load_mask(path: str | os.PathLike[str], max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """Read a mask file as an upright 8-bit greyscale ``L`` image (white: repaint)."""
    return _read(path, max_pixels, lambda im: to_rgb(im).convert("L"))


def load_transparency(path: str | os.PathLike[str], max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image | None:
    """The transparent parts of an image file as a mask (white where fully transparent), or None when the
    file has no transparent pixel: an area erased in an image editor is the area to repaint."""
    def transparency(im: Image.Image) -> Image.Image | None:
        im = ImageOps.exif_transpose(im)
        if not (im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info):
            return None
        alpha = im.convert("RGBA").getchannel("A")
        return ImageOps.invert(alpha) if alpha.getextrema()[0] < 255 else None

    return _read(path, max_pixels, transparency)


def _read(path: str | os.PathLike[str], max_pixels: int, convert: Any) -> Any:
    """An image file, opened, checked and converted; every failure an ImageInputError of one line."""
    path = Path(path)
    if not path.exists():
        raise ImageInputError(f"{path}: no such file")
    if path.is_dir():
        raise ImageInputError(f"{path}: is a folder, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_pixels(path, im.size, max_pixels)
                im.load()
                return convert(im)
    except Image.DecompressionBombError as e:  # Pillow's own, far larger, limit
        raise ImageInputError(_too_large(path, "too many pixels", max_pixels)) from e
    except UnidentifiedImageError as e:
        hint = " (HEIC needs: pip install pillow-heif)" if path.suffix.lower() in (".heic", ".heif") else ""
        raise ImageInputError(f"{path}: not an image, or not a format that can be read{hint}") from e
    except PermissionError as e:
        raise ImageInputError(f"{path}: cannot read it: permission denied") from e
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        raise ImageInputError(f"{path}: truncated, corrupt or unsupported image ({e})") from e


def _check_pixels(path: Path, size: Size, max_pixels: int) -> None:
    w, h = size
    if w * h > max_pixels:
        raise ImageInputError(_too_large(path, f"{w}x{h} is {_pixels(w * h)}", max_pixels))


def _pixels(n: int) -> str:
    return f"{n / 1e6:,.0f} megapixels" if n >= 10**6 else f"{n:,} pixels"


def _too_large(path: Path, what: str, max_pixels: int) -> str:
    return (
        f"{path}: refused: {what}, over the limit of {_pixels(max_pixels)} "
        "(a decompression bomb? if not, shrink it first)"
    )


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow image -> a new upright sRGB ``RGB`` image (transparent parts become white)."""
    im = ImageOps.exif_transpose(im)
    im = _to_srgb(im)
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        im = _high_bit_depth_to_l(im)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, WHITE + (255,))
        canvas.alpha_composite(rgba)
        im = canvas
    return im.convert("RGB")  # always a new image


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale -> 8-bit ``L``, scaling (Pillow's own convert clips)."""
    a = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        scale = 255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0  # floats in [0, 1], else in [0, 255]
        a = np.nan_to_num(a) * scale
    else:
        a = np.clip(a, 0, 65535) / 257.0  # 16-bit range
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def _to_srgb(im: Image.Image) -> Image.Image:
    """Apply an embedded colour profile (Display P3 photos, CMYK prints), where there is one."""
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "RGBA", "CMYK"):
        return im.convert("RGB") if im.mode == "CMYK" else im
    try:
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        dst = ImageCms.createProfile("sRGB")
        out_mode = "RGBA" if im.mode == "RGBA" else "RGB"
        return ImageCms.profileToProfile(im, src, dst, outputMode=out_mode) or im
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return im.convert("RGB") if im.mode == "CMYK" else im


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """The image files directly inside a folder (by suffix, not hidden), sorted by name."""
    return sorted(
        p
        for p in Path(folder).iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


# ----------------------------------------------------------------------------------------------- sizes


def output_size(src: Size, width: int | None, height: int | None, mode: str = "fit") -> Size:
    """The size of the output for an input of size ``src``.

    No width and height: the input's own size. One of them: the other follows the aspect ratio
    (whatever the mode). Both: exactly ``width x height``, except ``fit``, which scales the image to
    fit inside that box, keeping its aspect ratio (so one side may come out smaller).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, not {mode!r}")
    sw, sh = src
    if width is None and height is None:
        return sw, sh
    if width is None:
        return max(1, round(sw * height / sh)), height  # type: ignore[operator]
    if height is None:
        return width, max(1, round(sh * width / sw))
    if mode == "fit":
        scale = min(width / sw, height / sh)
        return max(1, round(sw * scale)), max(1, round(sh * scale))
    return width, height


def fit_image(
    img: Image.Image, width: int | None, height: int | None, mode: str = "fit", fill: tuple = WHITE
) -> Image.Image:
    """Resize ``img`` to ``output_size``: ``crop`` fills the box and crops the overflow (centred),
    ``pad`` fits inside and pads with ``fill``, ``stretch`` ignores the aspect ratio."""
    size = output_size(img.size, width, height, mode)
    if size == img.size:
        return img
    both = width is not None and height is not None
    if both and mode == "crop":
        return ImageOps.fit(img, size, Image.Resampling.LANCZOS)
    if both and mode == "pad":
        return ImageOps.pad(img, size, Image.Resampling.LANCZOS, color=fill)
    return img.resize(size, Image.Resampling.LANCZOS)


def model_size(size: Size, max_side: int = DEFAULT_MAX_SIDE, multiple: int = 8) -> Size:
    """The size the model works at for an output of ``size``.

    The image is scaled down (never up) so that its longer side is at most ``max_side``, then each
    side is rounded to the nearest multiple of 8 (at least 64). The aspect ratio moves by at most a few
    pixels' worth; the result is resized back to ``size`` afterwards.
    """
    w, h = size
    scale = min(1.0, max_side / max(w, h))
    top = max(MIN_SIDE, max_side // multiple * multiple)

    def snap(v: int) -> int:
        return min(top, max(MIN_SIDE, multiple * round(v * scale / multiple)))

    return snap(w), snap(h)


def resize_to(img: Image.Image, size: Size) -> Image.Image:
    """``img`` at ``size`` (unchanged if it already is)."""
    return img if img.size == tuple(size) else img.resize(tuple(size), Image.Resampling.LANCZOS)


# -------------------------------------------------------------------------------------------- metadata


def _quote(value: Any) -> str:
    """A value for the A1111 settings line: JSON-quoted if it holds a separator."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:\n"') else text


def _number(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def format_parameters(settings: dict[str, Any]) -> str:
    """The AUTOMATIC1111 ``parameters`` text for one image's settings.

    ``prompt``, then ``Negative prompt: ...``, then one line ``Steps: 30, Sampler: Euler a, ...``.
    Keys used: prompt, negative_prompt, steps, scheduler, guidance, seed, size (w, h), model_name,
    strength, clip_skip, rng, prompt_syntax, version. PyTorch's CPU generator is AUTOMATIC1111's "RNG: CPU".
    """
    lines = [settings.get("prompt") or ""]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    scheduler = settings.get("scheduler")
    size = settings.get("size")
    fields = {
        "Steps": settings.get("steps"),
        "Sampler": A1111_SAMPLERS.get(scheduler, scheduler) if scheduler else None,
        "CFG scale": _number(settings["guidance"]) if settings.get("guidance") is not None else None,
        "Seed": settings.get("seed"),
        "Size": f"{size[0]}x{size[1]}" if size else None,
        "Model": settings.get("model_name") or settings.get("model"),
        "Denoising strength": _number(settings["strength"]) if settings.get("strength") is not None else None,
        "Clip skip": settings["clip_skip"] if (settings.get("clip_skip") or 1) > 1 else None,
        "RNG": "CPU" if settings.get("rng") == "torch" else None,
        "Prompt syntax": settings["prompt_syntax"] if settings.get("prompt_syntax") == "plain" else None,
        "Version": settings.get("version"),
    }
    fields.update(settings.get("extra_fields") or {})
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


# one "Key: value" of the settings line; a value is a JSON string or runs to the next comma
_FIELD = re.compile(r'\s*([A-Za-z][\w \-/+().]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _parse_fields(line: str) -> dict[str, str] | None:
    """The fields of an A1111 settings line, or None if the line is not one."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(line):
        m = _FIELD.match(line, pos)
        if not m or m.end() == pos:
            return None
        value = m.group(2).strip()
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                pass
        fields[m.group(1).strip()] = value
        pos = m.end()
    return fields if "Steps" in fields or len(fields) >= 3 else None


def parse_parameters(text: str) -> dict[str, Any]:
    """Read an A1111 ``parameters`` text into our settings keys (only those it holds).

    Returns prompt, negative_prompt, and where present steps, scheduler, guidance, seed, width,
    height, strength, model_name, clip_skip, rng ("RNG: CPU" is PyTorch's CPU generator; AUTOMATIC1111's
    GPU ones cannot be reproduced here), prompt_syntax, plus ``fields``: every "Key: value" of the
    settings line as text.
    """
    lines = text.strip("\n").split("\n")
    fields = _parse_fields(lines[-1]) if lines else None
    if fields is not None:
        lines = lines[:-1]
    neg_at = next((i for i, ln in enumerate(lines) if ln.startswith("Negative prompt:")), len(lines))
    out: dict[str, Any] = {"prompt": "\n".join(lines[:neg_at]).strip()}
    if neg_at < len(lines):
        neg = "\n".join(lines[neg_at:])[len("Negative prompt:") :].strip()
        out["negative_prompt"] = neg or None
    fields = fields or {}
    out["fields"] = fields

    def take(key: str, name: str, conv: Any) -> None:
        if key in fields:
            try:
                out[name] = conv(fields[key])
            except ValueError:
                pass

    take("Steps", "steps", int)
    take("CFG scale", "guidance", float)
    take("Seed", "seed", int)
    take("Denoising strength", "strength", float)
    take("Model", "model_name", str)
    take("Clip skip", "clip_skip", int)
    rng = {"cpu": "torch", "torch": "torch", "mlx": "mlx"}.get(fields.get("RNG", "").strip().lower())
    if rng:
        out["rng"] = rng
    if fields.get("Prompt syntax", "").strip().lower() in ("a1111", "plain"):
        out["prompt_syntax"] = fields["Prompt syntax"].strip().lower()
    if "Size" in fields:
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", fields["Size"])
        if m:
            out["width"], out["height"] = int(m.group(1)), int(m.group(2))
    if "Sampler" in fields:
        sampler = fields["Sampler"]
        if fields.get("Schedule type", "").lower() == "karras" and not sampler.endswith("Karras"):
            sampler += " Karras"
        by_label = {v.lower(): k for k, v in A1111_SAMPLERS.items()}
        by_label["pndm"] = "pndm"
        if sampler.lower() in by_label:
            out["scheduler"] = by_label[sampler.lower()]
        elif sampler.lower() in A1111_SAMPLERS:
            out["scheduler"] = sampler.lower()
    return out


def png_info(settings: dict[str, Any]) -> PngImagePlugin.PngInfo:
    """The two text chunks: ``parameters`` (A1111) and ``mlx-img2img`` (JSON of ``settings``)."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, format_parameters(settings))  # iTXt by itself when not Latin-1
    public = {k: v for k, v in settings.items() if k != "extra_fields"}
    info.add_text(SETTINGS_KEY, json.dumps(public, ensure_ascii=True, sort_keys=True))
    return info


def read_metadata(path: str | os.PathLike[str]) -> tuple[str | None, dict[str, Any] | None]:
    """(A1111 ``parameters`` text, our JSON settings) stored in an image; None for what is absent.

    Reads PNG text chunks, and the EXIF UserComment where A1111 keeps them in JPEG/WebP files.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageInputError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_pixels(path, im.size, MAX_INPUT_PIXELS)
                chunks = dict(getattr(im, "text", None) or {})
                chunks.update({k: v for k, v in im.info.items() if isinstance(v, str)})
                params = chunks.get(PARAMETERS_KEY) or _exif_user_comment(im)
                raw = chunks.get(SETTINGS_KEY)
    except Image.DecompressionBombError as e:  # Pillow's own, far larger, limit
        raise ImageInputError(_too_large(path, "too many pixels", MAX_INPUT_PIXELS)) from e
    except UnidentifiedImageError as e:
        raise ImageInputError(f"{path}: not an image, or not a format that can be read") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageInputError(f"{path}: truncated or corrupt image ({e})") from e
    for key, text in ((PARAMETERS_KEY, params), (SETTINGS_KEY, raw)):
        if text is not None and len(text) > MAX_METADATA_CHARS:
            raise ImageInputError(f"{path}: refused: its {key!r} text is {len(text):,} characters, over the "
                                  f"limit of {MAX_METADATA_CHARS:,} for stored settings")
    settings = None
    if raw:
        try:
            settings = json.loads(raw)
        except ValueError:
            settings = None
        except RecursionError as e:
            raise ImageInputError(f"{path}: refused: its {SETTINGS_KEY!r} settings are nested too deeply") from e
        if not isinstance(settings, dict):
            settings = None
    return params, settings


def _exif_user_comment(im: Image.Image) -> str | None:
    try:
        raw = im.getexif().get_ifd(0x8769).get(0x9286)  # Exif IFD, UserComment
    except Exception:  # noqa: BLE001 - malformed EXIF is no reason to fail
        return None
    if isinstance(raw, str):
        return raw or None
    if not isinstance(raw, bytes) or len(raw) <= 8:
        return None
    head, body = raw[:8], raw[8:]
    if head.startswith(b"UNICODE"):
        enc = "utf-16-be" if body[:1] == b"\x00" else "utf-16-le"
        return body.decode(enc, errors="replace").rstrip("\x00") or None
    return body.decode("utf-8", errors="replace").rstrip("\x00") or None


# -------------------------------------------------------------------------------------------- saving


def save_png(
    img: Image.Image,
    path: str | os.PathLike[str],
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``img`` as a PNG, atomically: a temporary file in the same folder, then a rename.

    A crash or Ctrl-C leaves either the old file or the new one, never half of one; the temporary file a
    ``kill -9`` leaves behind is removed by the next save of the same path. Without
    ``overwrite`` an existing file is never replaced (``FileExistsError``). ``settings``: the
    generation settings to store (``png_info``); None stores nothing.
    """
    path = Path(path)
    remove_stale_temp_files(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        # Locked while it is ours (until after the rename): another process sees that it is in use.
        fcntl.flock(fd, fcntl.LOCK_EX)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as an ordinary new file, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            pnginfo = png_info(settings) if settings is not None else None
            img.save(f, format="PNG", pnginfo=pnginfo)
            f.flush()
            os.fsync(f.fileno())
            if overwrite:
                os.replace(tmp, path)
            else:
                _rename_no_clobber(tmp, path)
    except OSError as e:
        if e.errno is not None and e.filename is None:  # a full disk, an I/O error: say which file
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def remove_stale_temp_files(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files that an earlier save of ``path`` left behind (killed with ``kill -9``,
    or the power went), and return them. A temporary file another process is writing is left alone: it
    holds a lock on it (released when that process ends, however it ends)."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(glob.escape(_temp_prefix(path)) + "*.tmp"):
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # a file so new that its writer may not have locked it yet is left for a later run
            if time.time() - os.fstat(fd).st_mtime > STALE_TEMP_SECONDS:
                os.unlink(tmp)
                removed.append(tmp)
        except OSError:  # locked: being written now; or already gone
            pass
        finally:
            os.close(fd)
    return removed


def _rename_no_clobber(tmp: str, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless ``path`` exists (checked atomically where links work)."""
    try:
        os.link(tmp, path)  # fails if path exists, so no race with another writer
    except FileExistsError:
        raise FileExistsError(f"{path} exists (use --overwrite to replace it)") from None
    except OSError:  # a file system without hard links
        if path.exists():
            raise FileExistsError(f"{path} exists (use --overwrite to replace it)") from None
        os.replace(tmp, path)
    else:
        os.unlink(tmp)


# ------------------------------------------------------------------------------------- contact sheet


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ImportError, TypeError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def contact_sheet(
    images: Sequence[Image.Image],
    labels: Sequence[str],
    columns: int | None = None,
    tile_max_side: int = 512,
    gap: int = 8,
) -> Image.Image:
    """The images side by side (up to 5 per row), each with its label below it, on white."""
    if not images or len(images) != len(labels):
        raise ValueError("contact_sheet needs as many labels as images, and at least one image")
    n = len(images)
    columns = columns or math.ceil(n / math.ceil(n / 5))
    rows = math.ceil(len(images) / columns)
    tiles = []
    for img in images:
        scale = min(1.0, tile_max_side / max(img.size))
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        tiles.append(resize_to(img.convert("RGB"), size))
    tw, th = max(t.width for t in tiles), max(t.height for t in tiles)
    font = _font(max(10, min(32, tw // 12)))
    text_h = font.getbbox("Ag")[3] if hasattr(font, "getbbox") else 11
    label_h = text_h + 2 * gap
    sheet = Image.new("RGB", (gap + columns * (tw + gap), gap + rows * (th + label_h)), WHITE)
    draw = ImageDraw.Draw(sheet)
    for i, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
        x = gap + (i % columns) * (tw + gap)
        y = gap + (i // columns) * (th + label_h)
        sheet.paste(tile, (x + (tw - tile.width) // 2, y + (th - tile.height) // 2))
        while len(label) > 3 and draw.textlength(label, font=font) > tw:
            label = label.rstrip(".")[:-1] + "..."
        lw = draw.textlength(label, font=font)
        draw.text((x + (tw - lw) / 2, y + th + gap // 2), label, fill=(0, 0, 0), font=font)
    return sheet
