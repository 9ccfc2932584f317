"""ControlNet against diffusers' ControlNet img2img pipelines on tiny random ControlNets (built by diffusers from
the tiny models' UNets, then randomised so that the control visibly matters), and the preprocessors against
OpenCV's Canny (a test-only oracle)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mlx_img2img import Img2ImgPipeline, control
from mlx_img2img.errors import ModelFormatError
from mlx_img2img.loading import controlnet as loading
from mlx_img2img.models.controlnet import ControlNetConfig
from mlx_img2img.parallel import map_batch
from tests.test_pipeline import MAX_PIXEL_DIFF, TorchNoise, assert_same_images, sketch_image
from tests.test_single_file import unet_to_original
from tests.tiny_models import _scale_weights

STEPS = 8
STRENGTH = 0.5  # 4 of the 8 steps run
PROMPT = "a watercolour painting of a house, golden hour"
CONTROLNET_SCALE = 1.5  # random weights at this scale (as the tiny SD 1.x UNet's): the control moves the image


def make_controlnet(model: Path, folder: Path, seed: int) -> Path:
    """A ControlNet in the diffusers layout, made by diffusers from the model's UNet, weights redrawn. Of an
    inpainting UNet (9 input channels), a ControlNet of the latents' 4, as inpainting ControlNets are."""
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(model / "unet")
    if unet.config.in_channels != 4:
        unet = diffusers.UNet2DConditionModel.from_config(unet.config, in_channels=4)
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    _scale_weights(net, CONTROLNET_SCALE, seed)
    net.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sd15_nets(tiny_sd15: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return [make_controlnet(tiny_sd15, tmp_path_factory.mktemp(f"cn{i}"), 70 + i) for i in range(2)]


@pytest.fixture(scope="module")
def sdxl_net(tiny_sdxl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_controlnet(tiny_sdxl, tmp_path_factory.mktemp("cnxl"), 80)


def reference(model: Path, nets: list[Path], sdxl: bool = False):
    import diffusers

    controlnet = [diffusers.ControlNetModel.from_pretrained(n) for n in nets]
    if sdxl:
        pipe = diffusers.StableDiffusionXLControlNetImg2ImgPipeline.from_pretrained(
            model, controlnet=controlnet[0] if len(nets) == 1 else controlnet)
    else:
        pipe = diffusers.StableDiffusionControlNetImg2ImgPipeline.from_pretrained(
            model, controlnet=controlnet[0] if len(nets) == 1 else controlnet, safety_checker=None,
            requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diff(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))


def jittered(monkeypatch: pytest.MonkeyPatch, ref, **kwargs) -> Image.Image:
    """diffusers' image with its start noise moved by 1e-5: a well-conditioned case moves less than the tolerance."""
    import sys

    module = sys.modules[type(ref).__module__]
    draw = module.randn_tensor

    def moved(*args, **kw):
        x = draw(*args, **kw)
        return x + 1e-5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(99))

    monkeypatch.setattr(module, "randn_tensor", moved)
    try:
        return ref(**kwargs, generator=torch.Generator().manual_seed(0)).images[0]
    finally:
        monkeypatch.setattr(module, "randn_tensor", draw)


def sketch_control(width: int, height: int) -> Image.Image:
    return control.canny(sketch_image(width, height))


def other_control(width: int, height: int) -> Image.Image:
    """Other lines: a window grid, white on black."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    for x in range(4, width, 12):
        draw.line([(x, 0), (x, height)], fill=(255, 255, 255), width=2)
    draw.ellipse([width // 3, height // 3, 2 * width // 3, 2 * height // 3], outline=(255, 255, 255), width=3)
    return image


# (label, ControlNets, scale, start, end, guidance, guess mode)
CASES = [
    ("scale 1", 1, 1.0, 0.0, 1.0, 7.5, False),
    ("scale 0.5, window 0.2-0.7", 1, 0.5, 0.2, 0.7, 7.5, False),
    ("two ControlNets", 2, [1.0, 0.5], [0.0, 0.3], [1.0, 0.8], 7.5, False),
    ("no CFG", 1, 1.0, 0.0, 1.0, 1.0, False),
    ("guess mode", 1, 1.0, 0.0, 1.0, 5.0, True),
]


_pipelines: dict[int, tuple] = {}


def loaded(model: Path, nets: list[Path], n: int) -> tuple:
    """Ours and diffusers' ControlNet img2img pipeline with the first n ControlNets, loaded once."""
    if n not in _pipelines:
        _pipelines[n] = (Img2ImgPipeline.from_pretrained(model, controlnet=nets[:n]), reference(model, nets[:n]))
    return _pipelines[n]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_diffusers_controlnet_img2img(case, tiny_sd15: Path, sd15_nets: list[Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    label, n, scale, start, end, guidance, guess = case
    ours, ref = loaded(tiny_sd15, sd15_nets, n)
    images = [sketch_control(64, 64), other_control(64, 64)][:n]
    kwargs = dict(prompt=PROMPT, image=sketch_image(64, 64), strength=STRENGTH, num_inference_steps=STEPS,
                  guidance_scale=guidance, control_image=images[0] if n == 1 else images,
                  controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end,
                  guess_mode=guess)
    expected = ref(**kwargs, generator=torch.Generator().manual_seed(0)).images
    got = ours(**kwargs, noise_source=TorchNoise(0)).images
    assert_same_images(f"tiny_sd15 controlnet {label}", ours.default_scheduler, STRENGTH, got, expected)
    if label == "scale 1":  # the case is well conditioned, and the control visibly matters
        assert diff(jittered(monkeypatch, ref, **kwargs), expected[0]).max() < MAX_PIXEL_DIFF
        blank = dict(kwargs, control_image=Image.new("RGB", (64, 64)))
        assert diff(ref(**blank, generator=torch.Generator().manual_seed(0)).images[0], expected[0]).mean() > 0.1


def test_sdxl_matches_diffusers(tiny_sdxl: Path, sdxl_net: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusers

    ours = Img2ImgPipeline.from_pretrained(tiny_sdxl, controlnet=sdxl_net)
    ref = reference(tiny_sdxl, [sdxl_net], sdxl=True)
    kwargs = dict(prompt=PROMPT, image=sketch_image(64, 64), strength=STRENGTH, num_inference_steps=STEPS,
                  guidance_scale=5.0, control_image=sketch_control(64, 64), controlnet_conditioning_scale=0.8)
    expected = ref(**kwargs, generator=torch.Generator().manual_seed(0)).images
    got = ours(**kwargs, noise_source=TorchNoise(0)).images
    assert_same_images("tiny_sdxl controlnet", ours.default_scheduler, STRENGTH, got, expected)
    assert diff(jittered(monkeypatch, ref, **kwargs), expected[0]).max() < MAX_PIXEL_DIFF
    plain = ours(**{k: v for k, v in kwargs.items() if k != "controlnet_conditioning_scale"},
                 controlnet_conditioning_scale=0.0, noise_source=TorchNoise(0)).images[0]
    assert diff(plain, got[0]).mean() > 0.1  # the control visibly matters
    # With a mask: StableDiffusionXLControlNetInpaintPipeline on the same parts.
    from tests.test_inpaint import box_mask

    inpaint = diffusers.StableDiffusionXLControlNetInpaintPipeline(**ref.components)
    inpaint.set_progress_bar_config(disable=True)
    kwargs = dict(kwargs, mask_image=box_mask(64, 64), strength=0.75)
    sized = dict(kwargs, width=64, height=64)
    expected = inpaint(**sized, generator=torch.Generator().manual_seed(0)).images
    got = ours(**kwargs, noise_source=TorchNoise(0)).images
    assert_same_images("tiny_sdxl controlnet inpaint", ours.default_scheduler, 0.75, got, expected)
    assert diff(jittered(monkeypatch, inpaint, **sized), expected[0]).max() < MAX_PIXEL_DIFF


def test_inpainting_matches_diffusers_controlnet_inpaint(tiny_sd15: Path, sd15_nets: list[Path],
                                                         tiny_sd15_inpaint: Path, tmp_path_factory,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A mask with a ControlNet, as StableDiffusionControlNetInpaintPipeline: an ordinary UNet (the noised
    original blended back outside the mask) and an inpainting UNet (9 channels; the ControlNet sees the latents'
    4)."""
    import diffusers

    from tests.test_inpaint import box_mask

    ours4, img2img = loaded(tiny_sd15, sd15_nets, 1)
    net9 = make_controlnet(tiny_sd15_inpaint, tmp_path_factory.mktemp("cn9"), 72)
    pipes = [("4-channel UNet", ours4, diffusers.StableDiffusionControlNetInpaintPipeline(**img2img.components)),
             ("9-channel UNet", Img2ImgPipeline.from_pretrained(tiny_sd15_inpaint, controlnet=net9),
              diffusers.StableDiffusionControlNetInpaintPipeline.from_pretrained(
                  tiny_sd15_inpaint, controlnet=diffusers.ControlNetModel.from_pretrained(net9),
                  safety_checker=None, requires_safety_checker=False))]
    mask = box_mask(64, 64)
    for label, ours, ref in pipes:
        ref.set_progress_bar_config(disable=True)
        kwargs = dict(prompt=PROMPT, image=sketch_image(64, 64), mask_image=mask, strength=STRENGTH,
                      num_inference_steps=STEPS, control_image=sketch_control(64, 64),
                      controlnet_conditioning_scale=1.0)
        sized = dict(kwargs, width=64, height=64)  # diffusers' inpainting pipelines do not take the input's size
        expected = ref(**sized, generator=torch.Generator().manual_seed(0)).images
        got = ours(**kwargs, noise_source=TorchNoise(0)).images
        assert_same_images(f"controlnet inpaint, {label}", ours.default_scheduler, STRENGTH, got, expected)
        assert diff(jittered(monkeypatch, ref, **sized), expected[0]).max() < MAX_PIXEL_DIFF
    # The control moves the repainted area (the 4-channel case's ControlNet is img2img's "scale 1" one).
    blank = dict(sized, control_image=Image.new("RGB", (64, 64)))
    other = ref(**blank, generator=torch.Generator().manual_seed(0)).images[0]
    assert diff(other, expected[0])[np.asarray(mask) > 0].mean() > 1


def test_wrong_family_and_missing_inputs_are_one_line_errors(tiny_sd15: Path, tiny_sdxl: Path,
                                                             sdxl_net: Path, sd15_nets: list[Path]) -> None:
    with pytest.raises(ModelFormatError, match="does not fit"):
        Img2ImgPipeline.from_pretrained(tiny_sd15, controlnet=sdxl_net)
    pipe = Img2ImgPipeline.from_pretrained(tiny_sd15)
    args = dict(prompt="x", image=sketch_image(64, 64), strength=0.5, num_inference_steps=2)
    with pytest.raises(ValueError, match="needs a ControlNet"):
        pipe(**args, control_image=sketch_control(64, 64))
    pipe.load_controlnet(sd15_nets)
    with pytest.raises(ValueError, match="needs a control_image"):
        pipe(**args)
    with pytest.raises(ValueError, match="one per ControlNet"):
        pipe(**args, control_image=sketch_control(64, 64))
    with pytest.raises(ValueError, match="start < end"):
        pipe(**args, control_image=[sketch_control(64, 64)] * 2, control_guidance_start=0.6, control_guidance_end=0.4)
    with pytest.raises(ModelFormatError, match="no config.json"):
        pipe.load_controlnet(tiny_sd15 / "vae" / "..")


def test_command_line_stores_the_controlnet_and_loads_a_stored_one_only_when_asked(
        tiny_sd15: Path, sd15_nets: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from mlx_img2img import images
    from mlx_img2img.cli import main

    monkeypatch.chdir(tmp_path)
    sketch_image(64, 64).save("sketch.png")

    def cli(*args: object):
        result = CliRunner().invoke(main, [str(a) for a in ("run", "-m", tiny_sd15, "--steps", 4, "--dtype", "float32",
                                                            "sketch.png", "-p", "a house", "-s", 0.5, *args)])
        assert result.exit_code == 0, result.output
        return result

    cli("--controlnet", sd15_nets[0], "--control-preprocess", "canny", "--control-scale", 0.7, "--control-end", 0.5,
        "--seed", 1, "-o", "cn.png")
    pipe = Img2ImgPipeline.from_pretrained(tiny_sd15, controlnet=sd15_nets[0])
    expected = pipe("a house", sketch_image(64, 64), strength=0.5, num_inference_steps=4, seed=1,
                    control_image=control.canny(sketch_image(64, 64)), controlnet_conditioning_scale=0.7,
                    control_guidance_end=0.5).images[0]
    with Image.open("cn.png") as written:
        assert diff(written.convert("RGB"), expected).max() == 0
    _, stored = images.read_metadata(Path("cn.png"))
    assert stored["controlnet"] == [str(sd15_nets[0])] and stored["control_scale"] == [0.7]
    assert stored["control_end"] == 0.5 and stored["control_preprocess"] == "canny"
    assert "not loading the controlnet" in cli("--from", "cn.png", "-o", "plain.png").stderr
    cli("--from", "cn.png", "--stored-model", "-o", "again.png")
    with Image.open("again.png") as again:
        assert diff(again.convert("RGB"), expected).max() == 0

    # by its name in the models folder (AUTOMATIC1111's ControlNet/ subfolder), the same ControlNet
    (tmp_path / "models" / "ControlNet").mkdir(parents=True)
    (tmp_path / "models" / "ControlNet" / "cn-mine").symlink_to(sd15_nets[0], target_is_directory=True)
    cli("--models-dir", "models", "--controlnet", "cn-mine", "--control-preprocess", "canny", "--control-scale", 0.7,
        "--control-end", 0.5, "--seed", 1, "-o", "named.png")
    with Image.open("named.png") as named:
        assert diff(named.convert("RGB"), expected).max() == 0
    assert images.read_metadata(Path("named.png"))[1]["controlnet"] == ["cn-mine"]


def test_map_batch_slices_nested_keyword_arguments() -> None:
    """Residuals travel as keyword lists: each part gets its own slice, and results may be nested too."""
    x = mx.arange(24, dtype=mx.float32).reshape(4, 6)

    def fn(a, b, residuals=None, scale=1.0):
        return [a * scale + b + residuals[0]], a.sum(axis=1, keepdims=True) + residuals[1]

    args = (x, mx.ones((1, 6)))  # the second is not batch-sized: passed whole
    kwargs = dict(residuals=[x * 2, x[:, :1] - 1], scale=0.5)
    ([first], second) = map_batch(fn, 4, *args, **kwargs)
    ([e1], e2) = fn(*args, **kwargs)
    np.testing.assert_array_equal(np.array(first), np.array(e1))
    np.testing.assert_array_equal(np.array(second), np.array(e2))


# ------------------------------------------------------------------------------------------ single files


def controlnet_to_original(sd: dict, config: dict, prefix: str = "control_model.") -> dict:
    """A diffusers ControlNet state dict in the original layout (ControlNet 1.1's files): the down path and mid
    block as the UNet's (test_single_file's converter), the hint block's convolutions at 0, 2, 4, ... (SiLUs
    between them), zero convolutions and the mid block's."""
    blocks = len({k for k in sd if k.startswith("controlnet_cond_embedding.blocks.") and k.endswith(".weight")})
    out, rest = {}, {}
    for key, value in sd.items():
        if m := re.match(r"controlnet_cond_embedding\.conv_in\.(.+)", key):
            out[f"input_hint_block.0.{m[1]}"] = value
        elif m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.+)", key):
            out[f"input_hint_block.{2 * int(m[1]) + 2}.{m[2]}"] = value
        elif m := re.match(r"controlnet_cond_embedding\.conv_out\.(.+)", key):
            out[f"input_hint_block.{2 * blocks + 2}.{m[1]}"] = value
        elif m := re.match(r"controlnet_down_blocks\.(\d+)\.(.+)", key):
            out[f"zero_convs.{m[1]}.0.{m[2]}"] = value
        elif m := re.match(r"controlnet_mid_block\.(.+)", key):
            out[f"middle_block_out.0.{m[1]}"] = value
        else:
            rest[key] = value
    n = len(config["block_out_channels"])
    unet = unet_to_original(rest, {**config, "up_block_types": ["UpBlock2D"] * n})
    out.update({k.removeprefix("model.diffusion_model."): v for k, v in unet.items()})
    return {prefix + k: v for k, v in out.items()}


def _state_dict(folder: Path) -> dict:
    from safetensors.torch import load_file

    (file,) = folder.glob("*.safetensors")
    return load_file(file)


@pytest.fixture(scope="module")
def controlnet_files(sd15_nets: list[Path], sdxl_net: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny SD 1.5 ControlNet with ControlNet 1.1's control_model. prefix, the SDXL one without a prefix."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("cnfiles")
    files = {}
    for name, net, prefix in (("sd15", sd15_nets[0], "control_model."), ("sdxl", sdxl_net, "")):
        config = json.loads((net / "config.json").read_text())
        files[name] = (folder / f"control_{name}.safetensors", net)
        save_file(controlnet_to_original(_state_dict(net), config, prefix), files[name][0])
    return files


def test_single_file_controlnets_load_as_their_folders(controlnet_files: dict, tiny_sd15: Path, tiny_sdxl: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import diffusers

    for name, model in (("sd15", tiny_sd15), ("sdxl", tiny_sdxl)):
        path, folder = controlnet_files[name]
        expected = _state_dict(folder)  # the diffusers model's own weights
        if name == "sd15":  # the file is what diffusers reads as this ControlNet (its converter has no SDXL keys)
            ref = diffusers.ControlNetModel.from_single_file(str(path), config=str(folder), local_files_only=True)
            assert all(torch.equal(v, expected[k]) for k, v in ref.state_dict().items())
        got = loading.ControlNetFile(path, config=folder).tensors("controlnet", mx.float32)
        assert set(got) == set(expected)
        for key, value in expected.items():
            np.testing.assert_array_equal(np.array(got[key]), value.numpy(), err_msg=key)
        # Without a config: the family's UNet config (here the tiny model's) and what the weights tell.
        unet = json.loads((model / "unet" / "config.json").read_text())
        monkeypatch.setattr(loading, "family_unet_config", lambda to_k, where, unet=unet: unet)
        derived = loading.ControlNetFile(path).config("controlnet")
        assert ControlNetConfig.from_dict(derived) == ControlNetConfig.from_dict(json.loads(
            (folder / "config.json").read_text()))
    # ... and through the pipeline (as --controlnet FILE): the folder's images exactly.
    unet = json.loads((tiny_sd15 / "unet" / "config.json").read_text())
    monkeypatch.setattr(loading, "family_unet_config", lambda to_k, where: unet)
    pipe = Img2ImgPipeline.from_pretrained(tiny_sd15, controlnet=controlnet_files["sd15"][0])
    monkeypatch.undo()
    args = dict(prompt=PROMPT, image=sketch_image(64, 64), strength=STRENGTH, num_inference_steps=STEPS, seed=3,
                control_image=sketch_control(64, 64))
    from_file = pipe(**args).images[0]
    pipe.load_controlnet(controlnet_files["sd15"][1])
    assert diff(from_file, pipe(**args).images[0]).max() == 0
    pipe.load_controlnet(controlnet_files["sd15"][0], config=controlnet_files["sd15"][1])  # the folder's config
    assert diff(from_file, pipe(**args).images[0]).max() == 0


def test_shipped_family_config_is_the_sd15_controlnets(tmp_path: Path) -> None:
    """The full-size SD 1.5 ControlNet (diffusers' defaults at text width 768, lllyasviel's ControlNet 1.1
    config) is what the shipped SD 1.x config and the weights' shapes make (shapes only: nothing allocated)."""
    import diffusers

    with torch.device("meta"):
        net = diffusers.ControlNetModel(cross_attention_dim=768)
    original = controlnet_to_original(net.state_dict(), dict(net.config))
    shapes = {k.removeprefix("control_model."): mx.zeros(tuple(v.shape)) for k, v in original.items()}  # lazy
    to_k = shapes["middle_block.1.transformer_blocks.0.attn2.to_k.weight"]
    base = loading.family_unet_config(to_k, "test")
    config = loading.controlnet_config_from_weights(loading.convert_controlnet(shapes, base, "test"), base)
    assert ControlNetConfig.from_dict(config) == ControlNetConfig.from_dict(json.loads(json.dumps(net.config)))


def test_single_file_refusals_are_one_line(tiny_sd15: Path, controlnet_files: dict, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    unet = tmp_path / "unet.safetensors"  # a model checkpoint's UNet given as a ControlNet
    save_file({"model.diffusion_model.time_embed.0.weight": torch.zeros(4, 4)}, unet)
    with pytest.raises(ModelFormatError, match="not a ControlNet file"):
        loading.ControlNetFile(unet)
    bare = tmp_path / "bare.safetensors"
    save_file({"time_embed.0.weight": torch.zeros(4, 4)}, bare)
    with pytest.raises(ModelFormatError, match="no ControlNet hint block"):
        loading.ControlNetFile(bare)
    with pytest.raises(ModelFormatError, match="text width 32, not one of"):  # tiny: no shipped family fits
        loading.ControlNetFile(controlnet_files["sd15"][0])
    with pytest.raises(ModelFormatError, match="pickles"):
        loading.ControlNetFile(tmp_path / "control.ckpt")
    with pytest.raises(ValueError, match="config is for single-file"):
        loading.load_controlnet(controlnet_files["sd15"][1], loading.LoadOptions(), config=tiny_sd15)


# ------------------------------------------------------------------------------------------ preprocessors


def photo_like(width: int = 96, height: int = 80, seed: int = 0, noise: float = 14.0) -> np.ndarray:
    """A sketch with pencil-like noise: edges of every strength and direction."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(sketch_image(width, height), np.float64) + rng.normal(0, noise, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("low, high", [(100, 200), (30, 90), (20.5, 60.7)])
def test_canny_is_opencvs(low: float, high: float) -> None:
    cv2 = pytest.importorskip("cv2")
    for pixels in (photo_like(), photo_like()[..., 1], np.asarray(sketch_image(72, 64))):
        expected = cv2.Canny(pixels, low, high) > 0
        got = control.canny_edges(pixels, low, high)
        assert expected.sum() > 50
        assert (got != expected).sum() == 0


def test_canny_with_a_gaussian_is_within_two_pixels_of_opencvs() -> None:
    cv2 = pytest.importorskip("cv2")
    pixels = photo_like(128, 112, seed=3, noise=3.0)
    for sigma in (1.0, 2.0):
        r = int(np.ceil(3 * sigma))
        blurred = cv2.GaussianBlur(pixels, (2 * r + 1, 2 * r + 1), sigma, borderType=cv2.BORDER_REPLICATE)
        expected = cv2.Canny(blurred, 30, 80) > 0  # OpenCV blurs to uint8: a few edge pixels move
        got = control.canny_edges(pixels, 30, 80, sigma)
        assert expected.sum() > 100
        for a, b in ((got, expected), (expected, got)):  # every edge pixel within 2 pixels of the other's
            near = np.zeros_like(b)
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    near |= np.roll(np.roll(b, dy, 0), dx, 1)
            assert (a & ~near).sum() == 0
        assert (got != expected).sum() <= 0.03 * expected.sum()


def test_preprocessors_on_a_pencil_sketch() -> None:
    sketch = Image.new("RGB", (40, 32), (250, 248, 240))
    ImageDraw.Draw(sketch).rectangle([8, 8, 30, 24], outline=(30, 30, 30), width=2)
    inverted = np.asarray(control.preprocess(sketch, "invert"))
    assert inverted[0, 0].tolist() == [5, 7, 15] and inverted[8, 8].tolist() == [225, 225, 225]
    edges = np.asarray(control.preprocess(sketch, "canny"))
    assert set(np.unique(edges)) == {0, 255} and (edges[..., 0] == edges[..., 2]).all()
    assert edges[:4].max() == 0 and edges[6:11, 6:11].max() == 255  # edges along the drawn lines only
    assert control.preprocess(sketch, "none").tobytes() == sketch.tobytes()
    with pytest.raises(ValueError, match="invert, canny, none"):
        control.preprocess(sketch, "depth")
    resized = control.control_pixels(sketch, 80, 64)
    assert resized.shape == (1, 64, 80, 3) and float(resized.max()) <= 1.0


def test_models_lists_the_controlnet_presets_and_download_refuses_cleanly_offline(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from click.testing import CliRunner
    from huggingface_hub import constants

    from mlx_img2img import weights
    from mlx_img2img.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty cache: nothing downloaded
    listed = CliRunner().invoke(main, ["models", "--models-dir", str(tmp_path)])
    assert listed.exit_code == 0, listed.output
    for name, repo in weights.CONTROLNET_PRESETS.items():
        assert any(line.split()[:2] == [name, repo] and "not downloaded" in line
                   for line in listed.output.splitlines()), name
    for args in (["scribble"], ["--controlnet", "lllyasviel/control_v11p_sd15_softedge"]):
        refused = CliRunner().invoke(main, ["download", *args])
        assert refused.exit_code != 0 and "Traceback" not in refused.output
        assert "not in the local Hugging Face cache and offline mode is on" in refused.output
        assert len(refused.output.strip().splitlines()) <= 2  # "Downloading ..." and the one-line reason
