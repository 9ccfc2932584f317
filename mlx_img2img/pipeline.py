"""The img2img pipeline: text-to-image that starts part-way down a sliced noise schedule.

Stages, each public: encode_prompt -> prepare_image -> encode_image -> schedule -> denoise (a generator
that yields the latents after every step) -> decode. `__call__` runs them in order.
Latents are NHWC inside; arrays that mirror diffusers' (an explicit `noise`) are NCHW.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import mlx.core as mx
import numpy as np
from PIL import Image

from .errors import ModelFormatError
from .models.clip import CLIPTextConfig, CLIPTextModel
from .models.unet import UNet2DConditionModel, UNetConfig
from .models.vae import AutoencoderKL, VAEConfig
from .schedulers import Scheduler, make_scheduler
from .tokenizer import CLIPTokenizer
from .weights import load_module, load_weights, parse_dtype, read_json, resolve_model

POSTERIORS = ("sample", "mean")


class NoiseSource(Protocol):
    """Supplies every random draw of a generation, in diffusers' order: the VAE posterior sample,
    the start noise, then one draw per ancestral step. Shapes are NCHW."""

    def normal(self, shape: tuple[int, ...]) -> mx.array: ...


class SeededNoise:
    """Standard normal draws from MLX's counter-based generator: the same seed gives the same noise
    on every machine and backend."""

    def __init__(self, seed: int):
        self.key = mx.random.key(seed)

    def normal(self, shape: tuple[int, ...]) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return mx.random.normal(shape, key=sub)


def nchw_to_nhwc(x: mx.array) -> mx.array:
    return x.transpose(0, 2, 3, 1)


@dataclass
class Conditioning:
    """Text conditioning for the UNet; with guidance the batch is [negative..., positive...]."""

    context: mx.array
    guided: bool


@dataclass
class Img2ImgResult:
    images: list[Image.Image]
    seed: int | None  # None when the caller supplied the noise source
    latents: mx.array  # the final latents, NHWC


def to_pil(image: Image.Image | str | os.PathLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    from .images import load_image

    return load_image(image)


class Img2ImgPipeline:
    def __init__(self, *, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel, unet: UNet2DConditionModel,
                 vae: AutoencoderKL, scheduler_config: dict, dtype: mx.Dtype = mx.float32,
                 model_name: str = "model"):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.scheduler_config = scheduler_config
        self.dtype = dtype
        self.model_name = model_name
        self.default_scheduler = make_scheduler(None, scheduler_config).name

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, dtype: str = "float32",
                        offline: bool | None = None) -> Img2ImgPipeline:
        """Load a diffusers-layout model from a local folder, a hub repo id or a preset name."""
        mx_dtype = parse_dtype(dtype)
        folder = resolve_model(name_or_path, dtype=dtype, offline=offline)
        missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (folder / c).is_dir()]
        if missing:
            raise ModelFormatError(f"{folder} is not a complete diffusers model: no {', '.join(missing)} folder")
        unet_config = UNetConfig.from_dict(read_json(folder / "unet" / "config.json"))
        vae_config = VAEConfig.from_dict(read_json(folder / "vae" / "config.json"))
        text_config = CLIPTextConfig.from_dict(read_json(folder / "text_encoder" / "config.json"))
        # Half-precision VAEs overflow where the config asks for an upcast; it is small, so keep it in float32.
        vae_dtype = mx.float32 if vae_config.force_upcast else mx_dtype
        parts = {
            "unet": (UNet2DConditionModel(unet_config), mx_dtype, ""),
            "vae": (AutoencoderKL(vae_config), vae_dtype, ""),
            "text_encoder": (CLIPTextModel(text_config), mx_dtype, "text_model."),
        }
        for name, (module, part_dtype, prefix) in parts.items():
            load_module(module, load_weights(folder / name, part_dtype), f"{folder / name}", prefix)
            module.eval()
        return cls(tokenizer=CLIPTokenizer.from_folder(folder / "tokenizer"), text_encoder=parts["text_encoder"][0],
                   unet=parts["unet"][0], vae=parts["vae"][0],
                   scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"),
                   dtype=mx_dtype, model_name=_model_name(name_or_path, folder))

    # ------------------------------------------------------------------------------------------ stages

    def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                      num_images_per_prompt: int = 1, guidance_scale: float = 7.5) -> Conditioning:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        guided = guidance_scale > 1.0
        texts = prompts
        if guided:
            negatives = negative_prompt or ""
            negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
            texts = negatives + prompts
        ids = mx.array(self.tokenizer.encode(texts))
        context = self.text_encoder(ids).last_hidden_state.astype(self.dtype)
        context = mx.repeat(context, num_images_per_prompt, axis=0)
        return Conditioning(context=context, guided=guided)

    @property
    def scale_factor(self) -> int:
        return self.vae.config.scale_factor

    def prepare_image(self, image: Image.Image | str | os.PathLike) -> mx.array:
        """An image as a (1, H, W, 3) array in [-1, 1]; sizes are floored to a multiple of the VAE's
        scale factor with a Lanczos resize, as diffusers does."""
        pil = to_pil(image)
        f = self.scale_factor
        w, h = pil.width - pil.width % f, pil.height - pil.height % f
        if w == 0 or h == 0:
            raise ValueError(f"image of {pil.width}x{pil.height} is smaller than {f}x{f} pixels")
        if (w, h) != pil.size:
            pil = pil.resize((w, h), Image.Resampling.LANCZOS)
        array = np.asarray(pil, dtype=np.float32) / 127.5 - 1.0
        return mx.array(array)[None]

    def encode_image(self, image: mx.array, posterior: str = "sample",
                     noise_source: NoiseSource | None = None) -> mx.array:
        """(1, H, W, 3) image in [-1, 1] -> scaled latents (1, H/f, W/f, C)."""
        if posterior not in POSTERIORS:
            raise ValueError(f"posterior must be one of {POSTERIORS}, not {posterior!r}")
        mean, std = self.vae.encode(image.astype(_dtype_of(self.vae)))
        latents = mean
        if posterior == "sample":
            if noise_source is None:
                raise ValueError("posterior='sample' needs a noise source")
            latents = mean + std * nchw_to_nhwc(noise_source.normal(_nchw(mean.shape))).astype(mean.dtype)
        config = self.vae.config
        return (latents - (config.shift_factor or 0.0)) * config.scaling_factor

    def schedule(self, num_inference_steps: int, strength: float,
                 scheduler: str | None = None) -> tuple[Scheduler, int]:
        """The sampler and the index of its first kept timestep: img2img runs the tail of the schedule."""
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a whole number of at least 1, not {num_inference_steps!r}")
        sampler = make_scheduler(scheduler, self.scheduler_config)
        sampler.set_timesteps(num_inference_steps)
        return sampler, sampler.img2img_start(num_inference_steps, strength)

    def add_noise(self, latents: mx.array, sampler: Scheduler, start: int, batch: int,
                  noise: mx.array | np.ndarray | None = None,
                  noise_source: NoiseSource | None = None) -> mx.array:
        """Noise the image latents to the first kept timestep, repeated for the batch."""
        latents = mx.repeat(latents, batch // latents.shape[0], axis=0)
        shape = _nchw(latents.shape)
        if noise is None:
            noise = noise_source.normal(shape)
        noise = mx.array(noise)
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have the NCHW shape {shape}, not {tuple(noise.shape)}")
        return sampler.add_noise(latents, nchw_to_nhwc(noise).astype(latents.dtype), start)

    def denoise(self, latents: mx.array, conditioning: Conditioning, sampler: Scheduler, start: int,
                guidance_scale: float = 7.5, noise_source: NoiseSource | None = None) -> Iterator[mx.array]:
        """Run the sampler from timestep index `start`; yield the (evaluated) latents after each step."""
        x = latents.astype(self.dtype)
        for i in range(start, len(sampler.timesteps)):
            model_in = sampler.scale_model_input(x, i)
            if conditioning.guided:
                model_in = mx.concatenate([model_in, model_in], axis=0)
            t = mx.array([float(sampler.timesteps[i])], dtype=mx.float32)
            prediction = self.unet(model_in.astype(self.dtype), t, conditioning.context)
            if conditioning.guided:
                uncond, cond = mx.split(prediction, 2, axis=0)
                prediction = uncond + guidance_scale * (cond - uncond)
            step_noise = None
            if sampler.stochastic:
                step_noise = nchw_to_nhwc(noise_source.normal(_nchw(x.shape))).astype(x.dtype)
            x = sampler.step(prediction, i, x, step_noise).astype(self.dtype)
            mx.eval(x)
            yield x

    def decode(self, latents: mx.array) -> list[Image.Image]:
        config = self.vae.config
        z = latents.astype(_dtype_of(self.vae)) / config.scaling_factor + (config.shift_factor or 0.0)
        images = mx.clip(self.vae.decode(z) / 2 + 0.5, 0.0, 1.0)
        pixels = np.array((images.astype(mx.float32) * 255).round().astype(mx.uint8))
        return [Image.fromarray(p) for p in pixels]

    # ------------------------------------------------------------------------------------------ one call

    def __call__(self, prompt: str | Sequence[str], image: Image.Image | str | os.PathLike, strength: float = 0.8,
                 num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: str | Sequence[str] | None = None, num_images_per_prompt: int = 1,
                 seed: int | None = None, scheduler: str | None = None,
                 noise: mx.array | np.ndarray | None = None, posterior: str = "sample",
                 progress: Callable[[int, int], None] | None = None,
                 noise_source: NoiseSource | None = None) -> Img2ImgResult:
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, not {num_images_per_prompt}")
        sampler, start = self.schedule(num_inference_steps, strength, scheduler)
        if noise_source is None:
            seed = secrets.randbelow(2**32) if seed is None else int(seed)
            noise_source = SeededNoise(seed)
        else:
            seed = None
        conditioning = self.encode_prompt(prompt, negative_prompt, num_images_per_prompt, guidance_scale)
        batch = conditioning.context.shape[0] // (2 if conditioning.guided else 1)
        latents = self.encode_image(self.prepare_image(image), posterior, noise_source)
        latents = self.add_noise(latents, sampler, start, batch, noise, noise_source)
        total = len(sampler.timesteps) - start
        steps = self.denoise(latents, conditioning, sampler, start, guidance_scale, noise_source)
        for done, step_latents in enumerate(steps, start=1):
            latents = step_latents
            if progress is not None:
                progress(done, total)
        return Img2ImgResult(images=self.decode(latents), seed=seed, latents=latents)


def _nchw(nhwc_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    b, h, w, c = nhwc_shape
    return (b, c, h, w)


def _dtype_of(module) -> mx.Dtype:
    return module.decoder.conv_in.weight.dtype


def _model_name(name_or_path: str | os.PathLike, folder: Path) -> str:
    path = Path(name_or_path).expanduser()
    return path.resolve().name if path.is_dir() else str(name_or_path)
