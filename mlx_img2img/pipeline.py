"""The img2img pipeline: text-to-image that starts part-way down a sliced noise schedule.

Stages, each public: encode_prompt -> prepare_image -> encode_image -> schedule -> denoise (a generator
that yields the latents after every step) -> decode. `__call__` runs them in order.
Latents are NHWC inside; arrays that mirror diffusers' (an explicit `noise`) are NCHW.
"""

from __future__ import annotations

import os
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from .errors import ModelFormatError
from .models.clip import CLIPTextConfig, CLIPTextModel
from .models.unet import UNet2DConditionModel, UNetConfig, guidance_embedding
from .models.vae import AutoencoderKL, VAEConfig
from .parallel import compile_if_it_pays, map_batch
from .schedulers import Scheduler, make_scheduler
from .tiling import map_tiles
from .tokenizer import CLIPTokenizer
from .weights import load_module, load_weights, parse_dtype, read_json, resolve_model

POSTERIORS = ("sample", "mean")
AUTO_TILE_PIXELS = 1536 * 1536  # above this the VAE runs in tiles (its attention grows with the square)
DEFAULT_TILE = 512
# In low-memory mode: a 512x512 float32 VAE decode peaks at 7.3 GiB whole and 2.5 GiB in 256-pixel tiles
# (MLX CPU backend; measured), at twice the time.
LOW_MEMORY_TILE = 256


class NoiseSource(Protocol):
    """Supplies every random draw of a generation, in diffusers' order: the VAE posterior sample,
    the start noise, then one draw per ancestral step. Shapes are NCHW."""

    def normal(self, shape: tuple[int, ...]) -> mx.array: ...


class SeededNoise:
    """Standard normal draws from MLX's counter-based generator: the same seed gives the same noise
    (up to float rounding) on every machine and backend."""

    def __init__(self, seed: int):
        self.key = mx.random.key(seed)

    def normal(self, shape: tuple[int, ...]) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return mx.random.normal(shape, key=sub)


def nchw_to_nhwc(x: mx.array) -> mx.array:
    return x.transpose(0, 2, 3, 1)


def draw_noise(noise_source: NoiseSource, like: mx.array) -> mx.array:
    """A standard-normal draw shaped like the NHWC array `like`, drawn in NCHW as diffusers draws it."""
    b, h, w, c = like.shape
    return nchw_to_nhwc(noise_source.normal((b, c, h, w))).astype(like.dtype)


@dataclass
class Conditioning:
    """Text conditioning for the UNet; with guidance the batch is [negative..., positive...].
    SDXL adds the pooled text embedding and, once the image size is known, the micro-conditioning ids."""

    context: mx.array
    guided: bool
    pooled: mx.array | None = None
    time_ids: mx.array | None = None
    timestep_cond: mx.array | None = None  # LCM-distilled UNets: the guidance scale, embedded

    @property
    def batch(self) -> int:
        """Images generated: the context's batch without its negative half."""
        return self.context.shape[0] // (2 if self.guided else 1)


