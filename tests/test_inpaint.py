"""Inpainting and outpainting against diffusers' StableDiffusionInpaintPipeline and
StableDiffusionXLInpaintPipeline: same weights, prompts, masks and random draws, on tiny random models with
an ordinary (4-channel) and a dedicated inpainting (9-channel) UNet."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mlx_img2img import Img2ImgPipeline
from mlx_img2img.errors import ImageInputError
from mlx_img2img.inpaint import (
    MaskError,
    crop_region,
    gaussian_blur,
    margins_in_pixels,
    outpaint_canvas,
    parse_margins,
)
from tests.test_pipeline import (
    MAX_PIXEL_DIFF,
    SCHEDULERS,
    TorchNoise,
    assert_same_images,
    sketch_image,
    with_scheduler,
)

STEPS = 6
PROMPT = "a red door in a white wall"


def box_mask(width: int, height: int) -> Image.Image:
    """White (repaint) over a box left of the centre, black elsewhere."""
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle([width // 4, height // 4, width // 2 + 8, 3 * height // 4], fill=255)
    return mask


_cache: dict = {}


def pipelines(folder: Path, sdxl: bool = False):
    """Ours and diffusers' inpainting pipeline on one model, loaded once."""
    import diffusers

    if folder not in _cache:
        cls = diffusers.StableDiffusionXLInpaintPipeline if sdxl else diffusers.StableDiffusionInpaintPipeline
        extra = {} if sdxl else dict(safety_checker=None, requires_safety_checker=False)
        ref = cls.from_pretrained(folder, **extra)
        ref.set_progress_bar_config(disable=True)
        _cache[folder] = Img2ImgPipeline.from_pretrained(folder), ref
    return _cache[folder]


def compare(label: str, ours: Img2ImgPipeline, ref, scheduler: str, seed: int = 3, **kwargs) -> Image.Image:
    """Ours against diffusers (given the input's size, which it does not take by default) on the same draws."""
    image = kwargs["image"]
    expected = with_scheduler(ref, scheduler)(**kwargs, width=image.width, height=image.height,
                                              generator=torch.Generator().manual_seed(seed)).images
    got = ours(**kwargs, scheduler=scheduler, noise_source=TorchNoise(seed)).images
    assert_same_images(label, scheduler, kwargs["strength"], got, expected)
    return got[0]


def changed(a: Image.Image, b: Image.Image, where: np.ndarray) -> float:
    """Mean absolute pixel difference over the pixels `where` is true."""
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean(axis=-1)
    return float(d[where].mean())


# (strength, width, height, padding_mask_crop): strengths including 1.0 (pure noise), a non-square size, a crop
CASES = [(0.6, 64, 64, None), (1.0, 80, 48, None), (0.75, 64, 64, 8)]


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_inpainting_unet_matches_diffusers(tiny_sd15_inpaint: Path, scheduler: str) -> None:
    """The 9-channel UNet, every sampler; the three cases take turns so each runs twice."""
    ours, ref = pipelines(tiny_sd15_inpaint)
    strength, width, height, crop = CASES[SCHEDULERS.index(scheduler) % len(CASES)]
    image, mask = sketch_image(width, height), box_mask(width, height)
    got = compare("tiny_sd15_inpaint", ours, ref, scheduler, image=image, mask_image=mask, prompt=PROMPT,
                  strength=strength, num_inference_steps=STEPS, padding_mask_crop=crop)
    assert got.size == image.size
    repaint = np.asarray(mask) > 0
    assert changed(got, image, repaint) > 10  # the masked area is repainted


@pytest.mark.parametrize("scheduler,case", [("pndm", 0), ("euler_a", 1)])
def test_ordinary_unet_matches_diffusers(tiny_sd15: Path, scheduler: str, case: int) -> None:
    """The 4-channel UNet: the noised original blended back outside the mask after each step."""
    ours, ref = pipelines(tiny_sd15)
    strength, width, height, crop = CASES[case]
    image, mask = sketch_image(width, height), box_mask(width, height)
    compare("tiny_sd15", ours, ref, scheduler, image=image, mask_image=mask, prompt=PROMPT, strength=strength,
            num_inference_steps=STEPS, padding_mask_crop=crop, negative_prompt="blurry")


@pytest.mark.parametrize("model,scheduler,strength",
                         [("tiny_sdxl", "euler_a", 1.0), ("tiny_sdxl_inpaint", "ddim", 0.7)])
def test_sdxl_matches_diffusers(model: str, scheduler: str, strength: float, request: pytest.FixtureRequest) -> None:
    """SDXL's inpainting pipeline, ordinary and 9-channel UNets (its micro-conditioning; pure noise scaled by
    sqrt(sigma^2 + 1) with "leading" spacing; the ancestral draws after the masked image's)."""
    ours, ref = pipelines(request.getfixturevalue(model), sdxl=True)
    image = sketch_image(80, 48)
    compare(model, ours, ref, scheduler, image=image, mask_image=box_mask(80, 48), prompt=PROMPT,
            strength=strength, num_inference_steps=STEPS, guidance_scale=5.0)


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


