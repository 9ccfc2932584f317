"""The command line, end to end on the tiny random-weight model: through click's test runner, and once
through a real subprocess. Few steps and 70x54 images keep the whole file fast."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from PIL import Image, PngImagePlugin

from mlx_img2img import images
from mlx_img2img.cli import main
from mlx_img2img.errors import ImageInputError
from mlx_img2img.events import StepEvent

from .test_images import raw_png

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test in its own folder (the default output folder is ./outputs)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLX_IMG2IMG_MODEL", raising=False)
    monkeypatch.delenv("MLX_IMG2IMG_DEBUG", raising=False)
    return tmp_path


def noise_image(path: Path, size: tuple[int, int] = (70, 54), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def sketch(tmp_path: Path) -> Path:
    return noise_image(tmp_path / "sketch.png")


def cli(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def run(model: Path, *args: object) -> Result:
    """``mlx-img2img run`` on the tiny model, 4 steps, float32."""
    return cli("run", "-m", model, "--steps", 4, "--dtype", "float32", *args)  # args may override


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def stored(path: Path) -> dict:
    settings = images.read_metadata(path)[1]
    assert settings is not None
    return settings


def assert_one_line_error(result: Result, code: int, expected: str) -> None:
    assert result.exit_code == code, result.output
    assert expected in result.stderr, result.stderr
    assert "Traceback" not in result.output
    if code == 1:
        assert result.stderr.strip().splitlines()[-1].startswith("Error: ")


# ---------------------------------------------------------------------------------------------- help


def test_help_lists_subcommands_and_each_shows_an_example() -> None:
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("run", "info", "models", "download"):
        assert command in result.output
        sub = cli(command, "--help")
        assert sub.exit_code == 0 and "Example" in sub.output and f"mlx-img2img {command}" in sub.output
    run_help = cli("run", "--help").output
    for option in ("--prompt", "--output", "--model", "--strength", "--steps", "--guidance", "--seed",
                   "--negative-prompt", "--scheduler", "--offline", "--resize", "--passes", "--sweep", "--refiner",
                   "--refiner-start", "--quantize", "--low-memory", "--vae-tile", "--memory-limit"):  # fmt: skip
        assert option in run_help


# ------------------------------------------------------------------------------------------------ run


def test_run_keeps_the_input_size_and_stores_parameters(tiny_sd15: Path, sketch: Path) -> None:
    result = run(tiny_sd15, sketch, "-p", "a castle", "-n", "blurry", "-s", 0.5, "--seed", 42, "-o", "out.png")
    assert result.exit_code == 0, result.output
    assert "wrote out.png" in result.stdout
    with Image.open("out.png") as im:
        assert im.size == (70, 54)  # the model worked at 72x64 and the output went back
        text = im.text["parameters"]
    assert text.splitlines()[:2] == ["a castle", "Negative prompt: blurry"]
    for field in ("Steps: 4", "Sampler: PLMS", "CFG scale: 7.5", "Seed: 42", "Size: 70x54",
                  "Model: tiny_sd15", "Denoising strength: 0.5"):  # fmt: skip
        assert field in text
    settings = stored(Path("out.png"))
    assert settings["model_size"] == [72, 64] and settings["size"] == [70, 54]
    assert settings["scheduler"] == "pndm" and settings["input"] == str(sketch)
    assert settings["max_side"] == 768  # an SD 1.x model's default; SDXL's is 1024
    assert not {"refiner", "quantize", "vae_tile"} & settings.keys()  # none used, none stored
    info = cli("info", "out.png")
    assert info.exit_code == 0 and info.stdout.startswith(text) and "--from out.png" in info.stdout
    as_json = json.loads(cli("info", "--json", "out.png").stdout)
    assert as_json["seed"] == 42 and as_json["prompt"] == "a castle"


def test_same_seed_same_pixels_other_seed_other_image(tiny_sd15: Path, sketch: Path) -> None:
    for name, seed in (("a.png", 1), ("b.png", 1), ("c.png", 2)):
        assert run(tiny_sd15, sketch, "-p", "x", "--seed", seed, "-o", name).exit_code == 0
    assert np.array_equal(pixels(Path("a.png")), pixels(Path("b.png")))
    assert not np.array_equal(pixels(Path("a.png")), pixels(Path("c.png")))


def test_random_seed_is_printed_and_stored(tiny_sd15: Path, sketch: Path) -> None:
    result = run(tiny_sd15, sketch, "-p", "x", "-o", "out.png")
    assert result.exit_code == 0
    seed = stored(Path("out.png"))["seed"]
    assert f"Seed {seed} (random" in result.stderr and f"seed {seed}" in result.stdout


def test_quiet_and_no_metadata(tiny_sd15: Path, sketch: Path) -> None:
    result = run(tiny_sd15, sketch, "-p", "x", "-o", "out.png", "-q", "--no-metadata")
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""
    assert images.read_metadata("out.png") == (None, None)


@pytest.mark.parametrize(
    ("mode", "size"), [("fit", (48, 37)), ("crop", (48, 40)), ("pad", (48, 40)), ("stretch", (48, 40))]
)
def test_width_height_and_resize_modes(tiny_sd15: Path, sketch: Path, mode: str, size: tuple) -> None:
    result = run(tiny_sd15, sketch, "-p", "x", "--width", 48, "--height", 40, "--resize", mode, "-o", "o.png")
    assert result.exit_code == 0, result.output
    assert Image.open("o.png").size == size
    assert stored(Path("o.png"))["resize"] == mode


def test_existing_output_is_never_overwritten_without_overwrite(tiny_sd15: Path, sketch: Path) -> None:
    assert run(tiny_sd15, sketch, "-p", "x", "--seed", 1, "-o", "out.png").exit_code == 0
    before = Path("out.png").read_bytes()
    result = run(tiny_sd15, sketch, "-p", "x", "--seed", 2, "-o", "out.png")
    assert_one_line_error(result, 1, "out.png exists; use --overwrite")
    assert Path("out.png").read_bytes() == before
    assert run(tiny_sd15, sketch, "-p", "x", "--seed", 2, "-o", "out.png", "--overwrite").exit_code == 0
    assert Path("out.png").read_bytes() != before
    assert_one_line_error(run(tiny_sd15, sketch, "-p", "x", "-o", sketch), 1, "inputs are never overwritten")


def test_without_output_a_fresh_name_is_chosen_and_said(tiny_sd15: Path, sketch: Path) -> None:
    assert run(tiny_sd15, sketch, "-p", "x").exit_code == 0
    result = run(tiny_sd15, sketch, "-p", "x")
    assert result.exit_code == 0
    assert "outputs/sketch.png exists: writing outputs/sketch-2.png" in result.stderr
    assert sorted(p.name for p in Path("outputs").iterdir()) == ["sketch-2.png", "sketch.png"]


def test_num_images_gives_variations_with_consecutive_seeds(tiny_sd15: Path, sketch: Path) -> None:
    assert run(tiny_sd15, sketch, "-p", "x", "-N", 2, "--seed", 7, "-o", "v.png").exit_code == 0
    assert [stored(Path(f"v-{k}.png"))["seed"] for k in (1, 2)] == [7, 8]
    assert not np.array_equal(pixels(Path("v-1.png")), pixels(Path("v-2.png")))


def test_progressive_passes_chain_and_keep_intermediates(tiny_sd15: Path, sketch: Path) -> None:
    result = run(tiny_sd15, sketch, "-p", "a house", "--passes", "0.75,0.5", "--pass-prompt", "big windows",
                 "--seed", 3, "-o", "house.png")  # fmt: skip
    assert result.exit_code == 0, result.output
    first, final = stored(Path("house-pass1.png")), stored(Path("house.png"))
    assert (first["strength"], first["prompt"], first["input"]) == (0.75, "a house", str(sketch))
    assert (final["strength"], final["prompt"], final["input"]) == (0.5, "a house, big windows", "house-pass1.png")


def test_strength_sweep_writes_each_image_and_a_labelled_sheet(tiny_sd15: Path, sketch: Path) -> None:
    result = run(tiny_sd15, sketch, "-p", "x", "--sweep", "0.5,1", "--seed", 3, "-o", "sweep.png")
    assert result.exit_code == 0, result.output
    assert [stored(Path(f"sweep-s{v}.png"))["strength"] for v in ("0.50", "1.00")] == [0.5, 1.0]
    sheet = Image.open("sweep.png")
    assert sheet.width > 3 * 70 and sheet.height > 54
    assert stored(Path("sweep.png"))["sweep"] == [0.5, 1.0]
    assert "Sweep: denoising strength 0.5/1" in sheet.text["parameters"]


def test_series_over_a_folder_skips_a_bad_file_and_resumes(tiny_sd15: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    noise_image(folder / "a.png", seed=1)
    noise_image(folder / "b.jpg", seed=2)
    (folder / "broken.png").write_text("not an image")
    (folder / "notes.txt").write_text("ignored")
    result = run(tiny_sd15, folder, "-p", "winter", "--seed", 5, "-o", "out")
    assert result.exit_code == 1
    assert sorted(p.name for p in Path("out").iterdir()) == ["a.png", "b.png"]
    assert "failed: " in result.stderr and "broken.png: not an image" in result.stderr
    assert "Done: 2 written, 1 input(s) failed." in result.stderr
    mtimes = [p.stat().st_mtime_ns for p in sorted(Path("out").iterdir())]
    again = run(tiny_sd15, folder, "-p", "winter", "--seed", 5, "-o", "out")
    assert "Done: 0 written, 2 already there (skipped), 1 input(s) failed." in again.stderr
    assert [p.stat().st_mtime_ns for p in sorted(Path("out").iterdir())] == mtimes
    (folder / "broken.png").unlink()
    noise_image(folder / "c.png", seed=3)
    last = run(tiny_sd15, folder, "-p", "winter", "--seed", 5, "-o", "out")
    assert last.exit_code == 0 and "Done: 1 written, 2 already there (skipped), 0 input(s) failed." in last.stderr


def test_series_names_and_usage(tiny_sd15: Path, tmp_path: Path) -> None:
    a_png, a_jpg = noise_image(tmp_path / "a.png"), tmp_path / "a.jpg"
    Image.open(a_png).save(a_jpg)
    assert run(tiny_sd15, a_png, a_jpg, "-p", "x", "-o", "out").exit_code == 0
    assert sorted(p.name for p in Path("out").iterdir()) == ["a-jpg.png", "a-png.png"]
    result = run(tiny_sd15, a_png, a_jpg, "-p", "x", "-o", "one.png")
    assert_one_line_error(result, 2, "with a folder or several inputs, -o must be a folder")


def test_rerun_from_an_images_settings_with_flags_overriding(tiny_sd15: Path, sketch: Path) -> None:
    assert run(tiny_sd15, sketch, "-p", "a castle", "-s", 0.5, "--seed", 9, "-o", "first.png").exit_code == 0
    # the model (asked for with --stored-model), steps, dtype: all stored
    again = cli("run", sketch, "--stored-model", "--from", "first.png", "-o", "again.png")
    assert again.exit_code == 0, again.output
    assert np.array_equal(pixels(Path("first.png")), pixels(Path("again.png")))
    other = cli("run", sketch, "--stored-model", "--from", "first.png", "--seed", 10, "-p", "a ruin", "-o", "other.png")
    assert other.exit_code == 0
    settings = stored(Path("other.png"))
    assert (settings["seed"], settings["prompt"], settings["strength"]) == (10, "a ruin", 0.5)


def test_rerun_from_an_automatic1111_png(tiny_sd15: Path, sketch: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nNegative prompt: a dog\n"
                  "Steps: 4, Sampler: DDIM, CFG scale: 5, Seed: 9, Size: 512x512, Denoising strength: 0.5")  # fmt: skip
    Image.new("RGB", (8, 8)).save("a1111.png", pnginfo=info)
    result = cli("run", sketch, "--from", "a1111.png", "-m", tiny_sd15, "-o", "out.png")
    assert result.exit_code == 0, result.output
    settings = stored(Path("out.png"))
    expected = {"prompt": "a cat", "negative_prompt": "a dog", "steps": 4, "scheduler": "ddim", "guidance": 5.0,
                "seed": 9, "strength": 0.5, "size": [70, 54]}  # fmt: skip
    assert {k: settings[k] for k in expected} == expected


def test_ctrl_c_stops_cleanly_leaving_only_whole_files(
    tiny_sd15: Path, sketch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlx_img2img.pipeline import Img2ImgPipeline

    original = Img2ImgPipeline.__call__
    calls = []

    def interrupt_second_call(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 2:
            kwargs["on_step"](StepEvent(index=1, total=2, timestep=500.0, latents=None, x0=None))
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Img2ImgPipeline, "__call__", interrupt_second_call)
    result = run(tiny_sd15, sketch, "-p", "x", "-N", 3, "-o", "v.png")
    assert result.exit_code == 130 and "Interrupted" in result.stderr
    assert sorted(p.name for p in Path(".").iterdir()) == ["sketch.png", "v-1.png"]
    assert pixels(Path("v-1.png")).shape == (54, 70, 3)


# ------------------------------------------------------------------------------- SDXL with the refiner


def test_max_side_default_follows_the_model(
    tiny_sd15: Path, tiny_sdxl: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlx_img2img.pipeline import Img2ImgPipeline, Img2ImgResult

    seen = []  # the sizes the model was asked to work at; a grey stand-in for its output keeps this fast

    def record(self, *, image, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.append(image.size)
        return Img2ImgResult(images=[Image.new("RGB", image.size, "grey")], seed=0, latents=None)

    monkeypatch.setattr(Img2ImgPipeline, "__call__", record)
    wide = noise_image(tmp_path / "wide.png", size=(2000, 1000))
    for model, name, extra, size in ((tiny_sd15, "sd.png", [], (768, 384)), (tiny_sdxl, "xl.png", [], (1024, 512)),
                                     (tiny_sd15, "m.png", ["--max-side", 400], (400, 200))):  # fmt: skip
        assert run(model, wide, "-p", "x", "-o", name, *extra).exit_code == 0
        assert seen[-1] == size and tuple(stored(Path(name))["model_size"]) == size
        assert stored(Path(name))["max_side"] == max(size) and Image.open(name).size == (2000, 1000)


def test_refiner_end_to_end_keeps_size_and_stores_the_handoff(
    tiny_sdxl: Path, tiny_sdxl_refiner: Path, sketch: Path
) -> None:
    result = run(tiny_sdxl, sketch, "-p", "a castle", "--refiner", tiny_sdxl_refiner, "--seed", 4, "-s", 0.9,
                 "-o", "r.png")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"Loading {tiny_sdxl_refiner}" in result.stderr
    with Image.open("r.png") as im:
        assert im.size == (70, 54)
        text = im.text["parameters"]
    assert f"Refiner: {tiny_sdxl_refiner.name}, Refiner switch at: 0.8" in text
    settings = stored(Path("r.png"))
    assert (settings["refiner"], settings["refiner_start"], settings["max_side"]) == (str(tiny_sdxl_refiner), 0.8, 1024)
    assert settings["refiner_name"] == tiny_sdxl_refiner.name and settings["scheduler"] == "euler"
    plain = run(tiny_sdxl, sketch, "-p", "a castle", "--seed", 4, "-s", 0.9, "-o", "plain.png")
    assert plain.exit_code == 0 and not np.array_equal(pixels(Path("r.png")), pixels(Path("plain.png")))

    # the refiner and its start come back (the models with --stored-model)
    again = cli("run", sketch, "--stored-model", "--from", "r.png", "-o", "again.png")
    assert again.exit_code == 0, again.output
    assert np.array_equal(pixels(Path("r.png")), pixels(Path("again.png")))
    later = cli("run", sketch, "--stored-model", "--from", "r.png", "--refiner-start", 0.6, "-o", "later.png")
    assert later.exit_code == 0 and stored(Path("later.png"))["refiner_start"] == 0.6
    assert not np.array_equal(pixels(Path("r.png")), pixels(Path("later.png")))
    dropped = cli("run", sketch, "--stored-model", "--from", "r.png", "--refiner", "none", "-o", "dropped.png")
    assert dropped.exit_code == 0 and "refiner" not in stored(Path("dropped.png"))
    assert np.array_equal(pixels(Path("plain.png")), pixels(Path("dropped.png")))


def test_refiner_handoff_equals_the_api(tiny_sdxl: Path, tiny_sdxl_refiner: Path, tmp_path: Path) -> None:
    from mlx_img2img import Img2ImgPipeline

    source = noise_image(tmp_path / "square.png", size=(64, 64), seed=3)
    result = run(tiny_sdxl, source, "-p", "a street", "-g", 5, "-s", 0.9, "--seed", 11, "--refiner",
                 tiny_sdxl_refiner, "--refiner-start", 0.7, "-o", "cli.png")  # fmt: skip
    assert result.exit_code == 0, result.output

    base = Img2ImgPipeline.from_pretrained(tiny_sdxl, dtype="float32")
    refiner = Img2ImgPipeline.from_pretrained(tiny_sdxl_refiner, dtype="float32")
    common = dict(prompt="a street", num_inference_steps=4, guidance_scale=5.0, seed=11)
    with Image.open(source) as im:
        handed = base(**common, image=im.convert("RGB"), strength=0.9, denoising_end=0.7, decode=False)
    assert handed.images == []
    expected = refiner(**common, image=handed.latents, denoising_start=0.7).images[0]
    assert np.array_equal(pixels(Path("cli.png")), np.asarray(expected))


def test_refiner_errors_before_any_image(tiny_sd15: Path, tiny_sdxl: Path, tiny_sdxl_refiner: Path,
                                         sketch: Path) -> None:  # fmt: skip
    mismatch = run(tiny_sd15, sketch, "-p", "x", "--refiner", tiny_sdxl_refiner, "-o", "o.png")
    assert_one_line_error(mismatch, 1, "cannot continue from tiny_sd15")
    too_weak = run(tiny_sdxl, sketch, "-p", "x", "--refiner", tiny_sdxl_refiner, "--sweep", "1,0.25", "-o", "o.png")
    assert_one_line_error(too_weak, 1, "strength 0.25 starts the schedule where the refiner already takes over")
    assert f"Loading {tiny_sdxl_refiner}" not in too_weak.stderr  # found before the refiner was loaded
    assert not list(Path(".").glob("o*.png"))


def test_rerun_from_an_automatic1111_refined_png(tiny_sdxl: Path, tiny_sdxl_refiner: Path, sketch: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 4, Sampler: Euler, CFG scale: 5, Seed: 9, Size: 64x64, "
                  "Denoising strength: 0.9, Refiner: sd_xl_refiner_1.0 [7440042bbd], "
                  "Refiner switch at: 0.7")  # fmt: skip
    Image.new("RGB", (8, 8)).save("a1111.png", pnginfo=info)
    plain = cli("run", sketch, "--from", "a1111.png", "-m", tiny_sdxl, "-o", "plain.png")
    assert plain.exit_code == 0, plain.output
    assert "refined with sd_xl_refiner_1.0 [7440042bbd]; give --refiner" in plain.stderr
    assert "refiner" not in stored(Path("plain.png"))
    refined = cli("run", sketch, "--from", "a1111.png", "-m", tiny_sdxl, "--refiner", tiny_sdxl_refiner, "-o", "r.png")
    assert refined.exit_code == 0, refined.output
    assert stored(Path("r.png"))["refiner_start"] == 0.7  # the other tool's switch point


# ------------------------------------------------------------------------------------- memory options


def test_memory_options_reach_the_engine_and_quantize_is_stored(
    tiny_sd15: Path, sketch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlx.core as mx

    from mlx_img2img.pipeline import Img2ImgPipeline

    loads, limits, pipes = [], [], []
    original_load, original_limit = Img2ImgPipeline.from_source.__func__, mx.set_memory_limit

    def spy_load(cls, source, **kwargs):  # noqa: ANN001, ANN003, ANN202
        loads.append(kwargs)
        pipes.append(original_load(cls, source, **kwargs))
        return pipes[-1]

    monkeypatch.setattr(Img2ImgPipeline, "from_source", classmethod(spy_load))
    monkeypatch.setattr(mx, "set_memory_limit", lambda n: limits.append(n) or original_limit(n))
    before = mx.get_memory_limit()
    result = run(tiny_sd15, sketch, "-p", "x", "--seed", 2, "--quantize", 8, "--low-memory", "--vae-tile", 64,
                 "--memory-limit", 1.5, "-o", "q.png")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (loads[0]["quantize"], loads[0]["low_memory"]) == (8, True) and pipes[0].vae_tile_size == 64
    assert limits == [int(1.5 * 2**30), before] and mx.get_memory_limit() == before  # set, then restored
    settings = stored(Path("q.png"))
    assert (settings["quantize"], settings["vae_tile"]) == (8, 64) and "memory_limit" not in settings
    assert "Quantization: 8 bit" in Image.open("q.png").text["parameters"]

    again = cli("run", sketch, "--stored-model", "--from", "q.png", "-o", "again.png")  # quantized and tiled again
    assert again.exit_code == 0 and loads[-1]["quantize"] == 8 and pipes[-1].vae_tile_size == 64
    assert np.array_equal(pixels(Path("q.png")), pixels(Path("again.png")))
    full = cli("run", sketch, "--stored-model", "--from", "q.png", "--quantize", 0, "-o", "full.png")
    assert full.exit_code == 0 and loads[-1]["quantize"] is None and "quantize" not in stored(Path("full.png"))


def test_low_memory_without_tiles_gives_the_same_pixels(tiny_sd15: Path, sketch: Path) -> None:
    assert run(tiny_sd15, sketch, "-p", "x", "--seed", 6, "-o", "a.png").exit_code == 0
    assert run(tiny_sd15, sketch, "-p", "x", "--seed", 6, "--low-memory", "-o", "b.png").exit_code == 0
    assert np.array_equal(pixels(Path("a.png")), pixels(Path("b.png")))
    assert "vae_tile" not in stored(Path("b.png"))  # 72x64 fits in one 512-pixel tile: nothing to store


def test_memory_limit_without_an_mlx_setting_goes_on(
    tiny_sd15: Path, sketch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlx.core as mx

    monkeypatch.delattr(mx, "set_memory_limit")
    monkeypatch.delattr(mx.metal, "set_memory_limit", raising=False)
    result = run(tiny_sd15, sketch, "-p", "x", "--memory-limit", 4, "-o", "o.png")
    assert result.exit_code == 0, result.output
    assert "this MLX has no memory limit setting" in result.stderr


# --------------------------------------------------------------------------------------------- errors


@pytest.fixture
def bad_files(tmp_path: Path) -> Path:
    noise_image(tmp_path / "good.png")
    (tmp_path / "text.png").write_text("hello, I am text\n")
    (tmp_path / "cut.png").write_bytes((tmp_path / "good.png").read_bytes()[:3000])
    raw_png(tmp_path / "bomb.png", 50_000, 50_000, 8, 2)
    return tmp_path


USAGE_ERRORS = [
    (["-s", "1.5"], "1.5 is not in the range 0<=x<=1"),
    (["-s", "-0.1"], "-0.1 is not in the range 0<=x<=1"),
    (["--steps", "0"], "0 is not in the range x>=1"),
    (["--seed", "-2"], "is not in the range"),  # -1 is AUTOMATIC1111's "random"
    (["--scheduler", "plms"], "'plms' is not one of"),
    (["--resize", "zoom"], "'zoom' is not one of"),
    (["--passes", "0.7,x"], "is not a comma-separated list of numbers"),
    (["--passes", "0.7,1.2"], "strengths must be between 0 and 1, not 1.2"),
    (["--passes", "0.7", "--sweep", "0.3"], "--passes and --sweep do not go together"),
    (["--sweep", "0.3,0.5", "-s", "0.5"], "--strength and --sweep do not go together"),
    (["--pass-prompt", "more"], "--pass-prompt needs --passes"),
    (["-o", "out.jpg"], "use a .png name"),
    (["--width", "4"], "4 is not in the range 8<=x<=8192"),
    (["--refiner", "r", "--refiner-start", "1"], "1.0 is not in the range 0<x<1"),
    (["--refiner", "r", "--refiner-start", "0"], "0.0 is not in the range 0<x<1"),
    (["--refiner-start", "0.7"], "--refiner-start needs --refiner"),
    (["--quantize", "3"], "'3' is not one of '8', '4', '0'"),
    (["--vae-tile", "100"], "--vae-tile must be 0 (never tile) or a multiple of 8 of at least 64, not 100"),
    (["--vae-tile", "32"], "a multiple of 8 of at least 64, not 32"),
    (["--memory-limit", "0"], "0.0 is not in the range 0<x<=1000000"),
]


@pytest.mark.parametrize(("extra", "message"), USAGE_ERRORS)
def test_usage_errors_exit_2(tiny_sd15: Path, bad_files: Path, extra: list[str], message: str) -> None:
    assert_one_line_error(run(tiny_sd15, "good.png", "-p", "x", *extra), 2, message)


def test_missing_prompt_and_missing_arguments_are_usage_errors(tiny_sd15: Path, bad_files: Path) -> None:
    assert_one_line_error(run(tiny_sd15, "good.png", "-o", "o.png"), 2, "give a prompt")
    assert_one_line_error(cli("run"), 2, "Missing argument")
    assert_one_line_error(cli("frobnicate"), 2, "No such command")


INPUT_ERRORS = [
    ("missing.png", "missing.png: no such file"),
    ("text.png", "text.png: not an image"),
    ("cut.png", "cut.png: truncated"),
    ("bomb.png", "over the limit of 100 megapixels (a decompression bomb?"),
]


@pytest.mark.parametrize(("name", "message"), INPUT_ERRORS)
def test_bad_inputs_exit_1_with_one_line(tiny_sd15: Path, bad_files: Path, name: str, message: str) -> None:
    assert_one_line_error(run(tiny_sd15, name, "-p", "x", "-o", "o.png"), 1, message)
    assert not Path("o.png").exists()


def test_strength_too_small_for_the_steps(tiny_sd15: Path, bad_files: Path) -> None:
    result = cli("run", "good.png", "-p", "x", "-m", tiny_sd15, "--steps", 2, "-s", 0.3, "-o", "o.png")
    assert_one_line_error(result, 1, "runs no denoising step")
    sweep = cli("run", "good.png", "-p", "x", "-m", tiny_sd15, "--steps", 4, "--sweep", "1,0.1", "-o", "o.png")
    assert_one_line_error(sweep, 1, "runs no denoising step")
    assert not list(Path(".").glob("o*.png"))  # checked before any image was made


def test_model_errors(tiny_sd15: Path, bad_files: Path, tmp_path: Path) -> None:
    result = cli("run", "good.png", "-p", "x", "-o", "o.png", "-m", "someone/not-cached", "--offline")
    assert_one_line_error(result, 1, "someone/not-cached")
    result = cli("run", "good.png", "-p", "x", "-o", "o.png", "-m", tmp_path / "no-such-folder")
    assert_one_line_error(result, 1, "no-such-folder")
    broken = tmp_path / "broken_model"
    shutil.copytree(tiny_sd15, broken, copy_function=os.symlink)
    weights = next((broken / "unet").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data[: len(data) // 2])
    result = cli("run", "good.png", "-p", "x", "-o", "o.png", "-m", broken)
    assert_one_line_error(result, 1, "safetensors")


def test_unwritable_output_folder(tiny_sd15: Path, bad_files: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    result = run(tiny_sd15, "good.png", "-p", "x", "-o", "afile/o.png")
    assert_one_line_error(result, 1, "cannot create the output folder afile: a file is in the way")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        target = locked / "o.png"
    elif Path("/sys").is_dir():  # root may write anywhere, but not in /sys
        target = Path("/sys/mlx-img2img-test/o.png")
    else:
        pytest.skip("no unwritable folder to try")
    result = run(tiny_sd15, "good.png", "-p", "x", "-o", target)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "output folder" in result.stderr or "denied" in result.stderr.lower()


def test_debug_shows_the_real_exception(bad_files: Path) -> None:
    result = cli("run", "text.png", "-p", "x", "-o", "o.png", "--debug")
    assert result.exit_code == 1 and isinstance(result.exception, ImageInputError)


def test_info_errors(bad_files: Path) -> None:
    assert_one_line_error(cli("info", "good.png"), 1, "good.png: no generation parameters")
    assert_one_line_error(cli("info", "text.png"), 1, "text.png: not an image")
    assert_one_line_error(cli("info", "missing.png"), 1, "missing.png: no such file")


# ------------------------------------------------------------------------------------ models, download


def test_models_lists_presets_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_img2img import weights

    cached = [("stable-diffusion-v1-5/stable-diffusion-v1-5", Path("/cache/sd15")), ("me/mine", Path("/cache/m"))]
    monkeypatch.setattr(weights, "cached_models", lambda: cached)
    result = cli("models")
    assert result.exit_code == 0
    for name, repo in weights.PRESETS.items():
        assert name in result.output and repo in result.output
    assert "cached  /cache/sd15  (default)" in result.output
    assert "not downloaded" in result.output and "me/mine  /cache/m" in result.output


def test_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mlx_img2img import weights

    calls = []
    def download(name: str, dtype: str | None = None, update: bool = False, single_component: bool = False) -> Path:
        calls.append((name, dtype, update))
        return tmp_path

    monkeypatch.setattr(weights, "download", download)
    result = cli("download", "sd-turbo", "--dtype", "float16")
    assert result.exit_code == 0 and calls == [("sd-turbo", "float16", True)] and str(tmp_path) in result.stdout
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_one_line_error(cli("download", "someone/not-cached"), 1, "someone/not-cached")


# ---------------------------------------------------------------------------------- a real subprocess


def test_real_subprocess_workflow(tiny_sd15: Path, tmp_path: Path) -> None:
    """The installed entry point's module, in a fresh interpreter: series with a bad file and resume,
    passes, sweep, info, re-run."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "MLX_IMG2IMG_MODEL": str(tiny_sd15)}

    def tool(*args: object) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "mlx_img2img.cli", *map(str, args)]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)

    folder = tmp_path / "in"
    folder.mkdir()
    noise_image(folder / "a.png", seed=1)
    noise_image(folder / "b.png", seed=2)
    (folder / "c.png").write_text("text, not an image")
    series = tool("run", folder, "-p", "winter", "--steps", 4, "--seed", 1, "-o", "out")
    assert series.returncode == 1 and "Traceback" not in series.stderr
    assert "c.png: not an image" in series.stderr and "2 written" in series.stderr
    resumed = tool("run", folder, "-p", "winter", "--steps", 4, "--seed", 1, "-o", "out")
    assert resumed.returncode == 1 and "0 written, 2 already there" in resumed.stderr

    passes = tool("run", folder / "a.png", "-p", "castle", "--steps", 4, "--passes", "0.75,0.5", "-o", "p.png")
    assert passes.returncode == 0, passes.stderr
    sweep = tool("run", folder / "a.png", "-p", "castle", "--steps", 4, "--sweep", "0.5,1", "-o", "s.png", "-q")
    assert sweep.returncode == 0 and sweep.stdout == "" and sweep.stderr == ""
    assert {p.name for p in tmp_path.glob("*.png")} == {"p-pass1.png", "p.png", "s-s0.50.png", "s-s1.00.png", "s.png"}

    info = tool("info", "p.png")
    assert info.returncode == 0 and info.stdout.startswith("castle\nSteps: 4, Sampler: PLMS")
    rerun = tool("run", "p-pass1.png", "--from", "p.png", "-o", "again.png")
    assert rerun.returncode == 0, rerun.stderr
    assert np.array_equal(pixels(tmp_path / "p.png"), pixels(tmp_path / "again.png"))
    bad = tool("run", folder / "c.png", "-p", "x", "-o", "x.png")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("Error: ")
    assert "Traceback" not in bad.stderr
    usage = tool("run", folder / "a.png", "-p", "x", "--strength", "2")
    assert usage.returncode == 2
