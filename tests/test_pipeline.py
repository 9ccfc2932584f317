"""End to end against diffusers' StableDiffusionImg2ImgPipeline: same weights, prompts and random draws."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mlx_img2img import Img2ImgPipeline

SCHEDULERS = ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "pndm"]
MAX_PIXEL_DIFF = 3  # out of 255, float32
STEPS = 8


class TorchNoise:
    """Draws from a seeded torch.Generator in diffusers' order, so both pipelines see the same noise."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, shape: tuple[int, ...]) -> mx.array:
        return mx.array(torch.randn(shape, generator=self.generator).numpy())


def sketch_image(width: int, height: int) -> Image.Image:
    """A sketch-like input: a gradient with a house and a sun."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    base = np.concatenate([np.broadcast_to(x, (height, width, 1)), np.broadcast_to(y, (height, width, 1)),
                           np.full((height, width, 1), 128.0)], axis=-1).astype(np.uint8)
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    draw.rectangle([width // 4, height // 2, 3 * width // 4, height - 4], outline=(0, 0, 0), width=2)
    roof = [(width // 4, height // 2), (width // 2, height // 4), (3 * width // 4, height // 2)]
    draw.polygon(roof, fill=(200, 40, 40))
    draw.ellipse([width - 20, 2, width - 4, 18], fill=(250, 220, 0))
    return image


def with_scheduler(pipe, name: str):
    """A diffusers pipeline switched to the diffusers scheduler that our sampler `name` reproduces."""
    import diffusers

    config = pipe.scheduler.config
    pipe.scheduler = {
        "ddim": lambda: diffusers.DDIMScheduler.from_config(config),
        "euler": lambda: diffusers.EulerDiscreteScheduler.from_config(config),
        "euler_a": lambda: diffusers.EulerAncestralDiscreteScheduler.from_config(config),
        "dpmpp_2m": lambda: diffusers.DPMSolverMultistepScheduler.from_config(config),
        "dpmpp_2m_karras": lambda: diffusers.DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True),
        "pndm": lambda: diffusers.PNDMScheduler.from_config(config, skip_prk_steps=True),  # PLMS, as SD configs set it
    }[name]()
    return pipe


def diffusers_pipeline(folder: Path, scheduler: str):
    import diffusers

    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None,
                                                                    requires_safety_checker=False)
    with_scheduler(pipe, scheduler).set_progress_bar_config(disable=True)
    return pipe


_cache: dict = {}


def pipelines(folder: Path, scheduler: str):
    key = (folder, scheduler)
    if key not in _cache:
        if (folder, None) not in _cache:
            _cache[(folder, None)] = Img2ImgPipeline.from_pretrained(folder)
        _cache[key] = diffusers_pipeline(folder, scheduler)
    return _cache[(folder, None)], _cache[key]


# (strength, width, height, guidance, negative prompt, images per prompt)
CASES = [
    (0.3, 64, 64, 7.5, None, 1),
    (1.0, 64, 64, 5.0, "blurry, low quality", 1),
    (0.75, 80, 48, 1.0, None, 2),  # no guidance; odd latent sizes in the UNet; a batch of two
]


@pytest.mark.parametrize("model", ["tiny_sd15", "tiny_sd2v"])
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_matches_diffusers(model: str, scheduler: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(model)
    ours, ref = pipelines(folder, scheduler)
    for case_index, (strength, width, height, guidance, negative, count) in enumerate(CASES):
        got = assert_matches_diffusers(
            model, ours, ref, case_index, scheduler=scheduler, prompt="a watercolour painting of a house, golden hour",
            image=sketch_image(width, height), strength=strength, num_inference_steps=STEPS,
            guidance_scale=guidance, negative_prompt=negative, num_images_per_prompt=count)
        assert len(got) == count


def assert_matches_diffusers(label: str, ours: Img2ImgPipeline, ref, seed: int, scheduler: str | None = None,
                             **kwargs) -> list[Image.Image]:
    """diffusers with a seeded torch generator against ours drawing the same noise (TorchNoise), on the
    same arguments; `scheduler` is ours only (None: the model's own). Returns our images."""
    expected = ref(**kwargs, generator=torch.Generator().manual_seed(seed)).images
    got = ours(**kwargs, scheduler=scheduler, noise_source=TorchNoise(seed)).images
    assert_same_images(label, scheduler or ours.default_scheduler, kwargs["strength"], got, expected)
    return got


def assert_same_images(model: str, scheduler: str, strength: float, got: list[Image.Image],
                       expected: list[Image.Image]) -> None:
    """Every pixel within MAX_PIXEL_DIFF of diffusers', and not a trivially equal pair of blank images.
    With PARITY_REPORT naming a file, each difference is appended to it (for the closing notes)."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))
        report = os.environ.get("PARITY_REPORT")
        if report:
            with open(report, "a") as f:
                f.write(json.dumps(dict(model=model, scheduler=scheduler, strength=strength,
                                        size="{}x{}".format(*a.size), max=int(diff.max()),
                                        mean=float(diff.mean()))) + "\n")
        assert diff.max() <= MAX_PIXEL_DIFF, f"{scheduler} strength {strength} {a.size}: max diff {diff.max()}"
    assert np.asarray(got[0]).std() > 5


def test_explicit_noise_replaces_the_seeded_draw(tiny_sd15: Path) -> None:
    pipe = Img2ImgPipeline.from_pretrained(tiny_sd15)
    image = sketch_image(64, 64)
    noise = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    kwargs = dict(prompt="a house", image=image, strength=0.5, num_inference_steps=4, posterior="mean")
    a = pipe(**kwargs, noise=noise, seed=1).images[0]
    b = pipe(**kwargs, noise=noise, seed=2).images[0]
    c = pipe(**kwargs, seed=1).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))  # the noise, not the seed, decides
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    with pytest.raises(ValueError, match="NCHW shape"):
        pipe(**kwargs, noise=noise[:, :, :4])


def test_same_seed_same_pixels_other_seed_other_image(tiny_sd15: Path) -> None:
    pipe = Img2ImgPipeline.from_pretrained(tiny_sd15)
    kwargs = dict(prompt="a house", image=sketch_image(64, 64), strength=0.6, num_inference_steps=5)
    a, b, c = (pipe(**kwargs, seed=s) for s in (7, 7, 8))
    assert a.seed == 7
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))


def test_strength_too_small_for_steps_says_what_works(tiny_sd15: Path) -> None:
    pipe = Img2ImgPipeline.from_pretrained(tiny_sd15)
    with pytest.raises(ValueError, match="strength") as err:
        pipe(prompt="x", image=sketch_image(64, 64), strength=0.1, num_inference_steps=4)
    assert "0.25" in str(err.value) or "10" in str(err.value)


def test_progress_and_generator_count_exactly_the_kept_steps(tiny_sd15: Path) -> None:
    pipe = Img2ImgPipeline.from_pretrained(tiny_sd15)
    calls = []
    pipe(prompt="x", image=sketch_image(64, 64), strength=0.5, num_inference_steps=10, seed=0,
         scheduler="euler", progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 5) for i in range(1, 6)]


def test_half_precision_vae_that_overflows_moves_to_float32(tiny_sd15: Path) -> None:
    """SD 1.x runs its VAE in the model's dtype, as diffusers does; one whose float16 output overflows
    (black images) is moved to float32 with a warning and decodes what a float32 pipeline decodes."""
    pipes = {dtype: Img2ImgPipeline.from_pretrained(tiny_sd15, dtype=dtype) for dtype in ("float16", "float32")}
    assert pipes["float16"].vae.decoder.conv_in.weight.dtype == mx.float16
    for pipe in pipes.values():  # outputs far beyond float16's range (65504)
        pipe.vae.decoder.conv_out.weight = pipe.vae.decoder.conv_out.weight * 4e4
    latents = mx.array(np.random.default_rng(0).standard_normal((1, 8, 8, 4)).astype(np.float32))
    with pytest.warns(UserWarning, match="float32 from now on"):
        half = np.asarray(pipes["float16"].decode(latents)[0], np.float32)
    assert pipes["float16"].vae.decoder.conv_in.weight.dtype == mx.float32
    full = np.asarray(pipes["float32"].decode(latents)[0], np.float32)
    assert 20 < full.std() and np.abs(half - full).mean() < 2.0


def test_non_multiple_of_eight_is_floored_like_diffusers(tiny_sd15: Path) -> None:
    pipe = Img2ImgPipeline.from_pretrained(tiny_sd15)
    result = pipe(prompt="x", image=sketch_image(70, 61), strength=0.5, num_inference_steps=2, seed=0)
    assert result.images[0].size == (64, 56)


TURBO_SCHEDULER = {  # sd-turbo / sdxl-turbo: trailing spacing, distilled for 1-4 steps without guidance
    "_class_name": "EulerAncestralDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
    "timestep_spacing": "trailing", "prediction_type": "epsilon",
}


@pytest.mark.parametrize("steps,strength", [(2, 0.5), (4, 0.5), (1, 1.0), (4, 0.25)])
def test_turbo_recipe_matches_diffusers(tiny_sd15: Path, tmp_path: Path, steps: int, strength: float) -> None:
    import shutil

    folder = Path(shutil.copytree(tiny_sd15, tmp_path / "turbo"))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(TURBO_SCHEDULER))
    ours = Img2ImgPipeline.from_pretrained(folder)
    assert ours.default_scheduler == "euler_a"
    ref = diffusers_pipeline(folder, "euler_a")
    assert_matches_diffusers("tiny_sd15-turbo", ours, ref, 0, prompt="a cat", image=sketch_image(64, 64),
                             strength=strength, num_inference_steps=steps, guidance_scale=0.0)


def test_turbo_step_count_too_small_for_strength(tiny_sd15: Path) -> None:
    pipe = Img2ImgPipeline.from_pretrained(tiny_sd15)
    with pytest.raises(ValueError, match="strength"):
        pipe(prompt="x", image=sketch_image(64, 64), strength=0.3, num_inference_steps=2, guidance_scale=0.0)


@pytest.mark.parametrize("steps,strength", [(4, 0.5), (4, 1.0), (2, 0.8), (6, 0.3)])
def test_lcm_matches_latent_consistency_img2img(tiny_lcm: Path, steps: int, strength: float) -> None:
    """LCM's own img2img semantics: the strength cuts LCM's origin schedule, then the steps are spaced."""
    import diffusers

    ref = diffusers.LatentConsistencyModelImg2ImgPipeline.from_pretrained(tiny_lcm, safety_checker=None,
                                                                         requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ours = Img2ImgPipeline.from_pretrained(tiny_lcm)
    assert ours.default_scheduler == "lcm"
    assert_matches_diffusers("tiny_lcm", ours, ref, 2, prompt="a lighthouse", image=sketch_image(64, 64),
                             strength=strength, num_inference_steps=steps, guidance_scale=8.5)


def test_lcm_strength_too_small_for_its_schedule(tiny_lcm: Path) -> None:
    pipe = Img2ImgPipeline.from_pretrained(tiny_lcm)
    with pytest.raises(ValueError, match="LCM takes its 8 steps"):
        pipe(prompt="x", image=sketch_image(64, 64), strength=0.1, num_inference_steps=8)