@pytest.mark.parametrize("model,strength", [("tiny_sd15", 0.6), ("tiny_sd15_inpaint", 1.0)])
def test_one_seed_per_image_matches_diffusers_list_of_generators(model: str, strength: float,
                                                                 request: pytest.FixtureRequest) -> None:
    """seed=[7, 8] against diffusers given one CPU generator per image (Euler a: every step draws too). Given
    one image, diffusers encodes it (and the masked image) once, with the first generator only, so image 2
    would not be the one seed 8 gives alone; given the image once per generator, as its img2img pipeline
    repeats the image for a list of generators, every draw of image i comes from generator i: that is the
    oracle."""
    ours, ref = pipelines(request.getfixturevalue(model))
    image, mask = sketch_image(64, 64), box_mask(64, 64)
    seeds = [7, 8]
    kwargs = dict(prompt=PROMPT, strength=strength, num_inference_steps=4, num_images_per_prompt=2)
    expected = with_scheduler(ref, "euler_a")(**kwargs, image=[image, image], mask_image=[mask, mask], width=64,
                                              height=64, generator=[torch.Generator("cpu").manual_seed(s)
                                                                    for s in seeds]).images
    result = ours(**kwargs, image=image, mask_image=mask, scheduler="euler_a", seed=seeds, rng="torch")
    assert_same_images(f"{model} seed list", "euler_a", strength, result.images, expected)
    assert result.seeds == seeds and result.seed == 7
    assert changed(result.images[0], result.images[1], np.asarray(mask) > 0) > 10


def test_one_seed_per_image_is_the_image_its_seed_gives_alone(tiny_sd15: Path, tiny_sd15_inpaint: Path) -> None:
    """Each image of a seed=[...] batch is the single run with its seed, whatever the inpainting draws: the
    "latent_noise" fill (from the sampled or the mean posterior), a crop, the 9-channel UNet's masked image."""
    image, mask = sketch_image(64, 64), box_mask(64, 64)
    cases = [(tiny_sd15, dict(inpaint_fill="latent_noise")),
             (tiny_sd15, dict(inpaint_fill="latent_noise", posterior="mean", padding_mask_crop=8)),
             (tiny_sd15_inpaint, dict(strength=0.7))]
    for folder, extra in cases:
        ours, _ = pipelines(folder)
        kwargs = dict(prompt=PROMPT, image=image, mask_image=mask, num_inference_steps=3, scheduler="euler_a",
                      **{"strength": 0.6, **extra})
        batch = ours(**kwargs, num_images_per_prompt=2, seed=[7, 8]).images
        for seed, got in zip([7, 8], batch, strict=True):
            assert max_diff(got, ours(**kwargs, seed=seed).images[0]) <= 1, (folder.name, extra, seed)
        assert changed(batch[0], batch[1], np.asarray(mask) > 0) > 5, (folder.name, extra)


def test_the_oracle_is_well_conditioned_and_the_noise_matters(tiny_sd15_inpaint: Path) -> None:
    """diffusers moves less than the tolerance when its start noise moves by 1e-5, while another seed moves
    the masked area a lot: a parity within MAX_PIXEL_DIFF says the draws are the same, not that they do not
    matter."""
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as module

    _, ref = pipelines(tiny_sd15_inpaint)
    image, mask = sketch_image(64, 64), box_mask(64, 64)
    kwargs = dict(prompt=PROMPT, image=image, mask_image=mask, strength=1.0, num_inference_steps=STEPS,
                  width=64, height=64)

    def run(seed: int, nudge: float = 0.0) -> np.ndarray:
        draw = module.randn_tensor
        nudged = lambda *a, **k: draw(*a, **k) + nudge  # noqa: E731
        with mock.patch.object(module, "randn_tensor", nudged):
            out = with_scheduler(ref, "euler_a")(**kwargs, generator=torch.Generator().manual_seed(seed)).images[0]
        return np.asarray(out, np.int16)

    base = run(3)
    assert np.abs(run(3, 1e-5) - base).max() < MAX_PIXEL_DIFF
    assert np.abs(run(4) - base)[np.asarray(mask) > 0].mean() > 10


