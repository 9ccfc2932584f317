"""SDXL base and refiner against diffusers' StableDiffusionXLImg2ImgPipeline, and the base-to-refiner handoff."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_img2img import Img2ImgPipeline
from tests.test_pipeline import TorchNoise, assert_matches_diffusers, assert_same_images, sketch_image

SCHEDULER_CLASSES = {
    "euler": ("EulerDiscreteScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
}


def diffusers_sdxl(folder: Path, scheduler: str):
    import diffusers

    pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
    cls, overrides = SCHEDULER_CLASSES[scheduler]
    pipe.scheduler = getattr(diffusers, cls).from_config(pipe.scheduler.config, **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# (strength, width, height, guidance, negative prompt)
CASES = [
    (0.3, 64, 64, 5.0, None),  # base: absent negative prompt -> zeros (force_zeros_for_empty_prompt)
    (1.0, 80, 48, 5.0, "blurry"),
    (0.6, 64, 64, 1.0, None),
]


@pytest.mark.parametrize("model", ["tiny_sdxl", "tiny_sdxl_refiner"])
@pytest.mark.parametrize("scheduler", list(SCHEDULER_CLASSES))
def test_matches_diffusers(model: str, scheduler: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(model)
    ours, ref = Img2ImgPipeline.from_pretrained(folder), diffusers_sdxl(folder, scheduler)
    for seed, (strength, width, height, guidance, negative) in enumerate(CASES):
        kwargs = dict(prompt="a castle on a cliff, matte painting", image=sketch_image(width, height),
                      strength=strength, num_inference_steps=6, guidance_scale=guidance,
                      negative_prompt=negative)
        assert_matches_diffusers(model, ours, ref, seed, scheduler=scheduler, **kwargs)


def test_base_to_refiner_handoff_matches_diffusers(tiny_sdxl: Path, tiny_sdxl_refiner: Path) -> None:
    """denoising_end on the base, denoising_start on the refiner, latents passed without decoding."""
    base, refiner = Img2ImgPipeline.from_pretrained(tiny_sdxl), Img2ImgPipeline.from_pretrained(tiny_sdxl_refiner)
    ref_base, ref_refiner = diffusers_sdxl(tiny_sdxl, "euler"), diffusers_sdxl(tiny_sdxl_refiner, "euler")
    kwargs = dict(prompt="a snowy street at dusk", num_inference_steps=10, guidance_scale=5.0)
    image = sketch_image(64, 64)

    generator = torch.Generator().manual_seed(5)
    ref_latents = ref_base(**kwargs, image=image, strength=0.9, denoising_end=0.7, output_type="latent",
                           generator=generator).images
    expected = ref_refiner(**kwargs, image=ref_latents, denoising_start=0.7, generator=generator).images

    noise = TorchNoise(5)
    handed = base(**kwargs, image=image, strength=0.9, denoising_end=0.7, decode=False, noise_source=noise)
    np.testing.assert_allclose(np.array(handed.latents).transpose(0, 3, 1, 2), ref_latents.numpy(), atol=1e-3)
    got = refiner(**kwargs, image=handed.latents, denoising_start=0.7, noise_source=noise).images
    assert_same_images("handoff", "euler", 0.9, got, expected)


def test_float16_vae_is_upcast_and_finite(tiny_sdxl: Path) -> None:
    pipe = Img2ImgPipeline.from_pretrained(tiny_sdxl, dtype="float16")
    assert pipe.unet.conv_in.weight.dtype == mx.float16
    assert pipe.vae.decoder.conv_in.weight.dtype == mx.float32  # force_upcast in the VAE config
    result = pipe(prompt="x", image=sketch_image(64, 64), strength=0.5, num_inference_steps=4, seed=0)
    assert bool(mx.all(mx.isfinite(result.latents)).item())
    assert np.asarray(result.images[0]).std() > 5


def test_release_text_encoders(tiny_sdxl: Path) -> None:
    pipe = Img2ImgPipeline.from_pretrained(tiny_sdxl)
    before = pipe.encode_prompt("a house", "blurry")
    pipe.release_text_encoders()
    assert pipe.text_encoders == []
    pipe.encode_prompt("a castle")  # a new prompt loads them again from disk
    assert len(pipe.text_encoders) == 2
    after = pipe.encode_prompt("a house", "blurry")
    assert before.pooled is not None
    np.testing.assert_array_equal(np.array(before.context), np.array(after.context))
    np.testing.assert_array_equal(np.array(before.pooled), np.array(after.pooled))
