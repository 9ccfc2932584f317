"""One request, one validate: a stored setting is checked as its flag is, a stored model is never loaded
unasked, the run is planned (and refused) before any weight loads, and the Python API checks its
arguments the same way. Each case here failed before the request/plan/run restructuring."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from mlx_img2img import Img2ImgPipeline, NumericalError
from mlx_img2img.request import BY_NAME, FIELDS, Request, RequestError

from .test_cli import assert_one_line_error, cli, in_tmp, noise_image, run, stored  # noqa: F401 (in_tmp: autouse)


def settings_png(path: Path, **settings: object) -> Path:
    """An image carrying our JSON settings chunk with these values, as a stranger's file might."""
    info = PngImagePlugin.PngInfo()
    info.add_text("mlx-img2img", json.dumps(settings))
    Image.new("RGB", (70, 54), "grey").save(path, pnginfo=info)
    return path


@pytest.fixture
def sketch(tmp_path: Path) -> Path:
    return noise_image(tmp_path / "sketch.png")


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> list:
    """Fail the test if any weights are loaded; returns the list of attempted loads."""
    loads: list = []

    def refuse(cls, source, **kwargs):  # noqa: ANN001, ANN003, ANN202
        loads.append(source)
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(Img2ImgPipeline, "from_source", classmethod(refuse))
    return loads


# ------------------------------------------------------------------------------------ the field table


def test_every_setting_is_declared_once_and_has_a_flag_and_a_check() -> None:
    names = [f.name for f in FIELDS]
    assert len(names) == len(set(names)) and set(names) <= set(Request.__dataclass_fields__)
    flags = [flag for f in FIELDS for flag in f.flags]
    assert len(flags) == len(set(flags)) and all(f.flags and f.help for f in FIELDS)
    for f in FIELDS:  # the default passes its own check
        assert f.validate(f.default) == f.default


def test_a_stored_value_and_a_flag_get_the_same_words() -> None:
    flag = cli("run", "x.png", "-p", "x", "-s", "1.5")
    assert_one_line_error(flag, 2, "1.5 is not in the range 0<=x<=1")
    with pytest.raises(RequestError, match=r"x.png: stored strength: 1.5 is not in the range 0<=x<=1"):
        Request().merged({"strength": 1.5}, set(), "x.png")


# ------------------------------------------------------------------------------- --from: stored values


@pytest.mark.parametrize("stored_settings, expected", [
    ({"max_side": 100000, "width": 4000}, "max_side: 100000 is not in the range 64<=x<=4096"),
    ({"width": 60000, "height": 60000}, "width: 60000 is not in the range 8<=x<=8192"),
    ({"seed": "abc"}, "bad.png: stored seed must be a whole number"),
    ({"guidance": "7"}, "stored guidance must be a number"),
    ({"prompt": ["a", "b"]}, "stored prompt must be text"),
    ({"prompt": {"a": 1}}, "stored prompt must be text"),
    ({"quantize": [8]}, "stored quantize must be a whole number"),
    ({"strength": "0.5"}, "stored strength must be a number"),
    ({"steps": 2.5}, "stored steps must be a whole number"),
    ({"guidance": math.inf}, "guidance: inf is not a finite number"),
    ({"prompt": "x" * 20_000}, "prompt is 20000 characters long"),
])
def test_stored_settings_are_checked_as_their_flags(stored_settings: dict, expected: str, sketch: Path,
                                                    no_loading: list) -> None:
    bad = settings_png(Path("bad.png"), **{"prompt": "a house", **stored_settings})
    start = time.perf_counter()
    result = cli("run", sketch, "--from", bad, "-o", "out.png")
    assert_one_line_error(result, 2, expected)
    assert time.perf_counter() - start < 10 and not no_loading and not Path("out.png").exists()