def test_keep_unmasked_keeps_every_pixel_beyond_the_blur(tiny_sd15: Path) -> None:
    """With keep_unmasked the pixels the blurred mask does not reach are the input's, exactly; without it
    the VAE's round trip changes them (so the test can fail)."""
    ours, _ = pipelines(tiny_sd15)
    image, mask = sketch_image(64, 64), box_mask(64, 64)
    kwargs = dict(prompt=PROMPT, image=image, mask_image=mask, strength=0.7, num_inference_steps=2, seed=1,
                  mask_blur=2)
    kept = ours(**kwargs, keep_unmasked=True).images[0]
    plain = ours(**kwargs).images[0]
    far = gaussian_blur(np.asarray(mask) / 255.0, 2) == 0
    assert 0 < far.sum() < far.size
    assert np.array_equal(np.asarray(kept)[far], np.asarray(image)[far])
    assert changed(plain, image, far) > 1
    assert changed(kept, image, np.asarray(mask) > 0) > 10


def test_outpainting_extends_the_canvas_and_keeps_the_original(tiny_sd15: Path) -> None:
    ours, _ = pipelines(tiny_sd15)
    image = sketch_image(48, 40)
    margins = margins_in_pixels(parse_margins("0,25%,8,16"), image.width, image.height)
    assert margins == (0, 16, 8, 16)  # 25% of 48 = 12 grows to 16 for a width of 80
    canvas, mask = outpaint_canvas(image, margins, seam=2)
    assert canvas.size == mask.size == (80, 48)
    inside = (slice(0, 40), slice(16, 64))
    assert np.array_equal(np.asarray(canvas)[inside], np.asarray(image))
    assert not np.asarray(mask)[inside].any() and np.asarray(mask)[:, :8].min() == 255
    out = ours(prompt=PROMPT, image=canvas, mask_image=mask, strength=1.0, num_inference_steps=2, seed=0,
               keep_unmasked=True).images[0]
    assert out.size == (80, 48)
    assert np.array_equal(np.asarray(out)[inside], np.asarray(image))
    assert changed(out, canvas, np.asarray(mask) == 255) > 5  # the new area is painted, not the stretched edge


def test_margins_in_css_order() -> None:
    assert parse_margins("64") == ("64",) * 4
    assert parse_margins("10,20") == ("10", "20", "10", "20")
    assert parse_margins("1,2,3") == ("1", "2", "3", "2")
    for bad in ("", "1,2,3,4,5", "-8", "ten", "5px"):
        with pytest.raises(ValueError, match="outpaint"):
            parse_margins(bad)
    with pytest.raises(ValueError, match="every margin is 0"):
        margins_in_pixels(parse_margins("0"), 64, 64)


def test_crop_region_matches_diffusers() -> None:
    from diffusers.image_processor import VaeImageProcessor

    cases = [((10, 5, 20, 30), (64, 64), 4), ((0, 40, 60, 47), (80, 48), 8), ((50, 2, 63, 6), (64, 96), 0)]
    for box, size, pad in cases:
        mask = Image.new("L", size, 0)
        ImageDraw.Draw(mask).rectangle(box, fill=200)
        expected = VaeImageProcessor.get_crop_region(mask, size[0], size[1], pad=pad)
        assert crop_region(np.asarray(mask), size[0], size[1], pad) == tuple(expected)


def test_all_white_mask_is_img2img(tiny_sd15: Path) -> None:
    ours, _ = pipelines(tiny_sd15)
    kwargs = dict(prompt=PROMPT, image=sketch_image(64, 64), strength=0.5, num_inference_steps=4, scheduler="ddim")
    img2img = ours(**kwargs, noise_source=TorchNoise(5)).images[0]
    white = ours(**kwargs, mask_image=Image.new("L", (64, 64), 255), noise_source=TorchNoise(5)).images[0]
    assert np.array_equal(np.asarray(white), np.asarray(img2img))


def test_bad_masks(tiny_sd15: Path, tmp_path: Path) -> None:
    ours, _ = pipelines(tiny_sd15)
    kwargs = dict(prompt=PROMPT, image=sketch_image(64, 64), strength=0.5, num_inference_steps=2, seed=0)
    with pytest.raises(MaskError, match="all black"):
        ours(**kwargs, mask_image=Image.new("L", (64, 64), 0))
    with pytest.raises(MaskError, match="all black"):
        ours(**kwargs, mask_image=Image.new("L", (64, 64), 100))  # grey below one half is binarised to black
    text = tmp_path / "mask.png"
    text.write_text("not an image")
    with pytest.raises(ImageInputError, match="not an image"):
        ours(**kwargs, mask_image=text)
    with pytest.raises(ImageInputError, match="no such file"):
        ours(**kwargs, mask_image=tmp_path / "missing.png")
    with pytest.raises(TypeError, match="mask_image"):
        ours(**kwargs, mask_image=3)
    for bad in (dict(inpaint_fill="smear"), dict(mask_blur=-1), dict(padding_mask_crop=-4)):
        with pytest.raises(ValueError):
            ours(**kwargs, mask_image=box_mask(64, 64), **bad)
    with pytest.warns(UserWarning, match="resized to the image"):
        out = ours(**kwargs, mask_image=box_mask(32, 32)).images[0]
    assert out.size == (64, 64)


