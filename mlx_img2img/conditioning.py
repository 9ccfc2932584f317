"""Text conditioning: prompts -> the UNet's context (and SDXL's pooled embedding and micro-conditioning).

The text conditioner owns the tokenizers and text encoders, remembers the latest encoded prompts (a
series repeats one), and in low-memory mode frees the encoders after use and reloads them from their
source when a new prompt arrives. Prompt syntax and chunking belong here too: `_embed` is the one place
that turns texts into encoder states.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx

from .models.clip import CLIPTextModel
from .models.unet import guidance_embedding
from .tokenizer import CLIPTokenizer


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


@dataclass(frozen=True)
class ConditioningSpec:
    """How a model family is conditioned, read from its configs."""

    is_sdxl: bool  # penultimate hidden states, a pooled embedding, micro-conditioning ids
    force_zeros_for_empty_prompt: bool  # an absent negative prompt is zeros, not the encoded ""
    requires_aesthetics_score: bool  # the SDXL refiner's micro-conditioning
    time_cond_proj_dim: int | None  # LCM-distilled UNets embed the guidance scale


class TextConditioner:
    """Tokenizers and text encoders, with a cache of the latest prompts and an optional low-memory mode."""

    def __init__(self, tokenizers: list[CLIPTokenizer], text_encoders: list[CLIPTextModel], spec: ConditioningSpec,
                 dtype: mx.Dtype, reload: Callable[[], list[CLIPTextModel]] | None = None,
                 low_memory: bool = False):
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.spec = spec
        self.dtype = dtype
        self.low_memory = low_memory
        self._reload = reload
        self._cache: dict[tuple, tuple[mx.array, mx.array]] = {}

    def release(self) -> None:
        """Free the text encoders' memory; they are loaded again from their source for a new prompt."""
        self.text_encoders = []
        mx.clear_cache()

    def _embed(self, texts: list[str]) -> tuple[mx.array, mx.array]:
        """Context (the encoders' states concatenated) and pooled embedding (from the last encoder).
        Remembered per list of texts, so a series with one prompt encodes it once."""
        key = tuple(texts)
        if key in self._cache:
            return self._cache[key]
        if not self.text_encoders:
            if self._reload is None:
                raise RuntimeError("the text encoders were released; load the pipeline again to encode prompts")
            self.text_encoders = self._reload()
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            out = encoder(mx.array(tokenizer.encode(texts)))
            states.append(out.penultimate_hidden_state if self.spec.is_sdxl else out.last_hidden_state)
            pooled = out.pooled
        result = mx.concatenate(states, axis=-1).astype(self.dtype), pooled.astype(self.dtype)
        mx.eval(result)
        self._cache = {key: result}  # the latest only: a series repeats one prompt
        if self.low_memory:
            self.release()
        return result

    def encode(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
               num_images_per_prompt: int = 1, guidance_scale: float = 7.5,
               classifier_free: bool = True) -> Conditioning:
        """Text conditioning. Classifier-free guidance (a negative half of the batch) when guidance_scale > 1,
        unless `classifier_free` is off (LCM) or the UNet takes the guidance scale as an embedding."""
        spec = self.spec
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        embedded_guidance = spec.time_cond_proj_dim is not None
        guided = classifier_free and guidance_scale > 1.0 and not embedded_guidance
        zero_negative = guided and negative_prompt is None and spec.force_zeros_for_empty_prompt
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
            timestep_cond = guidance_embedding(scale, spec.time_cond_proj_dim)
        return Conditioning(context=context, guided=guided, timestep_cond=timestep_cond,
                            pooled=mx.repeat(pooled, num_images_per_prompt, axis=0) if spec.is_sdxl else None)

    def add_time_ids(self, conditioning: Conditioning, height: int, width: int, aesthetic_score: float = 6.0,
                     negative_aesthetic_score: float = 2.5) -> Conditioning:
        """SDXL's micro-conditioning for an image of this size: original size, crop top-left (0, 0), and
        the target size, or for the refiner the aesthetic score."""
        if not self.spec.is_sdxl:
            return conditioning
        size, crop = [height, width], [0, 0]
        if self.spec.requires_aesthetics_score:
            positive, negative = size + crop + [aesthetic_score], size + crop + [negative_aesthetic_score]
        else:
            positive = negative = size + crop + size
        batch = conditioning.batch
        rows = ([negative] * batch if conditioning.guided else []) + [positive] * batch
        conditioning.time_ids = mx.array(rows, dtype=mx.float32)
        return conditioning