@dataclass
class Schedule:
    """The sampler and the slice of its timesteps this run takes: indices [start, end)."""

    sampler: Scheduler
    start: int
    end: int

    @property
    def steps(self) -> int:
        return self.end - self.start


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
    """Stable Diffusion 1.x/2.x and SDXL (base and refiner) image-to-image on MLX."""

    def __init__(self, *, tokenizers: list[CLIPTokenizer], text_encoders: list[CLIPTextModel],
                 unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler_config: dict,
                 dtype: mx.Dtype = mx.float32, model_name: str = "model", pipeline_config: dict | None = None):
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.unet = unet
        self.vae = vae
        self.scheduler_config = scheduler_config
        self.dtype = dtype
        self.model_name = model_name
        pipeline_config = pipeline_config or {}
        self.is_sdxl = unet.config.is_sdxl
        self.force_zeros_for_empty_prompt = bool(pipeline_config.get("force_zeros_for_empty_prompt", self.is_sdxl))
        self.requires_aesthetics_score = bool(pipeline_config.get("requires_aesthetics_score", False))
        self.default_scheduler = make_scheduler(None, scheduler_config).name
        # VAE tiling, in pixels: None tiles only images above AUTO_TILE_PIXELS; 0 never tiles.
        self.vae_tile_size: int | None = None
        self.low_memory = False  # release text encoders after use, always tile the VAE
        self._reload_text_encoders: Callable[[], list[CLIPTextModel]] | None = None
        self._prompt_cache: dict[tuple, tuple[mx.array, mx.array]] = {}
        self._predict = compile_if_it_pays(self._guided_prediction)

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, dtype: str = "float32",
                        offline: bool | None = None, quantize: int | None = None,
                        low_memory: bool = False) -> Img2ImgPipeline:
        """Load a diffusers-layout model from a local folder, a hub repo id or a preset name.
        `quantize` (8 or 4) stores the UNet's and text encoders' linear layers in that many bits;
        `low_memory` frees the text encoders between prompts and decodes/encodes the VAE in tiles."""
        if quantize not in (None, 4, 8):
            raise ValueError(f"quantize must be 4 or 8 bits, not {quantize}")
        mx_dtype = parse_dtype(dtype)
        folder = resolve_model(name_or_path, dtype=dtype, offline=offline)
        # SD 1.x/2.x and SDXL base have text_encoder/; SDXL base and refiner have text_encoder_2/.
        encoder_names = [n for n in ("text_encoder", "text_encoder_2") if (folder / n).is_dir()]
        tokenizer_names = [n.replace("text_encoder", "tokenizer") for n in encoder_names]
        missing = [c for c in ("unet", "vae", "scheduler") if not (folder / c).is_dir()]
        missing += [] if encoder_names else ["text_encoder"]
        missing += [n for n in tokenizer_names if not (folder / n).is_dir()]
        if missing:
            raise ModelFormatError(f"{folder} is not a complete diffusers model: no {', '.join(missing)} folder")
        unet = UNet2DConditionModel(UNetConfig.from_dict(read_json(folder / "unet" / "config.json")))
        vae = AutoencoderKL(VAEConfig.from_dict(read_json(folder / "vae" / "config.json")))
        # As diffusers: the SDXL VAE overflows in half precision and asks for an upcast (force_upcast),
        # which its SDXL pipelines honour; SD 1.x/2.x pipelines run the VAE in the model's dtype.
        vae_dtype = mx.float32 if vae.config.force_upcast and unet.config.is_sdxl else mx_dtype
        _load(unet, folder / "unet", mx_dtype, quantize=quantize)
        _load(vae, folder / "vae", vae_dtype)

        def load_text_encoders() -> list[CLIPTextModel]:
            return [_load(CLIPTextModel(CLIPTextConfig.from_dict(read_json(folder / n / "config.json"))),
                          folder / n, mx_dtype, "text_model.", quantize) for n in encoder_names]

        index = folder / "model_index.json"
        pipe = cls(tokenizers=[CLIPTokenizer.from_folder(folder / n) for n in tokenizer_names],
                   text_encoders=[] if low_memory else load_text_encoders(), unet=unet, vae=vae,
                   scheduler_config=read_json(folder / "scheduler" / "scheduler_config.json"),
                   dtype=mx_dtype, model_name=_model_name(name_or_path),
                   pipeline_config=read_json(index) if index.exists() else {})
        pipe._reload_text_encoders = load_text_encoders
        pipe.low_memory = low_memory
        return pipe

    def release_text_encoders(self) -> None:
        """Free the text encoders' memory once prompts are encoded. A pipeline made by from_pretrained
        loads them again (from disk) when it meets a prompt it has not encoded yet."""
        self.text_encoders = []
        mx.clear_cache()

    # ------------------------------------------------------------------------------------------ stages

    def _embed(self, texts: list[str]) -> tuple[mx.array, mx.array]:
        """Context (the encoders' states concatenated) and pooled embedding (from the last encoder).
        Remembered per list of texts, so a series with one prompt encodes it once."""
        key = tuple(texts)
        if key in self._prompt_cache:
            return self._prompt_cache[key]
        if not self.text_encoders:
            if self._reload_text_encoders is None:
                raise RuntimeError("the text encoders were released; load the pipeline again to encode prompts")
            self.text_encoders = self._reload_text_encoders()
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            out = encoder(mx.array(tokenizer.encode(texts)))
            states.append(out.penultimate_hidden_state if self.is_sdxl else out.last_hidden_state)
            pooled = out.pooled
        result = mx.concatenate(states, axis=-1).astype(self.dtype), pooled.astype(self.dtype)
        mx.eval(result)
        self._prompt_cache = {key: result}  # the latest only: a series repeats one prompt
        if self.low_memory:
            self.release_text_encoders()
        return result

    def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                      num_images_per_prompt: int = 1, guidance_scale: float = 7.5,
                      classifier_free: bool = True) -> Conditioning:
        """Text conditioning. Classifier-free guidance (a negative half of the batch) when guidance_scale > 1,
        unless `classifier_free` is off (LCM) or the UNet takes the guidance scale as an embedding."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        embedded_guidance = self.unet.config.time_cond_proj_dim is not None
        guided = classifier_free and guidance_scale > 1.0 and not embedded_guidance
        zero_negative = guided and negative_prompt is None and self.force_zeros_for_empty_prompt
        texts = prompts
        if guided and not zero_negative:
            negatives = negative_prompt or ""
            negatives = [negatives] * len(prompts) if isinstance(negatives, str) else list(negatives)
            if len(negatives) != len(prompts):
                raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
            texts = negatives + prompts  # one text-encoder call for both halves
        context, pooled = self._embed(texts)
        if zero_negative:  # SDXL base: an absent negative prompt is zeros, not the encoded empty string
            context = mx.concatenate([mx.zeros_like(context), context])
            pooled = mx.concatenate([mx.zeros_like(pooled), pooled])
        context = mx.repeat(context, num_images_per_prompt, axis=0)
        timestep_cond = None
        if embedded_guidance:
            scale = mx.full((context.shape[0],), guidance_scale, dtype=mx.float32)
            timestep_cond = guidance_embedding(scale, self.unet.config.time_cond_proj_dim)
        return Conditioning(context=context, guided=guided, timestep_cond=timestep_cond,
                            pooled=mx.repeat(pooled, num_images_per_prompt, axis=0) if self.is_sdxl else None)

    def add_time_ids(self, conditioning: Conditioning, height: int, width: int, aesthetic_score: float = 6.0,
                     negative_aesthetic_score: float = 2.5) -> Conditioning:
        """SDXL's micro-conditioning for an image of this size: original size, crop top-left (0, 0), and
        the target size, or for the refiner the aesthetic score."""
        if not self.is_sdxl:
            return conditioning
        size, crop = [height, width], [0, 0]
        if self.requires_aesthetics_score:
            positive, negative = size + crop + [aesthetic_score], size + crop + [negative_aesthetic_score]
        else:
            positive = negative = size + crop + size
        batch = conditioning.batch
        rows = ([negative] * batch if conditioning.guided else []) + [positive] * batch
        conditioning.time_ids = mx.array(rows, dtype=mx.float32)
        return conditioning

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
        f = self.scale_factor
        tile = self.vae_tile_for(image.shape[1] * image.shape[2])
        def moments_of(pixels: mx.array) -> mx.array:
            return mx.concatenate(self.vae.encode(pixels), axis=-1)

        moments = self._run_vae(lambda: map_tiles(moments_of, image.astype(_vae_dtype(self.vae)), tile,
                                                  tile // 8, 1 / f, align=f))
        mean, std = mx.split(moments, 2, axis=-1)
        latents = mean
        if posterior == "sample":
            if noise_source is None:
                raise ValueError("posterior='sample' needs a noise source")
            latents = mean + std * draw_noise(noise_source, mean)
        config = self.vae.config
        return (latents - (config.shift_factor or 0.0)) * config.scaling_factor

    def schedule(self, num_inference_steps: int, strength: float, scheduler: str | None = None,
                 denoising_start: float | None = None, denoising_end: float | None = None) -> Schedule:
        """The sampler and the slice of its timesteps to run. Img2img runs the tail the strength picks;
        `denoising_end` stops early and `denoising_start` begins late (in fractions of the training
        schedule), for SDXL's base-to-refiner handoff, as diffusers does."""
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a whole number of at least 1, not {num_inference_steps!r}")
        for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be between 0 and 1 (exclusive), not {value}")
        if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
            raise ValueError(f"denoising_start ({denoising_start}) must be below denoising_end ({denoising_end})")
        sampler = make_scheduler(scheduler, self.scheduler_config)
        train = sampler.config["num_train_timesteps"]
        if denoising_start is None:
            start = sampler.img2img_start(num_inference_steps, strength)
        else:  # the strength is ignored: the cut-off decides where to begin
            sampler.set_timesteps(num_inference_steps)
            cutoff = int(round(train - denoising_start * train))
            start = len(sampler.timesteps) - int((sampler.timesteps < cutoff).sum())
        end = len(sampler.timesteps)
        if denoising_end is not None:
            cutoff = int(round(train - denoising_end * train))
            end = start + int((sampler.timesteps[start:] >= cutoff).sum())
        if end <= start:
            raise ValueError(f"no denoising step falls between denoising_start={denoising_start} and "
                             f"denoising_end={denoising_end} with {num_inference_steps} steps; use more steps")
        return Schedule(sampler, start, end)

    def add_noise(self, latents: mx.array, schedule: Schedule, batch: int,
                  noise: mx.array | np.ndarray | None = None,
                  noise_source: NoiseSource | None = None) -> mx.array:
        """Noise the image latents to the first kept timestep, repeated for the batch."""
        latents = mx.repeat(latents, batch // latents.shape[0], axis=0)
        if noise is None:
            noise = draw_noise(noise_source, latents)
        else:
            b, h, w, c = latents.shape
            if tuple(noise.shape) != (b, c, h, w):
                raise ValueError(f"noise must have the NCHW shape {(b, c, h, w)}, not {tuple(noise.shape)}")
            noise = nchw_to_nhwc(mx.array(noise)).astype(latents.dtype)
        return schedule.sampler.add_noise(latents, noise, schedule.start)

    def denoise(self, latents: mx.array, conditioning: Conditioning, schedule: Schedule,
                guidance_scale: float = 7.5, noise_source: NoiseSource | None = None) -> Iterator[mx.array]:
        """Run the scheduled steps; yield the (evaluated) latents after each one."""
        sampler = schedule.sampler
        x = latents.astype(self.dtype)
        for i in range(schedule.start, schedule.end):
            model_in = sampler.scale_model_input(x, i).astype(self.dtype)
            t = mx.array([float(sampler.timesteps[i])], dtype=mx.float32)
            prediction = self._predict(model_in, t, conditioning.context, conditioning.pooled,
                                       conditioning.time_ids, conditioning.timestep_cond,
                                       mx.array(guidance_scale, dtype=self.dtype), conditioning.guided)
            step_noise = None
            if sampler.stochastic:
                step_noise = draw_noise(noise_source, x)
            x = sampler.step(prediction, i, x, step_noise).astype(self.dtype)
            mx.eval(x)
            yield x

    def vae_tile_for(self, pixels: int) -> int:
        """VAE tile side in pixels for an image of this many pixels; a huge value means one tile."""
        if self.vae_tile_size == 0:
            return 1 << 30
        if self.vae_tile_size:
            return self.vae_tile_size
        if self.low_memory:
            return LOW_MEMORY_TILE
        if pixels > AUTO_TILE_PIXELS:
            return DEFAULT_TILE
        return 1 << 30

    def _guided_prediction(self, x: mx.array, t: mx.array, context: mx.array, pooled: mx.array | None,
                           time_ids: mx.array | None, timestep_cond: mx.array | None, guidance_scale: mx.array,
                           guided: bool) -> mx.array:
        """The UNet's prediction, with both halves of classifier-free guidance in one batched call.
        Compiled once per shape (mx.compile), which fuses the many small element-wise kernels."""
        if guided:
            x = mx.concatenate([x, x], axis=0)
        prediction = map_batch(self.unet, x.shape[0], x, t, context, pooled, time_ids, timestep_cond)
        if guided:
            uncond, cond = mx.split(prediction, 2, axis=0)
            prediction = uncond + guidance_scale * (cond - uncond)
        return prediction

    def decode(self, latents: mx.array) -> list[Image.Image]:
        config = self.vae.config
        z = latents.astype(mx.float32) / config.scaling_factor + (config.shift_factor or 0.0)
        f = self.scale_factor
        tile = self.vae_tile_for(z.shape[1] * z.shape[2] * f * f) // f
        decode = partial(map_batch, self.vae.decode, z.shape[0])  # several images: one per core on a CPU
        decoded = self._run_vae(lambda: map_tiles(decode, z.astype(_vae_dtype(self.vae)), tile, tile // 8, f))
        images = mx.clip(decoded / 2 + 0.5, 0.0, 1.0)
        pixels = np.array((images.astype(mx.float32) * 255).round().astype(mx.uint8))
        return [Image.fromarray(p) for p in pixels]

    def _run_vae(self, run: Callable[[], mx.array]) -> mx.array:
        """Run a VAE pass. A half-precision VAE whose output overflows (inf or NaN: black images) is moved
        to float32 for good, with a warning, and the pass is run again."""
        out = run()
        if _vae_dtype(self.vae) != mx.float32 and not mx.all(mx.isfinite(out)).item():
            warnings.warn("the VAE overflowed in half precision; it runs in float32 from now on", stacklevel=3)
            self.vae.set_dtype(mx.float32)
            out = run()
        return out

    # ------------------------------------------------------------------------------------------ one call

    def __call__(self, prompt: str | Sequence[str], image: Image.Image | str | os.PathLike | mx.array,
                 strength: float = 0.8, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: str | Sequence[str] | None = None, num_images_per_prompt: int = 1,
                 seed: int | None = None, scheduler: str | None = None,
                 noise: mx.array | np.ndarray | None = None, posterior: str = "sample",
                 progress: Callable[[int, int], None] | None = None,
                 noise_source: NoiseSource | None = None,
                 denoising_start: float | None = None, denoising_end: float | None = None,
                 aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
                 decode: bool = True) -> Img2ImgResult:
        """Transform `image` under `prompt`. `image` may also be latents (an NHWC array, e.g. the
        `latents` of a base run with `denoising_end` and `decode=False`), which are used as they are."""
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, not {num_images_per_prompt}")
        schedule = self.schedule(num_inference_steps, strength, scheduler, denoising_start, denoising_end)
        if noise_source is None:
            seed = secrets.randbelow(2**32) if seed is None else int(seed)
            noise_source = SeededNoise(seed)
        else:
            seed = None
        # LCM samples without classifier-free guidance, as LatentConsistencyModelImg2ImgPipeline does.
        conditioning = self.encode_prompt(prompt, negative_prompt, num_images_per_prompt, guidance_scale,
                                          classifier_free=schedule.sampler.name != "lcm")
        batch = conditioning.batch
        if isinstance(image, mx.array):
            latents = image
        else:
            latents = self.encode_image(self.prepare_image(image), posterior, noise_source)
        f = self.scale_factor
        self.add_time_ids(conditioning, latents.shape[1] * f, latents.shape[2] * f,
                          aesthetic_score, negative_aesthetic_score)
        if denoising_start is None:  # a handed-over latent is already noised to where it stopped
            latents = self.add_noise(latents, schedule, batch, noise, noise_source)
        else:
            latents = mx.repeat(latents, batch // latents.shape[0], axis=0)
        steps = self.denoise(latents, conditioning, schedule, guidance_scale, noise_source)
        for done, step_latents in enumerate(steps, start=1):
            latents = step_latents
            if progress is not None:
                progress(done, schedule.steps)
        return Img2ImgResult(images=self.decode(latents) if decode else [], seed=seed, latents=latents)


def _load(module: nn.Module, folder: Path, dtype: mx.Dtype, prefix: str = "",
          quantize: int | None = None) -> nn.Module:
    load_module(module, load_weights(folder, dtype), str(folder), prefix)
    if quantize:
        quantize_linear_layers(module, quantize)
    module.eval()
    return module


def quantize_linear_layers(module: nn.Module, bits: int) -> None:
    """Store linear layers in `bits`-bit groups (MLX quantized matmul); convolutions stay as they are."""
    def group(m: nn.Module) -> int | None:
        dims = m.weight.shape[-1]
        return next((g for g in (64, 32) if dims % g == 0), None)

    nn.quantize(module, bits=bits,
                class_predicate=lambda _, m: isinstance(m, nn.Linear) and group(m) is not None and (
                    {"group_size": group(m), "bits": bits}))


def _vae_dtype(vae: AutoencoderKL) -> mx.Dtype:
    return vae.decoder.conv_in.weight.dtype


def _model_name(name_or_path: str | os.PathLike) -> str:
    path = Path(name_or_path).expanduser()
    return path.resolve().name if path.is_dir() else str(name_or_path)