def test_fill_modes_change_only_the_start(tiny_sd15: Path) -> None:
    """AUTOMATIC1111's fills: the masked area starts from something else (so the result differs there),
    the kept area is pasted back unchanged."""
    ours, _ = pipelines(tiny_sd15)
    image, mask = sketch_image(64, 64), box_mask(64, 64)
    kwargs = dict(prompt=PROMPT, image=image, mask_image=mask, strength=0.5, num_inference_steps=2, seed=2,
                  keep_unmasked=True)
    original = ours(**kwargs).images[0]
    repaint = np.asarray(mask) > 0
    for fill in ("fill", "latent_noise", "latent_nothing"):
        filled = ours(**kwargs, inpaint_fill=fill).images[0]
        assert changed(filled, original, repaint) > 1, fill
        assert np.array_equal(np.asarray(filled)[~repaint], np.asarray(image)[~repaint]), fill


# ------------------------------------------------------------------------------------------ command line


def cli_run(model: Path, *args: object):
    from click.testing import CliRunner

    from mlx_img2img.cli import main

    return CliRunner().invoke(main, ["run", "-m", str(model), "--steps", "2", "--dtype", "float32", "-p", PROMPT,
                                     "--seed", "1", *map(str, args)])


def test_cli_series_with_a_mask_folder_and_transparency(tiny_sd15: Path, tmp_path: Path) -> None:
    """A mask folder matched by file name (an input without one is skipped and reported); an input's own
    transparency as its mask; the kept pixels exactly the input's; the mask stored by name and hash."""
    from mlx_img2img.images import read_metadata

    inputs, masks = tmp_path / "in", tmp_path / "masks"
    inputs.mkdir()
    masks.mkdir()
    image = sketch_image(64, 48)
    image.save(inputs / "a.png")
    image.save(inputs / "b.png")
    box_mask(64, 48).save(masks / "a.png")
    result = cli_run(tiny_sd15, inputs, "--mask", masks, "-o", tmp_path / "out", "-s", "0.5", "--mask-blur", 2)
    assert "b.png: no mask of that name" in result.output
    out = np.asarray(Image.open(tmp_path / "out" / "a.png").convert("RGB"))
    far = gaussian_blur(np.asarray(box_mask(64, 48)) / 255.0, 2) == 0
    assert np.array_equal(out[far], np.asarray(image)[far])
    _, stored = read_metadata(tmp_path / "out" / "a.png")
    assert stored["mask"] == str(masks / "a.png") and len(stored["mask_sha256"]) == 64
    assert not (tmp_path / "out" / "b.png").exists()

    rgba = np.dstack([np.asarray(image), np.full((48, 64), 255, np.uint8)])
    rgba[8:24, 8:30, 3] = 0  # erased in an image editor
    Image.fromarray(rgba).save(tmp_path / "erased.png")
    result = cli_run(tiny_sd15, tmp_path / "erased.png", "-o", tmp_path / "out2", "-s", "0.6", "--mask-blur", 0)
    assert result.exit_code == 0, result.output
    out = np.asarray(Image.open(tmp_path / "out2" / "erased.png").convert("RGB"))
    kept = rgba[..., 3] == 255
    assert np.array_equal(out[kept], np.asarray(image)[kept]) and not np.array_equal(out[~kept], rgba[~kept, :3])


def test_cli_bad_masks_and_outpaint(tiny_sd15: Path, tmp_path: Path) -> None:
    image = tmp_path / "in.png"
    sketch_image(64, 48).save(image)
    Image.new("L", (64, 48), 0).save(tmp_path / "black.png")
    (tmp_path / "text.png").write_text("no image")
    for mask, message in (("black.png", "all black"), ("text.png", "not an image"), ("none.png", "no such file")):
        result = cli_run(tiny_sd15, image, "--mask", tmp_path / mask, "-o", tmp_path / "out")
        assert message in result.output, result.output
    result = cli_run(tiny_sd15, image, "--outpaint", "10%", "--mask", tmp_path / "black.png")
    assert result.exit_code != 0 and "--outpaint makes its own mask" in result.output
    assert "outpaint" in cli_run(tiny_sd15, image, "--outpaint", "left").output
    result = cli_run(tiny_sd15, image, "--outpaint", "0,16,0,0", "-s", "1", "-o", tmp_path / "wide")
    assert result.exit_code == 0, result.output
    out = np.asarray(Image.open(tmp_path / "wide" / "in.png").convert("RGB"))
    assert out.shape == (48, 80, 3) and np.array_equal(out[:, :64], np.asarray(sketch_image(64, 48)))
