"""One generation path for every door (command line, Python scripts, the benchmark, a server).

    plan: from the request and the models' configs alone (no weights loaded): the sampler, every
          schedule and its step count, the base-to-refiner handoff checks, the working size limit;
          every error a user can act on is raised here, before anything is loaded
    run:  one image through the model and, with a refiner, the handoff to it, with
          one stream of step events over both and a clean stop when the receiver asks
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from .events import StepCallback, StepEvent
from .inpaint import keep_unmasked
from .loading import ComponentSource
from .models.unet import UNetConfig
from .models.vae import VAEConfig
from .request import MAX_SIDE_SD, MAX_SIDE_SDXL, Request
from .schedulers import make_scheduler, sliced_schedule


@dataclass(frozen=True)
class ModelInfo:
    """What planning needs of a model, read from its configs."""

    name: str
    scheduler_config: dict
    is_sdxl: bool
    latent_space: tuple[int, float]  # latent channels and scaling factor: a handoff needs them equal

    @classmethod
    def of_source(cls, source: ComponentSource) -> ModelInfo:
        vae = VAEConfig.from_dict(source.config("vae"))
        return cls(source.name, source.config("scheduler"), UNetConfig.from_dict(source.config("unet")).is_sdxl,
                   (vae.latent_channels, vae.scaling_factor))

    @classmethod
    def of_pipeline(cls, pipe: Any) -> ModelInfo:
        vae = pipe.vae.config
        return cls(pipe.model_name, pipe.scheduler_config, pipe.is_sdxl, (vae.latent_channels, vae.scaling_factor))

    @property
    def family(self) -> str:
        return "an SDXL model" if self.is_sdxl else "an SD 1.x/2.x model"

    @property
    def default_scheduler(self) -> str:
        return make_scheduler(None, self.scheduler_config).name


@dataclass
class Outcome:
    """One image, or a cancelled run: then `image` is what the run had (decoded from the last x0 prediction),
    or None where nothing was decoded (stopped before the refiner took over)."""

    image: Image.Image | None
    cancelled: bool = False


class Planner:
    """Plans the generations of a request over a model (and refiner) known by their configs."""

    def __init__(self, request: Request, model: ModelInfo, refiner: ModelInfo | None = None):
        self.request, self.model, self.refiner = request, model, refiner
        # the refiner continues with the same sampler
        self.scheduler = request.scheduler or model.default_scheduler
        self.max_side = request.max_side or (MAX_SIDE_SDXL if model.is_sdxl else MAX_SIDE_SD)
        if refiner is not None and refiner.latent_space != model.latent_space:
            raise ValueError(
                f"the refiner {refiner.name} ({refiner.family}) cannot continue from {model.name} ({model.family}): "
                "their latents differ; use a refiner of the same family")
        self._by_strength: dict[float, tuple[int, int | None]] = {}
        for strength in request.strengths():
            self._check(strength)

    def _check(self, strength: float) -> None:
        """Plan the schedules at one strength once (the step counts are kept): any error is raised now."""
        r = self.request
        end = r.refiner_start if self.refiner else None
        try:
            base = sliced_schedule(self.model.scheduler_config, r.steps, strength, r.scheduler, denoising_end=end)
        except ValueError as e:
            if end is None or "no denoising step" not in str(e):
                raise
            raise ValueError(
                f"strength {strength:g} starts the schedule where the refiner already takes over "
                f"(--refiner-start {r.refiner_start:g}), so {self.model.name} would run no step: raise the strength "
                "or lower --refiner-start") from None
        refined = None
        if self.refiner is not None:
            refined = sliced_schedule(self.refiner.scheduler_config, r.steps, strength, self.scheduler,
                                      denoising_start=r.refiner_start)
        self._by_strength[strength] = (base.steps, refined.steps if refined else None)

    def steps(self, strength: float) -> int:
        """UNet steps of one image at this strength, over both models."""
        if strength not in self._by_strength:
            self._check(strength)
        base, refined = self._by_strength[strength]
        return base + (refined or 0)

    def control_images(self, image: Image.Image) -> list[Image.Image] | None:
        """The control image of each ControlNet for one input (None without ControlNets): --control-image, or
        the input through --control-preprocess (default: as each ControlNet's name asks)."""
        from .control import default_preprocess, preprocess
        from .images import load_image

        r = self.request
        if not r.controlnet:
            return None
        if r.control_image:
            return [load_image(r.control_image)] * len(r.controlnet)
        return [preprocess(image, r.control_preprocess or default_preprocess(name)) for name in r.controlnet]

    def run(self, pipe: Any, refiner: Any, image: Image.Image, prompt: str, strength: float, seed: int,
            on_step: StepCallback | None = None, mask: Image.Image | None = None,
            mask_blur: float | None = None, control: list[Image.Image] | None = None) -> Outcome:
        """One image through the model and, with a refiner, the handoff; step events count over both.
        `control`: the ControlNets' control images (see control_images), for the model (not the refiner)."""
        r = self.request
        total = self.steps(strength)
        blur = r.mask_blur if mask_blur is None else mask_blur
        # inpainting (`mask`, white = repaint; `mask_blur` overrides the request's): the unmasked pixels are kept
        masking = {} if mask is None else dict(mask_image=mask, mask_blur=blur, inpaint_fill=r.inpaint_fill,
                                               padding_mask_crop=r.padding if r.only_masked else None)

        def forward(offset: int, model: str) -> StepCallback:
            def relay(event: StepEvent) -> bool | None:
                if on_step is None:
                    return None
                return on_step(replace(event, index=offset + event.index, total=total, model=model))

            return relay

        common = dict(prompt=prompt, num_inference_steps=r.steps, guidance_scale=r.guidance,
                      negative_prompt=r.negative_prompt, seed=seed, rng=r.rng, prompt_syntax=r.prompt_syntax,
                      clip_skip=r.clip_skip)
        base = dict(common, image=image, strength=strength, scheduler=r.scheduler)
        if control:
            one = len(control) == 1
            scales = r.control_scale * len(control) if len(r.control_scale) == 1 else r.control_scale
            base.update(control_image=control[0] if one else control,
                        controlnet_conditioning_scale=scales[0] if one else scales,
                        control_guidance_start=r.control_start, control_guidance_end=r.control_end)
        if refiner is None:
            result = pipe(**base, on_step=forward(0, "base"), keep_unmasked=True, **masking)
        else:
            handed = pipe(**base, denoising_end=r.refiner_start, decode=False, on_step=forward(0, "base"),
                          **masking)
            if handed.cancelled:
                return Outcome(None, cancelled=True)
            base_steps, _ = self._by_strength[strength]
            refine_mask = {} if mask is None else dict(mask_image=mask, mask_blur=blur)
            result = refiner(**common, image=handed.latents, scheduler=self.scheduler,
                             denoising_start=r.refiner_start, on_step=forward(base_steps, "refiner"), **refine_mask)
            if mask is not None and not result.cancelled:  # the refiner had latents only: the pixels go back now
                result.images = [keep_unmasked(image, result.images[0], mask, blur)]
        return Outcome(result.images[0] if result.images else None, cancelled=result.cancelled)
