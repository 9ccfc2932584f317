"""Text conditioning: prompts -> the UNet's context (and SDXL's pooled embedding and micro-conditioning).

The text conditioner owns the tokenizers and text encoders, remembers the latest encoded prompts (a
series repeats one), and in low-memory mode frees the encoders after use and reloads them from their
source when a new prompt arrives. `_embed` is the one place that turns texts into encoder states: through
prompts.py's AUTOMATIC1111 syntax (weights, chunks of any number, clip skip) or read literally ("plain").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx

from . import checks
from .models.clip import CLIPTextModel
from .models.unet import guidance_embedding
from .prompts import PROMPT_SYNTAXES, PromptSyntax, embed_prompts
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

    def _embed(self, texts: list[str], prompt_syntax: PromptSyntax = "a1111",
               clip_skip: int | None = None) -> tuple[mx.array, mx.array]:
        """Context (the encoders' states concatenated) and pooled embedding (from the last encoder).
        Remembered per list of texts and settings, so a series with one prompt encodes it once."""
        # SDXL takes the penultimate states and, as AUTOMATIC1111 does by default, no clip skip.
        clip_skip = None if self.spec.is_sdxl or clip_skip == 1 else clip_skip
        key = (tuple(texts), prompt_syntax, clip_skip)
        if key in self._cache:
            return self._cache[key]
        if not self.text_encoders:
            if self._reload is None:
                raise RuntimeError("the text encoders were released; load the pipeline again to encode prompts")
            self.text_encoders = self._reload()

        def embed(tokenizer: CLIPTokenizer, encoder: CLIPTextModel, chunks: int = 1) -> tuple[mx.array, mx.array]:
            return embed_prompts(tokenizer, encoder, texts, syntax=prompt_syntax, clip_skip=clip_skip,
                                 penultimate=self.spec.is_sdxl, min_chunks=chunks)

        pairs = list(zip(self.tokenizers, self.text_encoders, strict=True))
        outputs = [embed(*pair) for pair in pairs]
        tokens = max(states.shape[1] for states, _ in outputs)
        if any(states.shape[1] != tokens for states, _ in outputs):  # SDXL's tokenizers chunked differently
            outputs = [embed(*pair, tokens // pair[0].max_length) for pair in pairs]
        result = (mx.concatenate([states for states, _ in outputs], axis=-1).astype(self.dtype),
                  outputs[-1][1].astype(self.dtype))
        mx.eval(result)
        self._cache = {key: result}  # the latest only: a series repeats one prompt
        if self.low_memory:
            self.release()
        return result

    def encode(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
               num_images_per_prompt: int = 1, guidance_scale: float = 7.5,
               classifier_free: bool = True, prompt_syntax: PromptSyntax = "a1111",
               clip_skip: int | None = None) -> Conditioning:
        """Text conditioning. Classifier-free guidance (a negative half of the batch) when guidance_scale > 1,
        unless `classifier_free` is off (LCM) or the UNet takes the guidance scale as an embedding.

        `prompt_syntax` "a1111" reads AUTOMATIC1111's weights, BREAK and prompts of any length (the negative
        prompt is padded to as many 75-token chunks as the prompt); "plain" reads the text literally and cuts
        it at 75 tokens, as diffusers does. `clip_skip` is AUTOMATIC1111's: 1 (or None) the last layer, 2 the
        penultimate layer's output through the final layer norm (diffusers' `clip_skip=1`); SDXL ignores it,
        as AUTOMATIC1111 does by default."""
        spec = self.spec
        if prompt_syntax not in PROMPT_SYNTAXES:
            raise ValueError(f"prompt_syntax must be one of {', '.join(PROMPT_SYNTAXES)}, not {prompt_syntax!r}")
        if clip_skip is not None:
            clip_skip = checks.whole("clip_skip", clip_skip, 1)
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
        context, pooled = self._embed(texts, prompt_syntax, clip_skip)
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
