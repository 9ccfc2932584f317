"""Checks for settings, shared by every door: the Python API's arguments, the request's fields (CLI flags,
values stored in a PNG, a server's JSON). Each returns the value normalised or raises a ValueError or
TypeError naming the setting, so a stored value and a flag are refused alike and with the same words."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 10_000  # far beyond what CLIP reads; keeps a hostile file from costing minutes


def whole(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """A whole number (numpy integers too; bools and floats are refused) within [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a whole number, not {value!r:.60}")
    value = int(value)
    _check_range(name, value, low, high)
    return value


def number(name: str, value: Any, low: float | None = None, high: float | None = None,
           open_low: bool = False, open_high: bool = False) -> float:
    """A finite real number (ints and numpy numbers too; bools and text are refused) within the range
    [low, high], or (low, high) at the open ends."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, not {value!r:.60}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: {value} is not a finite number")
    _check_range(name, value, low, high, open_low, open_high)
    return value


def _check_range(name: str, value: float, low: float | None, high: float | None, open_low: bool = False,
                 open_high: bool = False) -> None:
    """Raise naming the range as the command line's options do (click's wording: "0<=x<=1")."""
    below = low is not None and (value <= low if open_low else value < low)
    above = high is not None and (value >= high if open_high else value > high)
    if not (below or above):
        return
    lo, hi = "<" if open_low else "<=", "<" if open_high else "<="
    if low is not None and high is not None:
        span = f"{low}{lo}x{hi}{high}"
    elif low is not None:
        span = f"x{'>' if open_low else '>='}{low}"
    else:
        span = f"x{hi}{high}"
    raise ValueError(f"{name}: {value} is not in the range {span}.")


def seed(value: Any) -> int:
    return whole("seed", value, 0, MAX_SEED)


def text(name: str, value: Any, limit: int = MAX_PROMPT_CHARS) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be text, not {type(value).__name__}")
    if len(value) > limit:
        raise ValueError(f"{name} is {len(value)} characters long; at most {limit} are accepted")
    return value


def prompts(name: str, value: Any) -> list[str]:
    """A prompt, or a non-empty list of prompts, as a list."""
    if isinstance(value, str):
        return [text(name, value)]
    if isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        return [text(name, v) for v in value]
    raise TypeError(f"{name} must be a string or a non-empty list of strings, not {value!r:.60}")


def vae_tile(value: Any, name: str = "vae_tile") -> int | None:
    """None (automatic), 0 (never tile) or a multiple of 8 of at least 64."""
    if value is None:
        return None
    value = whole(name, value, 0)
    if value != 0 and (value < 64 or value % 8):
        raise ValueError(f"{name} must be 0 (never tile) or a multiple of 8 of at least 64, not {value}")
    return value


def pil_from_array(array: np.ndarray) -> Image.Image:
    """An HWC (or HW) array, uint8 or float in [0, 1], as an RGB image (as diffusers takes numpy images)."""
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"a numpy image must be HWC with 1, 3 or 4 channels, not shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("a float numpy image must not contain NaN or infinite values")
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        raise TypeError(f"a numpy image must be uint8 or float in [0, 1], not {array.dtype}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array[..., :3]), "RGB")
