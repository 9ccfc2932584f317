"""Where a generation's randomness comes from: one noise source supplies every draw, in diffusers' order."""

from __future__ import annotations

from typing import Protocol

import mlx.core as mx
import numpy as np

from .torch_rng import TorchGenerator

RNGS = ("mlx", "torch")


class NoiseSource(Protocol):
    """Supplies every random draw of a generation, in diffusers' order: the VAE posterior sample,
    the start noise, then one draw per ancestral step (inpainting: the image's posterior sample, the
    start noise, the masked image's posterior sample, then the steps). Shapes are NCHW."""

    def normal(self, shape: tuple[int, ...]) -> mx.array: ...


class SeededNoise:
    """Standard normal draws from MLX's counter-based generator: the same seed gives the same noise
    (up to float rounding) on every machine and backend."""

    def __init__(self, seed: int):
        self.key = mx.random.key(seed)

    def normal(self, shape: tuple[int, ...]) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return mx.random.normal(shape, key=sub)


def seeded_source(seed: int, rng: str = "mlx") -> NoiseSource:
    """The noise source of a seed: MLX's generator ("mlx"), or PyTorch's CPU generator ("torch": the noise
    of diffusers with `generator=torch.Generator("cpu").manual_seed(seed)`, of AUTOMATIC1111 and ComfyUI)."""
    if rng not in RNGS:
        raise ValueError(f"rng must be one of {', '.join(RNGS)}, not {rng!r:.40}")
    return TorchGenerator(seed) if rng == "torch" else SeededNoise(seed)


class PerImageNoise:
    """One seeded source per image of a batch, as AUTOMATIC1111 seeds a batch (seed, seed+1, ...) and as
    diffusers draws given a list of generators: image i's draws all come from source i, so every image of
    the batch is the one its seed gives alone."""

    def __init__(self, sources: list[NoiseSource]):
        self.sources = sources

    def normal(self, shape: tuple[int, ...]) -> mx.array:
        if shape[0] != len(self.sources):
            raise ValueError(f"a draw for {shape[0]} images from {len(self.sources)} per-image seeds")
        return mx.concatenate([source.normal((1, *shape[1:])) for source in self.sources])


def per_image_source(seeds: list[int], rng: str = "mlx") -> PerImageNoise:
    """The noise of a batch whose images each have their own seed (see PerImageNoise)."""
    return PerImageNoise([seeded_source(seed, rng) for seed in seeds])


def nchw_to_nhwc(x: mx.array) -> mx.array:
    return x.transpose(0, 2, 3, 1)


class Draws:
    """A generation's draws, by purpose. An explicit start noise (an NCHW array, e.g. another
    implementation's draw) replaces that one draw; the others still come from the source."""

    def __init__(self, source: NoiseSource | None, start_noise: mx.array | np.ndarray | None = None):
        self.source = source
        self.start_noise = start_noise

    def _draw(self, like: mx.array) -> mx.array:
        if self.source is None:
            raise ValueError("this generation needs random draws but has no noise source")
        b, h, w, c = like.shape
        return nchw_to_nhwc(self.source.normal((b, c, h, w))).astype(like.dtype)

    @property
    def per_image(self) -> int | None:
        """The batch size when each image has its own source (PerImageNoise), else None."""
        return len(self.source.sources) if isinstance(self.source, PerImageNoise) else None

    def posterior(self, like: mx.array) -> mx.array:
        """The VAE posterior sample's standard-normal draw, shaped like the NHWC latents `like`."""
        return self._draw(like)

    def start(self, like: mx.array) -> mx.array:
        """The noise added at the first kept timestep."""
        if self.start_noise is None:
            return self._draw(like)
        b, h, w, c = like.shape
        if tuple(self.start_noise.shape) != (b, c, h, w):
            raise ValueError(f"noise must have the NCHW shape {(b, c, h, w)}, not {tuple(self.start_noise.shape)}")
        return nchw_to_nhwc(mx.array(self.start_noise)).astype(like.dtype)

    def step(self, like: mx.array) -> mx.array:
        """An ancestral sampler's fresh noise for one step."""
        return self._draw(like)

    def fill(self, like: mx.array) -> mx.array:
        """Inpainting's "latent_noise" fill of the masked area (after the posterior samples, before the start
        noise; diffusers has no such draw)."""
        return self._draw(like)
