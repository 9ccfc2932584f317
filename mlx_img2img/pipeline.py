"""The img2img pipeline: text-to-image that starts part-way down a sliced noise schedule.

Stages, each public: encode_prompt -> prepare_image -> encode_image -> schedule -> add_noise -> denoise
(a generator of step events, the one denoising loop, with hooks for what features change per step) ->
decode. `__call__` runs them in order. The pipeline is built from loaded components (see loading/);
text conditioning lives in conditioning.py, randomness in noise.py, step events and hooks in events.py.
Latents are NHWC inside; arrays that mirror diffusers' (an explicit `noise`) are NCHW.
"""

from __future__ import annotations

import os
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from PIL import Image

from . import checks, inpaint
from .conditioning import Conditioning, ConditioningSpec, TextConditioner
from .configs import source_of
from .control import Control, ControlNetHook, control_pixels
from .errors import ModelFormatError, NumericalError
from .events import StepCallback, StepContext, StepEvent, StepHook
from .inpaint import InpaintHook, InpaintInput, MaskInput
from .loading import Components, ComponentSource, LoadOptions, WeightPatch, load_components, open_source
from .loading.controlnet import load_controlnet
from .loading.embeddings import EmbeddingState
from .loading.lora import LoRAState
from .models.clip import CLIPTextModel
from .models.controlnet import ControlNetModel
from .models.unet import Context
from .models.vae import AutoencoderKL
from .noise import Draws, NoiseSource, per_image_source, seeded_source
from .parallel import compile_if_it_pays, fit_blas_threads, map_batch
from .prompts import PromptSyntax
from .schedulers import Schedule, make_scheduler, sliced_schedule
from .tiling import map_tiles

POSTERIORS = ("sample", "mean")
AUTO_TILE_PIXELS = 1536 * 1536  # above this the VAE runs in tiles (its attention grows with the square)
DEFAULT_TILE = 512
# In low-memory mode the VAE always runs in tiles of this side (its activations grow with the image).
LOW_MEMORY_TILE = 256
StageCallback = Callable[[str], None]  # called with a stage's name once its result is computed


@dataclass
class Img2ImgResult:
    images: list[Image.Image]
    seed: int | None  # None when the caller supplied the noise source
    latents: mx.array  # the final latents, NHWC
    cancelled: bool = False  # stopped by the step callback: images are decoded from the last x0
    seeds: list[int] | None = None  # one per image where the call was given one seed per image


ImageInput = Image.Image | str | os.PathLike | np.ndarray