def test_a_model_stored_in_an_image_is_never_loaded_unasked(tiny_sd15: Path, sketch: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    import mlx_img2img.loading as loading

    original = loading.open_source
    monkeypatch.setattr(loading, "open_source", lambda name, **kw: opened.append(str(name)) or original(name, **kw))
    planted = settings_png(Path("planted.png"), prompt="a house", seed=3, steps=4, strength=0.5, dtype="float32",
                           model="someone/evil-model", refiner="/home/someone/secret-folder")
    result = cli("run", sketch, "--from", planted, "-m", tiny_sd15, "-o", "out.png")  # the user's model
    assert result.exit_code == 0, result.output
    assert "not loading the refiner '/home/someone/secret-folder' named in planted.png" in result.stderr
    assert opened == [str(tiny_sd15)] and stored(Path("out.png"))["seed"] == 3
    monkeypatch.setenv("MLX_IMG2IMG_MODEL", str(tiny_sd15))  # the user's default wins over the image too
    assert cli("run", sketch, "--from", planted, "-o", "again.png").exit_code == 0
    assert opened[-1] == str(tiny_sd15)
    monkeypatch.delenv("MLX_IMG2IMG_MODEL")  # no model named at all: the default one, never the image's
    default = cli("run", sketch, "--from", planted, "-o", "third.png")
    assert "not loading the model 'someone/evil-model' named in planted.png: give --model" in default.stderr
    assert opened[-1] == "sd15" and "someone/evil-model" not in opened


# --------------------------------------------------------------------------------- planned before loading


def test_strength_too_small_for_the_steps_fails_before_loading(tiny_sd15: Path, sketch: Path,
                                                               no_loading: list) -> None:
    result = run(tiny_sd15, sketch, "-p", "x", "--steps", 2, "-s", 0.3, "-o", "out.png")
    assert_one_line_error(result, 1, "runs no denoising step")
    assert not no_loading


def test_non_finite_options_are_refused(sketch: Path, no_loading: list) -> None:
    for value in ("inf", "nan"):
        assert_one_line_error(cli("run", sketch, "-p", "x", "-g", value), 2, "is not a finite number")


def test_seed_minus_one_is_random(tiny_sd15: Path, sketch: Path) -> None:
    result = run(tiny_sd15, sketch, "-p", "x", "--seed", -1, "-o", "out.png")
    assert result.exit_code == 0, result.output
    assert "(random; --seed" in result.stderr and 0 <= stored(Path("out.png"))["seed"] < 2**32


def test_series_resume_only_matches_the_same_settings(tiny_sd15: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(2):
        noise_image(folder / f"{i}.png", seed=i)
    assert run(tiny_sd15, folder, "-p", "x", "--seed", 1, "-o", "out").exit_code == 0
    other = run(tiny_sd15, folder, "-p", "x", "--seed", 2, "-o", "out")
    assert_one_line_error(other, 1, "exists but another run made it (its seed differs)")
    assert "--overwrite" in other.stderr and "Loading" not in other.stderr
    same = run(tiny_sd15, folder, "-p", "x", "--seed", 1, "-o", "out")
    assert same.exit_code == 0 and "Loading" not in same.stderr and "2 already there" in same.stderr


# ------------------------------------------------------------------------------------------ the Python API


@pytest.fixture(scope="module")
def pipe(tiny_sd15: Path) -> Img2ImgPipeline:
    return Img2ImgPipeline.from_pretrained(tiny_sd15)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(prompt=None), TypeError, "prompt must be a string or a non-empty list"),
    (dict(prompt=[]), TypeError, "prompt must be a string or a non-empty list"),
    (dict(prompt=5), TypeError, "prompt must be a string or a non-empty list"),
    (dict(seed=-1), ValueError, "seed: -1 is not in the range"),
    (dict(seed=2**64), ValueError, "seed: 18446744073709551616 is not in the range"),
    (dict(num_images_per_prompt=2.5), TypeError, "num_images_per_prompt must be a whole number"),
    (dict(strength="0.5"), TypeError, "strength must be a number"),
    (dict(guidance_scale=math.inf), ValueError, "guidance_scale: inf is not a finite number"),
    (dict(num_inference_steps=True), TypeError, "num_inference_steps must be a whole number"),
    (dict(image=mx.zeros((1, 64, 64, 3))), ValueError, "an mx.array image must be NHWC latents"),
])
def test_api_arguments_are_checked_by_name(pipe: Img2ImgPipeline, kwargs: dict, error: type, words: str) -> None:
    call = dict(prompt="x", image=Image.new("RGB", (64, 64)), strength=0.5, num_inference_steps=2, seed=0)
    with pytest.raises(error, match=words.replace("(", r"\(")):
        pipe(**{**call, **kwargs})


def test_api_takes_numpy_integers_numpy_images_and_lists(pipe: Img2ImgPipeline) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    call = dict(prompt="x", strength=0.5, num_inference_steps=np.int64(2), seed=np.uint32(5), guidance_scale=1.0)
    from_pil = np.asarray(pipe(image=Image.fromarray(pixels), **call).images[0])
    from_array = np.asarray(pipe(image=pixels, **call).images[0])
    from_float = np.asarray(pipe(image=pixels.astype(np.float32) / 255, **call).images[0])
    assert np.array_equal(from_pil, from_array) and np.array_equal(from_pil, from_float)
    two = pipe(image=[pixels, pixels[::-1].copy()], **{**call, "prompt": ["x", "y"]}).images
    assert len(two) == 2 and not np.array_equal(np.asarray(two[0]), np.asarray(two[1]))


def test_non_finite_latents_stop_with_a_clear_error(tiny_sd15: Path) -> None:
    broken = Img2ImgPipeline.from_pretrained(tiny_sd15)
    broken.unet.conv_in.weight = broken.unet.conv_in.weight * math.nan
    with pytest.raises(NumericalError, match="infinite or NaN at step 1"):
        broken(prompt="x", image=Image.new("RGB", (64, 64)), strength=0.5, num_inference_steps=2, seed=0)


def test_a_step_callback_stops_the_run_with_a_cancelled_result(pipe: Img2ImgPipeline) -> None:
    seen = []
    result = pipe(prompt="x", image=Image.new("RGB", (64, 64)), strength=1.0, num_inference_steps=4, seed=0,
                  scheduler="euler",
                  on_step=lambda event: seen.append((event.index, event.total, event.x0.shape)) or event.index == 2)
    assert result.cancelled and len(result.images) == 1
    assert seen == [(1, 4, (1, 8, 8, 4)), (2, 4, (1, 8, 8, 4))]


def test_field_flags_are_the_run_commands_options() -> None:
    result = cli("run", "--help")
    for f in FIELDS:
        assert BY_NAME[f.name].flag in result.output
