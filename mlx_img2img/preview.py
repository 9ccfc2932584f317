"""Live previews of a running generation, made from each step's predicted clean latents (x0).

"cheap": a fixed linear map from the 4 latent channels to RGB per model family, at the latent's own
resolution (an eighth of the image's side). It costs one small matrix product per step, far below a UNet
step, so it can run at every step. The coefficients are the published least-squares fits of decoded
images against their latents (the same numbers ComfyUI and AUTOMATIC1111's "Approx cheap" use): they
are data about the families' VAEs, not about any one checkpoint, so a fine-tuned VAE previews slightly
off-colour. A model whose latents are not 4-channel gets no cheap preview.

"taesd": the tiny autoencoder's decoder (models/taesd.py) at full size, where its weights are in the Hugging
Face cache (madebyollin/taesd for SD 1.x/2.x, madebyollin/taesdxl for SDXL; `mlx-img2img download` does not
fetch them: `huggingface-cli download madebyollin/taesd` does); without them, the cheap preview.

When: `Pacer`. With an interval N, every N-th step (and the last). Without one (the default), whenever the
previews so far have taken at most `PREVIEW_BUDGET` of the image's time: the cheap preview then comes at
every step, and TAESD as often as it fits (on a Mac GPU about every step; on a CPU, where its convolutions
are slow, every several steps, as AUTOMATIC1111's default of a live preview every 10 steps). The first step
always gets one, so a client sees something at once.

Previews are made on the thread that runs the model (MLX arrays belong to the thread that made them) and
leave it as a PIL image.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from .events import StepEvent
from .models.taesd import TinyDecoder, load_tiny_decoder

PREVIEW_MODES = ("cheap", "taesd", "none")
PREVIEW_BUDGET = 0.05  # the share of an image's time that previews take when no interval is set
TAESD_REPOS = {False: "madebyollin/taesd", True: "madebyollin/taesdxl"}

# latent channel -> (R, G, B) contribution, for scaled latents (as the denoising loop holds them)
_SD_FACTORS = ((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
               (-0.2120, -0.2616, -0.7177))
_SDXL_FACTORS = ((0.3920, 0.4054, 0.4549), (-0.2634, -0.0196, 0.0653), (0.0568, 0.1687, -0.0755),
                 (-0.3112, -0.2359, -0.2076))

Previewer = Callable[[mx.array], Image.Image]  # NHWC latents (the first image is shown) -> a small RGB image


def cheap_factors(is_sdxl: bool) -> np.ndarray:
    """The (4, 3) latent-to-RGB map of a family; its output is in [-1, 1] like the VAE's."""
    return np.array(_SDXL_FACTORS if is_sdxl else _SD_FACTORS, dtype=np.float32)


def cheap_preview(x0: mx.array, factors: np.ndarray) -> Image.Image:
    """The first image of NHWC latents through the linear map, as a PIL image at the latents' size."""
    rgb = x0[0].astype(mx.float32) @ mx.array(factors)
    pixels = np.array((mx.clip(rgb / 2 + 0.5, 0.0, 1.0) * 255).round().astype(mx.uint8))
    return Image.fromarray(pixels)


def taesd_preview(x0: mx.array, decoder: TinyDecoder) -> Image.Image:
    """The first image of NHWC latents through the tiny autoencoder's decoder, at full size."""
    rgb = decoder(x0[:1].astype(mx.float32))[0]
    return Image.fromarray(np.array((mx.clip(rgb / 2 + 0.5, 0.0, 1.0) * 255).round().astype(mx.uint8)))


def cached_taesd(is_sdxl: bool) -> Path | None:
    """The family's tiny autoencoder in the Hugging Face cache, or None (never any network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(TAESD_REPOS[is_sdxl], local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def load_taesd(is_sdxl: bool) -> TinyDecoder | None:
    """The family's tiny decoder from the Hugging Face cache; None (with a warning) where it is not there."""
    folder = cached_taesd(is_sdxl)
    if folder is None:
        warnings.warn(f"--preview taesd: {TAESD_REPOS[is_sdxl]} is not in the Hugging Face cache; the cheap preview "
                      f"is used (huggingface-cli download {TAESD_REPOS[is_sdxl]})", stacklevel=2)
        return None
    return load_tiny_decoder(folder)


def make_previewer(mode: str, is_sdxl: bool, latent_channels: int, taesd: TinyDecoder | None = None
                   ) -> Previewer | None:
    """The previewer for a model, or None where there is none (mode "none", or latents it cannot map).
    "taesd" uses `taesd` (a loaded decoder for this family) and falls back to the cheap one without it."""
    if mode not in PREVIEW_MODES:
        raise ValueError(f"preview must be one of {', '.join(PREVIEW_MODES)}, not {mode!r}")
    if mode == "taesd" and taesd is not None and taesd.config.latent_channels == latent_channels:
        return lambda x0: taesd_preview(x0, taesd)
    if mode == "none" or latent_channels != 4:
        return None
    factors = cheap_factors(is_sdxl)
    return lambda x0: cheap_preview(x0, factors)


class Pacer:
    """Which steps of one image get a preview: every `every`-th one and the last, or (`every` None) those
    before which the previews made so far took at most `budget` of the time since the pacer started."""

    def __init__(self, every: int | None = None, budget: float = PREVIEW_BUDGET):
        if every is not None and every < 1:
            raise ValueError(f"a preview every {every} steps: give 1 or more")
        self.every, self.budget = every, budget
        self.start, self.spent = time.perf_counter(), 0.0

    def due(self, index: int, total: int) -> bool:
        if self.every is not None:
            return index % self.every == 0 or index == total
        return self.spent <= self.budget * (time.perf_counter() - self.start)

    def make(self, previewer: Previewer, x0: mx.array) -> Image.Image:
        """The preview of `x0`, its time counted against the budget."""
        start = time.perf_counter()
        image = previewer(x0)
        self.spent += time.perf_counter() - start
        return image


class PreviewWriter:
    """`run --preview-every N DIR`: the preview of every N-th step of each image written to DIR as
    NAME.stepK.png (NAME: the output's name), each file whole or not at all. An existing file is kept unless
    `overwrite`; the files skipped are counted in `kept`."""

    def __init__(self, previewer: Previewer, every: int, folder: Path, overwrite: bool = False):
        if every < 1:
            raise ValueError(f"--preview-every {every}: give 1 or more")
        self.previewer, self.every, self.folder, self.overwrite = previewer, every, Path(folder), overwrite
        self.folder.mkdir(parents=True, exist_ok=True)
        self.written: list[Path] = []
        self.kept: list[Path] = []

    def __call__(self, name: str, event: StepEvent) -> None:
        if event.index % self.every:
            return
        path = self.folder / f"{name}.step{event.index:03d}.png"
        if path.exists() and not self.overwrite:
            self.kept.append(path)
            return
        partial = path.with_name(f".{path.name}.partial")
        self.previewer(event.x0).save(partial, format="PNG", compress_level=1)
        os.replace(partial, path)
        self.written.append(path)