def to_pil(image: ImageInput) -> Image.Image:
    """A PIL image, a path, or a numpy array (HWC, uint8 or float in [0, 1]) as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, np.ndarray):
        return checks.pil_from_array(image)
    if isinstance(image, str | os.PathLike):
        from .images import load_image

        return load_image(image)
    raise TypeError(f"image must be a PIL image, a path, a numpy array or latents (mx.array), not "
                    f"{type(image).__name__}")


class Img2ImgPipeline:
    """Stable Diffusion 1.x/2.x and SDXL (base and refiner) image-to-image on MLX."""

    def __init__(self, components: Components, *, low_memory: bool = False, vae_tile: int | None = None):
        """`low_memory` frees the text encoders between prompts, always tiles the VAE and keeps no transformed
        copies of its kernels (Winograd's, on the CPU); `vae_tile` is the VAE's tile side in pixels (None:
        tiles only above AUTO_TILE_PIXELS; 0: never)."""
        checks.vae_tile(vae_tile)
        self.low_memory = low_memory
        self.unet = components.unet
        self.vae = components.vae
        self.scheduler_config = components.scheduler_config
        self.dtype = components.dtype
        self.model_name = components.name
        self.is_sdxl = self.unet.config.is_sdxl
        pipeline_config = components.pipeline_config
        spec = ConditioningSpec(
            is_sdxl=self.is_sdxl,
            force_zeros_for_empty_prompt=_flag(pipeline_config, "force_zeros_for_empty_prompt", self.is_sdxl),
            requires_aesthetics_score=_flag(pipeline_config, "requires_aesthetics_score", False),
            time_cond_proj_dim=self.unet.config.time_cond_proj_dim)
        self.loras = LoRAState()
        self.embeddings = EmbeddingState()
        self.conditioner = TextConditioner(
            components.tokenizers, components.text_encoders, spec, self.dtype, low_memory=low_memory,
            reload=lambda: self.embeddings.extend(self._text_encoder_names(), self.loras.rebase(
                self._text_encoder_names(), components.load_text_encoders())))
        self.default_scheduler = make_scheduler(None, self.scheduler_config).name
        self.vae_tile_size = vae_tile
        self._predict = compile_if_it_pays(self._guided_prediction)
        self.controlnets: list[ControlNetModel] = []

    @property
    def vae(self) -> AutoencoderKL:
        return self._vae

    @vae.setter
    def vae(self, vae: AutoencoderKL) -> None:
        """Any VAE the pipeline runs (its own, a server job's) keeps Winograd's kernel transforms on the CPU,
        except in low-memory mode."""
        vae.keep_kernel_transforms(not self.low_memory)
        self._vae = vae

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, dtype: str = "float32",
                        offline: bool | None = None, quantize: int | None = None,
                        low_memory: bool = False, vae_tile: int | None = None,
                        vae: str | os.PathLike | None = None, config: str | os.PathLike | None = None,
                        prediction_type: str | None = None,
                        controlnet: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> Img2ImgPipeline:
        """Load a diffusers-layout model from a local folder, a hub repo id or a preset name, or a
        single-file .safetensors checkpoint (see from_single_file for `config` and `prediction_type`).
        `quantize` (8 or 4) stores the UNet's and text encoders' linear layers in that many bits;
        `low_memory` frees the text encoders between prompts and decodes/encodes the VAE in tiles;
        `offline` never touches the network (only models on disk); `vae` (a folder or a .safetensors
        file) replaces the model's VAE; `controlnet` (one or a list) is loaded with it (see load_controlnet)."""
        LoadOptions(dtype=dtype, quantize=quantize)  # checked before anything is fetched
        source = open_source(name_or_path, dtype=dtype, offline=offline, config=config, vae=vae,
                             prediction_type=prediction_type)
        pipe = cls.from_source(source, dtype=dtype, quantize=quantize, low_memory=low_memory, vae_tile=vae_tile)
        if controlnet is not None:
            pipe.load_controlnet(controlnet, offline=offline, quantize=quantize)
        return pipe

    @classmethod
    def from_single_file(cls, path: str | os.PathLike, config: str | os.PathLike | None = None,
                         dtype: str = "float32", **kwargs) -> Img2ImgPipeline:
        """Load a single-file checkpoint (AUTOMATIC1111/ComfyUI/CivitAI .safetensors in the original
        layout), offline. The family is detected from its keys and its configs ship with this package;
        `config` (a diffusers folder) supplies configs, tokenizers and scheduler instead and wins where
        they disagree. `prediction_type` ("epsilon"/"v_prediction") overrides the scheduler's: an SD 2.x
        file's keys do not tell a 768-pixel v-prediction model from a 512-pixel epsilon one, so without it
        (and without `config`) the loaded UNet decides, by AUTOMATIC1111's test. Other keyword arguments are
        from_pretrained's."""
        return cls.from_pretrained(path, dtype=dtype, config=config, **kwargs)

    @classmethod
    def from_source(cls, source: ComponentSource, *, dtype: str = "float32", quantize: int | None = None,
                    low_memory: bool = False, vae_tile: int | None = None,
                    patches: Sequence[WeightPatch] = ()) -> Img2ImgPipeline:
        """Build the pipeline from any component source through the loading chain; `patches` are merged
        into the weights as they load (the LoRA slot)."""
        options = LoadOptions(dtype=dtype, quantize=quantize, patches=list(patches))
        components = load_components(source, options, text_encoders=not low_memory)
        return cls(components, low_memory=low_memory, vae_tile=vae_tile)

    @property
    def tokenizers(self) -> list:
        return self.conditioner.tokenizers

    @property
    def text_encoders(self) -> list[CLIPTextModel]:
        return self.conditioner.text_encoders

    @text_encoders.setter
    def text_encoders(self, encoders: list[CLIPTextModel]) -> None:
        self.conditioner.text_encoders = encoders

    def load_controlnet(self, name_or_path: str | os.PathLike | Sequence[str | os.PathLike] | None,
                        offline: bool | None = None, quantize: int | None = None,
                        config: str | os.PathLike | None = None) -> None:
        """Use these ControlNets (one or a list; None or [] for none), in place of any loaded before: each a
        diffusers ControlNetModel folder, a hub repo id, a preset (weights.CONTROLNET_PRESETS) or a single
        .safetensors file (`config`: a ControlNet folder whose config.json it takes), loaded in the
        pipeline's dtype (`quantize`: as from_pretrained's). Each must be of the model's family."""
        names = [] if name_or_path is None else (
            [name_or_path] if isinstance(name_or_path, str | os.PathLike) else list(name_or_path))
        options = LoadOptions(dtype=self.dtype, quantize=quantize)
        nets = [load_controlnet(name, options, offline, config) for name in names]
        for name, net in zip(names, nets, strict=True):
            self._check_controlnet(net, name)
        self.controlnets = nets

    def _check_controlnet(self, net: ControlNetModel, name: str | os.PathLike) -> None:
        """A ControlNet's residuals must fit this UNet: the same family, channels and blocks."""
        c, u = net.config, self.unet.config
        def shape(config) -> tuple:
            n = len(config.block_out_channels)
            layers = config.layers_per_block
            return (config.is_sdxl, config.cross_attention_dim, tuple(config.block_out_channels),
                    tuple(layers) if isinstance(layers, list | tuple) else (layers,) * n)

        mine, theirs = shape(u), shape(c)
        if mine != theirs:
            family = "an SDXL" if u.is_sdxl else "an SD 1.x/2.x"
            raise ModelFormatError(
                f"the ControlNet {name} does not fit {self.model_name}, {family} model (text width "
                f"{c.cross_attention_dim} vs {u.cross_attention_dim}, blocks {list(c.block_out_channels)} vs "
                f"{list(u.block_out_channels)}): use a ControlNet made for this model's family")

    def release_text_encoders(self) -> None:
        """Free the text encoders' memory once prompts are encoded; they are loaded again (from their
        source) when a prompt arrives that has not been encoded yet."""
        self.conditioner.release()

    # ------------------------------------------------------------------------------------------ LoRA

    def load_lora_weights(self, path: str | os.PathLike, scale: float = 1.0, adapter_name: str | None = None) -> str:
        """Merge a LoRA file (kohya/AUTOMATIC1111 or diffusers/PEFT) into the UNet and text encoders:
        W + scale * alpha / rank * up @ down per layer. Several can be loaded, each with its scale; the
        products run when a prompt is next encoded or the UNet next denoises (or at `pipe.loras.flush()`),
        one per layer for all the LoRAs loaded until then. Returns its adapter name (default: the file's stem)."""
        name = self.loras.load(path, scale, adapter_name, self._lora_targets())
        self._weights_changed()
        return name

    def unload_lora_weights(self, adapter_name: str | None = None) -> None:
        """Take out one LoRA (by adapter name) or all of them: the touched layers get their base weights back."""
        self.loras.remove(adapter_name, self._lora_targets())
        self._weights_changed()

    def load_textual_inversion(self, path: str | os.PathLike, token: str | None = None) -> list[str]:
        """Add a textual-inversion embedding: AUTOMATIC1111's emb_params or SDXL's clip_l/clip_g file (token:
        the file's stem) or diffusers' {token: vectors} (token: the key). Returns the tokens to use in prompts."""
        self._lora_targets()  # the text encoders, loaded
        tokens, self.conditioner.tokenizers = self.embeddings.load(
            path, token, self.tokenizers, self._text_encoder_names(), self.text_encoders)
        self._weights_changed()
        return tokens

    def _text_encoder_names(self) -> list[str]:
        # SD 1.x/2.x: text_encoder; SDXL base: both; the SDXL refiner: text_encoder_2 only.
        names = ["text_encoder", "text_encoder_2"] if self.is_sdxl else ["text_encoder"]
        return names[-len(self.tokenizers):]

    def _lora_targets(self) -> dict[str, nn.Module]:
        if not self.text_encoders:  # released (low memory): loaded again, with the LoRAs already merged
            self.text_encoders = self.conditioner._reload()
        return {"unet": self.unet, **dict(zip(self._text_encoder_names(), self.text_encoders, strict=True))}

    def _weights_changed(self) -> None:
        self.conditioner._cache.clear()  # prompts encoded with the old text-encoder weights
        self._predict = compile_if_it_pays(self._guided_prediction)  # a compiled graph holds the old weights

    # ------------------------------------------------------------------------------------------ stages

    def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                      num_images_per_prompt: int = 1, guidance_scale: float = 7.5,
                      classifier_free: bool = True, prompt_syntax: PromptSyntax = "a1111",
                      clip_skip: int | None = None) -> Conditioning:
        """Text conditioning (see TextConditioner.encode): `prompt_syntax` "a1111" (weights, BREAK, any
        length) or "plain" (literal, cut at 75 tokens); `clip_skip` as AUTOMATIC1111's (2: penultimate layer)."""
        self.loras.flush()
        return self.conditioner.encode(prompt, negative_prompt, num_images_per_prompt, guidance_scale,
                                       classifier_free, prompt_syntax, clip_skip)

    def add_time_ids(self, conditioning: Conditioning, height: int, width: int, aesthetic_score: float = 6.0,
                     negative_aesthetic_score: float = 2.5) -> Conditioning:
        """SDXL's micro-conditioning for an image of this size (see TextConditioner.add_time_ids)."""
        return self.conditioner.add_time_ids(conditioning, height, width, aesthetic_score, negative_aesthetic_score)

    @property
    def scale_factor(self) -> int:
        return self.vae.config.scale_factor

    def prepare_image(self, image: ImageInput) -> mx.array:
        """An image as a (1, H, W, 3) array in [-1, 1]; sizes are floored to a multiple of the VAE's
        scale factor with a Lanczos resize, as diffusers does."""
        array = np.asarray(self._floored(to_pil(image)), dtype=np.float32) / 127.5 - 1.0
        return mx.array(array)[None]

    def _floored(self, pil: Image.Image) -> Image.Image:
        f = self.scale_factor
        w, h = pil.width - pil.width % f, pil.height - pil.height % f
        if w == 0 or h == 0:
            raise ValueError(f"image of {pil.width}x{pil.height} is smaller than {f}x{f} pixels")
        return pil.resize((w, h), Image.Resampling.LANCZOS) if (w, h) != pil.size else pil

    def encode_image(self, image: mx.array, posterior: str = "sample",
                     noise_source: NoiseSource | Draws | None = None) -> mx.array:
        """(B, H, W, 3) images in [-1, 1] -> scaled latents (B, H/f, W/f, C)."""
        if posterior not in POSTERIORS:
            raise ValueError(f"posterior must be one of {POSTERIORS}, not {posterior!r}")
        f = self.scale_factor
        tile = self.vae_tile_for(image.shape[1] * image.shape[2])

        def moments_of(pixels: mx.array) -> mx.array:
            return mx.concatenate(self.vae.encode(pixels), axis=-1)

        fit_blas_threads()  # this stage's own BLAS threads, not those the last batch left (they move the last bits)

        moments = self._run_vae(lambda: map_tiles(moments_of, image.astype(_vae_dtype(self.vae)), tile,
                                                  tile // 8, 1 / f, align=f))
        mean, std = mx.split(moments, 2, axis=-1)
        draws = _draws(noise_source)
        if posterior == "sample" and draws.per_image and draws.per_image % mean.shape[0] == 0:
            # one seed per image: each image of the batch gets its own posterior draw (diffusers' generator list)
            mean, std = (mx.repeat(a, draws.per_image // mean.shape[0], axis=0) for a in (mean, std))
        latents = mean
        if posterior == "sample":
            latents = mean + std * draws.posterior(mean)
        config = self.vae.config
        return (latents - (config.shift_factor or 0.0)) * config.scaling_factor

    def schedule(self, num_inference_steps: int, strength: float, scheduler: str | None = None,
                 denoising_start: float | None = None, denoising_end: float | None = None) -> Schedule:
        """The sampler and the slice of its timesteps to run (see schedulers.sliced_schedule)."""
        return sliced_schedule(self.scheduler_config, num_inference_steps, strength, scheduler,
                               denoising_start, denoising_end)

    def add_noise(self, latents: mx.array, schedule: Schedule, batch: int,
                  noise: mx.array | np.ndarray | None = None,
                  noise_source: NoiseSource | Draws | None = None) -> mx.array:
        """Noise the image latents to the first kept timestep, repeated for the batch."""
        latents = mx.repeat(latents, batch // latents.shape[0], axis=0)
        draws = _draws(noise_source, noise)
        return schedule.sampler.add_noise(latents, draws.start(latents), schedule.start)

    def denoise(self, latents: mx.array, conditioning: Conditioning, schedule: Schedule,
                guidance_scale: float = 7.5, noise_source: NoiseSource | Draws | None = None,
                hooks: Sequence[StepHook] = ()) -> Iterator[StepEvent]:
        """The one denoising loop: run the scheduled steps, yielding a StepEvent (evaluated latents and the
        lazy x0 prediction) after each. `hooks` change what varies per step for a feature."""
        self.loras.flush()
        sampler, draws = schedule.sampler, _draws(noise_source)
        guidance = mx.array(guidance_scale, dtype=self.dtype)
        x = latents.astype(self.dtype)
        context = map_batch(self.unet.project_context, conditioning.context.shape[0], conditioning.context)
        for done, i in enumerate(range(schedule.start, schedule.end), start=1):
            step = StepContext(index=i, sampler=sampler, last=i == schedule.end - 1)
            model_in = sampler.scale_model_input(x, i).astype(self.dtype)
            extras: dict = {}
            for hook in hooks:
                model_in = hook.unet_input(model_in, step)
                extras.update(hook.unet_extras(model_in, step))
            t = mx.array([float(sampler.timesteps[i])], dtype=mx.float32)
            prediction = self._predict(model_in, t, context, conditioning.pooled, conditioning.time_ids,
                                       conditioning.timestep_cond, guidance, conditioning.guided, extras)
            x0 = sampler.predicted_x0(prediction, i, x)
            x = sampler.step(prediction, i, x, draws.step(x) if sampler.stochastic else None).astype(self.dtype)
            for hook in hooks:
                x = hook.after_step(x, step)
            finite = mx.isfinite(x).all()
            mx.eval(x, finite)
            if not finite.item():
                raise NumericalError(
                    f"the latents became infinite or NaN at step {done} of {schedule.steps}: the model's weights "
                    "or the settings (guidance scale) overflow; try float32 or a lower guidance")
            yield StepEvent(index=done, total=schedule.steps, timestep=float(sampler.timesteps[i]), latents=x, x0=x0)

    def vae_tile_for(self, pixels: int) -> int:
        """VAE tile side in pixels for an image of this many pixels; a huge value means one tile."""
        return vae_tile_side(pixels, self.vae_tile_size, self.low_memory)

    def _guided_prediction(self, x: mx.array, t: mx.array, context: Context, pooled: mx.array | None,
                           time_ids: mx.array | None, timestep_cond: mx.array | None, guidance_scale: mx.array,
                           guided: bool, extras: dict) -> mx.array:
        """The UNet's prediction, with both halves of classifier-free guidance in one batched call.
        `extras` are further UNet keyword arguments for the whole (guided) batch, from step hooks."""
        if guided:
            x = mx.concatenate([x, x], axis=0)
        prediction = map_batch(self.unet, x.shape[0], x, t, context, pooled, time_ids, timestep_cond, **extras)
        if guided:
            uncond, cond = mx.split(prediction, 2, axis=0)
            prediction = uncond + guidance_scale * (cond - uncond)
        return prediction

    def decode(self, latents: mx.array) -> list[Image.Image]:
        config = self.vae.config
        z = latents.astype(mx.float32) / config.scaling_factor + (config.shift_factor or 0.0)
        f = self.scale_factor
        tile = self.vae_tile_for(z.shape[1] * z.shape[2] * f * f) // f
        decode = partial(map_batch, self.vae.decode, z.shape[0])  # with the BLAS threads a batch of maps gets
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

    def __call__(self, prompt: str | Sequence[str], image: ImageInput | Sequence[ImageInput] | mx.array,
                 strength: float = 0.8, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 negative_prompt: str | Sequence[str] | None = None, num_images_per_prompt: int = 1,
                 seed: int | Sequence[int] | None = None, scheduler: str | None = None,
                 noise: mx.array | np.ndarray | None = None, posterior: str = "sample",
                 progress: Callable[[int, int], None] | None = None,
                 noise_source: NoiseSource | None = None,
                 denoising_start: float | None = None, denoising_end: float | None = None,
                 aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5,
                 decode: bool = True, on_step: StepCallback | None = None,
                 on_stage: StageCallback | None = None, hooks: Sequence[StepHook] = (),
                 control_image: ImageInput | Sequence[ImageInput | Sequence[ImageInput]] | None = None,
                 controlnet_conditioning_scale: float | Sequence[float] = 1.0,
                 control_guidance_start: float | Sequence[float] = 0.0,
                 control_guidance_end: float | Sequence[float] = 1.0, guess_mode: bool = False,
                 prompt_syntax: PromptSyntax = "a1111", clip_skip: int | None = None,
                 rng: str = "mlx", mask_image: MaskInput | None = None, mask_blur: float = 0.0,
                 inpaint_fill: str = "original", padding_mask_crop: int | None = None,
                 keep_unmasked: bool = False) -> Img2ImgResult:
        """Transform `image` under `prompt`.

        `image` may be a PIL image, a path, a numpy array (HWC, uint8 or float in [0, 1]), a list of those
        (one per prompt), or latents (an NHWC mx.array, e.g. the `latents` of a base run with `denoising_end`
        and `decode=False`), which are used as they are. Randomness: `seed` with `rng` "mlx" (MLX's generator)
        or "torch" (PyTorch's CPU generator: diffusers' noise with `torch.Generator("cpu").manual_seed(seed)`),
        or `noise_source` (every draw); `noise` replaces the start noise only. `seed` may be a list with one
        seed per generated image (AUTOMATIC1111's seed, seed+1, ...; diffusers' list of generators): each
        image is then the one its seed gives alone (with a mask too). `prompt_syntax` and `clip_skip`:
        see encode_prompt. `on_step` receives a StepEvent
        after every step and stops the run by returning True (the result is then `cancelled`); `progress`
        is the older `(done, total)` form. `on_stage` is told when each stage's result is computed.

        Inpainting: `mask_image` (a PIL image, path or HxW array; white = repaint, black = keep, grey binarised
        at one half) repaints only the masked area of one image, as diffusers' inpainting pipelines do for
        inpainting UNets (9 input channels) and ordinary ones; an inpainting UNet without a mask repaints
        everything. `padding_mask_crop=N` works on the mask's box grown by N pixels at the full working size
        and pastes the result back; `mask_blur` (pixels), `inpaint_fill` ("original", "fill",
        "latent_noise", "latent_nothing") and `keep_unmasked` (the original pixels pasted back outside the
        blurred mask) are AUTOMATIC1111's (see inpaint.py)."""
        prompts = checks.prompts("prompt", prompt)
        num_images_per_prompt = checks.whole("num_images_per_prompt", num_images_per_prompt, 1, 1000)
        guidance_scale = checks.number("guidance_scale", guidance_scale)
        if negative_prompt is not None:
            checks.prompts("negative_prompt", negative_prompt)
        schedule = self.schedule(num_inference_steps, strength, scheduler, denoising_start, denoising_end)
        seeds = None
        if noise_source is None and isinstance(seed, Sequence) and not isinstance(seed, str):
            seeds = [checks.seed(s) for s in seed]
            if len(seeds) != len(prompts) * num_images_per_prompt:
                raise ValueError(f"{len(seeds)} seeds for {len(prompts) * num_images_per_prompt} images: give one "
                                 "seed, or one per image")
            seed, noise_source = seeds[0], per_image_source(seeds, rng)
        elif noise_source is None:
            seed = secrets.randbelow(2**32) if seed is None else checks.seed(seed)
            noise_source = seeded_source(seed, rng)
        else:
            seed = None
        draws = Draws(noise_source, start_noise=noise)
        stage = on_stage or (lambda name: None)
        # LCM samples without classifier-free guidance, as LatentConsistencyModelImg2ImgPipeline does.
        conditioning = self.encode_prompt(prompts, negative_prompt, num_images_per_prompt, guidance_scale,
                                          classifier_free=schedule.sampler.name != "lcm",
                                          prompt_syntax=prompt_syntax, clip_skip=clip_skip)
        stage("encode_prompt")
        batch = conditioning.batch
        inpainting = None
        if mask_image is None and not self._inpainting_unet():
            latents = self._image_latents(image, len(prompts), posterior, draws)
            _evaluated(on_stage, latents)
            stage("encode_image")
            if denoising_start is None:  # a handed-over latent is already noised to where it stopped
                latents = self.add_noise(latents, schedule, batch, noise_source=draws)
            else:
                latents = mx.repeat(latents, batch // latents.shape[0], axis=0)
        else:
            inpainting = self._prepare_inpainting(image, mask_image, mask_blur, inpaint_fill, padding_mask_crop,
                                                  keep_unmasked)
            handed = image if isinstance(image, mx.array) else None
            latents, hook = self._inpaint_start(inpainting, handed, schedule, batch, strength, posterior, draws)
            hooks = [hook, *hooks]
            stage("encode_image")
        f = self.scale_factor
        self.add_time_ids(conditioning, latents.shape[1] * f, latents.shape[2] * f,
                          aesthetic_score, negative_aesthetic_score)
        _evaluated(on_stage, latents)
        stage("add_noise")
        if self.controlnets or control_image is not None:  # first: it sees the latents, not an inpainting input
            hooks = [self._control_hook(control_image, latents, conditioning, schedule, len(prompts),
                                        controlnet_conditioning_scale, control_guidance_start,
                                        control_guidance_end, guess_mode), *hooks]
        cancelled, x0 = False, latents
        for event in self.denoise(latents, conditioning, schedule, guidance_scale, draws, hooks):
            latents, x0 = event.latents, event.x0
            if progress is not None:
                progress(event.index, event.total)
            if on_step is not None and on_step(event):
                cancelled = event.index < event.total
                break
        stage("denoise")
        images = self.decode(x0 if cancelled else latents) if decode else []
        if inpainting is not None:
            images = [inpainting.finish(im) for im in images]
        stage("decode")
        return Img2ImgResult(images=images, seed=seed, latents=latents, cancelled=cancelled, seeds=seeds)

    # ------------------------------------------------------------------------------------------ inpainting

    def _inpainting_unet(self) -> bool:
        """An inpainting UNet: the latents, the mask and the masked image's latents as its input."""
        c = self.vae.config.latent_channels
        if self.unet.config.in_channels not in (c, 2 * c + 1):
            raise ValueError(f"the UNet takes {self.unet.config.in_channels} input channels: only {c} (an ordinary "
                             f"model) or {2 * c + 1} (an inpainting model) are supported")
        return self.unet.config.in_channels == 2 * c + 1

    def _prepare_inpainting(self, image: ImageInput | Sequence[ImageInput] | mx.array, mask: MaskInput | None,
                            mask_blur: float, fill: str, padding: int | None, keep_unmasked: bool) -> InpaintInput:
        """The mask brought to the image at its working size (see inpaint.prepare). Latents (a refiner's
        handoff) carry no pixels: only the mask is prepared, at their size."""
        if isinstance(image, list | tuple):
            if len(image) != 1:
                raise ValueError(f"inpainting takes one image (and its mask), not {len(image)}")
            image = image[0]
        if isinstance(image, mx.array):
            if keep_unmasked or padding is not None or fill != "original" or self._inpainting_unet() or mask is None:
                raise ValueError("inpainting from latents (a refiner's handoff) takes only a mask and mask_blur: "
                                 "keep_unmasked, padding_mask_crop, inpaint_fill and inpainting UNets need the pixels")
            self._image_latents(image, 1, "mean", Draws(None))  # checks the shape
            f = self.scale_factor
            canvas = Image.new("RGB", (image.shape[2] * f, image.shape[1] * f))
        else:
            canvas = self._floored(to_pil(image))
        if mask is None:  # an inpainting UNet without a mask: everything is repainted
            mask = Image.new("L", canvas.size, 255)
        return inpaint.prepare(canvas, mask, mask_blur, fill, padding, keep_unmasked)

    def _inpaint_start(self, job: InpaintInput, handed: mx.array | None, schedule: Schedule, batch: int,
                       strength: float, posterior: str, draws: Draws) -> tuple[mx.array, InpaintHook]:
        """The start latents and the step hook of an inpainting run, with diffusers' draws in its order: the
        image's posterior sample, the start noise, the masked image's posterior sample. At strength 1 the run
        starts from pure noise (scaled by the sampler's init_noise_sigma); an inpainting UNet then needs no
        image latents at all. Handed-over latents are kept as they are, as diffusers' SDXL refiner does.
        With one seed per image, each image takes all of these draws from its own source (diffusers given the
        image once per generator; given it once, diffusers encodes it with the first generator only)."""
        nine = self._inpainting_unet()
        pure_noise = handed is None and strength == 1.0
        mask = job.latent_mask(self.scale_factor)
        if handed is not None:
            image_latents = handed
        elif nine and pure_noise:
            image_latents = None
        else:
            image_latents = self.encode_image(self.prepare_image(job.image), posterior, draws)
        if image_latents is not None and draws.per_image:
            # one seed per image: each image's fill (and every later draw) comes from its own source
            image_latents = mx.repeat(image_latents, batch // image_latents.shape[0], axis=0)
        if image_latents is not None and job.fill in ("latent_noise", "latent_nothing"):
            fill = draws.fill(image_latents) if job.fill == "latent_noise" else None
            image_latents = inpaint.fill_latents(image_latents, mask, job.fill, fill)
        _, h, w, _ = mask.shape
        like = mx.zeros((batch, h, w, self.vae.config.latent_channels), mx.float32)
        noise = draws.start(like)
        if image_latents is not None:
            image_latents = mx.repeat(image_latents, batch // image_latents.shape[0], axis=0)
        if handed is not None:
            latents = image_latents
        elif pure_noise:
            latents = noise * inpaint.init_noise_sigma(schedule.sampler)
        else:
            latents = schedule.sampler.add_noise(image_latents, noise, schedule.start)
        masked = None
        if nine:
            masked = self.encode_image(mx.array(job.masked_pixels())[None], posterior, draws)
            masked = mx.repeat(masked, batch // masked.shape[0], axis=0)
        elif handed is None and posterior == "sample":
            # diffusers encodes the masked image for ordinary UNets too, and drops it: its draw is taken
            # (without the VAE pass) so that the ancestral steps' draws stay in step with diffusers'
            draws.posterior(like if draws.per_image else like[:1])
        return latents, InpaintHook(mx.repeat(mask, batch, axis=0), masked, image_latents, noise)

    def _control_hook(self, control_image: ImageInput | Sequence | None, latents: mx.array,
                      conditioning: Conditioning, schedule: Schedule, prompts: int,
                      scale: float | Sequence[float], start: float | Sequence[float], end: float | Sequence[float],
                      guess_mode: bool) -> ControlNetHook:
        """The ControlNets' step hook, as diffusers' ControlNet img2img pipelines run them: `control_image` is
        one image per ControlNet (a list with several), each one image or one per prompt, resized to the
        input's working size; `controlnet_conditioning_scale` (default 1.0, AUTOMATIC1111's weight; diffusers'
        pipelines default to 0.8) and the guidance window [`control_guidance_start`, `control_guidance_end`]
        (fractions of the steps run) are one value or one per ControlNet; `guess_mode` as diffusers'."""
        n = len(self.controlnets)
        if n == 0:
            raise ValueError("control_image needs a ControlNet: from_pretrained(..., controlnet=NAME) or "
                             "pipe.load_controlnet(NAME)")
        if control_image is None:
            raise ValueError("a ControlNet needs a control_image (see mlx_img2img.control.preprocess)")
        images = [control_image] if n == 1 else control_image
        if n > 1 and (not isinstance(images, list | tuple) or len(images) != n):
            raise ValueError(f"control_image: give a list of {n} control images, one per ControlNet")

        def per_net(name: str, value: float | Sequence[float]) -> list[float]:
            values = list(value) if isinstance(value, list | tuple) else [value] * n
            if len(values) != n:
                raise ValueError(f"{name}: {len(values)} values for {n} ControlNets")
            return [checks.number(name, v) for v in values]

        scales = per_net("controlnet_conditioning_scale", scale)
        starts, ends = per_net("control_guidance_start", start), per_net("control_guidance_end", end)
        for s, e in zip(starts, ends, strict=True):
            if not 0.0 <= s < e <= 1.0:
                raise ValueError(f"the ControlNet guidance window must have 0 <= start < end <= 1, not {s:g}..{e:g}")
        f = self.scale_factor
        width, height = latents.shape[2] * f, latents.shape[1] * f
        controls = []
        for net, image, s, a, b in zip(self.controlnets, images, scales, starts, ends, strict=True):
            parts = list(image) if isinstance(image, list | tuple) else [image]
            if len(parts) not in (1, prompts):
                raise ValueError(f"{len(parts)} control images for {prompts} prompts: give one, or one per prompt")
            pixels = mx.concatenate([control_pixels(to_pil(im), width, height) for im in parts], axis=0)
            controls.append(Control(net, pixels, s, a, b))
        # as diffusers: a ControlNet with pooled residuals (global_pool_conditions) implies guess mode
        guess_mode = bool(guess_mode) or self.controlnets[0].config.global_pool_conditions
        return ControlNetHook(controls, conditioning, schedule.start, schedule.steps, guess_mode)

    def _image_latents(self, image: ImageInput | Sequence[ImageInput] | mx.array, prompts: int, posterior: str,
                       draws: Draws) -> mx.array:
        """The latents of the input: latents as they are, else the encoded image(s), one or one per prompt."""
        if isinstance(image, mx.array):
            if image.ndim != 4 or image.shape[-1] != self.vae.config.latent_channels:
                raise ValueError(f"an mx.array image must be NHWC latents with {self.vae.config.latent_channels} "
                                 f"channels, not shape {tuple(image.shape)}; pass pixels as a PIL image or numpy array")
            return image
        if isinstance(image, list | tuple):
            if len(image) not in (1, prompts):
                raise ValueError(f"{len(image)} images for {prompts} prompts: give one image, or one per prompt")
            pixels = [self.prepare_image(im) for im in image]
            if len({p.shape for p in pixels}) > 1:
                raise ValueError("the images of one call must have the same size")
            return self.encode_image(mx.concatenate(pixels, axis=0), posterior, draws)  # one draw, as diffusers
        return self.encode_image(self.prepare_image(image), posterior, draws)


def _flag(config: dict, key: str, default: bool) -> bool:
    """A true/false field of model_index.json: JSON's true or false (the text "false" is no false)."""
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise ModelFormatError(f"{source_of(config, 'model_index.json')}: {key} must be true or false, not "
                               f"{value!r:.40}")
    return value


def vae_tile_side(pixels: int, setting: int | None, low_memory: bool) -> int:
    """The VAE's tile side in pixels for an image of this many pixels, with the tile `setting` (None:
    automatic, 0: never) and the low-memory mode; a huge value means one tile."""
    if setting == 0:
        return 1 << 30
    if setting:
        return setting
    if low_memory:
        return LOW_MEMORY_TILE
    if pixels > AUTO_TILE_PIXELS:
        return DEFAULT_TILE
    return 1 << 30


def _draws(source: NoiseSource | Draws | None, start_noise: mx.array | np.ndarray | None = None) -> Draws:
    if isinstance(source, Draws):
        if start_noise is not None:
            return Draws(source.source, start_noise)
        return source
    return Draws(source, start_noise)


def _evaluated(on_stage: StageCallback | None, value: mx.array) -> None:
    """Evaluate a stage's result when someone times the stages (otherwise MLX fuses it into the next)."""
    if on_stage is not None:
        mx.eval(value)


def _vae_dtype(vae: AutoencoderKL) -> mx.Dtype:
    return vae.decoder.conv_in.weight.dtype
