"""Hostile or broken input handled like a bad flag: image metadata, model configs, signals, full disks, a
missing network. Each answer is one line (an Img2ImgError or a usage error), never a traceback."""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from mlx_img2img import Img2ImgPipeline, images, weights
from mlx_img2img.errors import ImageInputError, ModelFormatError, ModelNotFoundError

from .test_cli import REPO, assert_one_line_error, cli, noise_image, run
from .test_images import raw_png
from .test_loading import _fake_cache


def png_with_text(path: Path, **chunks: str) -> Path:
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


# ------------------------------------------------------------------------------------ reading metadata


def test_metadata_of_a_decompression_bomb_is_one_error(tmp_path: Path) -> None:
    bomb = raw_png(tmp_path / "bomb.png", 20_000, 20_000, 8, 2)  # past Pillow's own limit: it raises
    with pytest.raises(ImageInputError, match="over the limit of 100 megapixels"):
        images.read_metadata(bomb)


def test_deeply_nested_settings_are_one_error(tmp_path: Path) -> None:
    path = png_with_text(tmp_path / "nested.png", **{"mlx-img2img": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(ImageInputError, match="nested too deeply"):
        images.read_metadata(path)


def test_huge_metadata_text_is_refused(tmp_path: Path) -> None:
    path = png_with_text(tmp_path / "huge.png", parameters="a" * (images.MAX_METADATA_CHARS + 1))
    with pytest.raises(ImageInputError, match="'parameters' text is 262,145 characters, over the limit"):
        images.read_metadata(path)


# -------------------------------------------------------------------------------------------- saving


def _temp_file(target: Path, age: float) -> Path:
    tmp = target.parent / f".{target.name}.abc123.tmp"
    tmp.write_bytes(b"half a png")
    os.utime(tmp, (time.time() - age, time.time() - age))
    return tmp


def test_a_save_removes_stale_temp_files_of_its_path(tmp_path: Path) -> None:
    stale = _temp_file(tmp_path / "out.png", age=60)
    other = _temp_file(tmp_path / "other.png", age=60)  # another output's: not ours to judge now
    images.save_png(Image.new("RGB", (8, 8)), tmp_path / "out.png")
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "out.png"]


def test_a_temp_file_being_written_is_left_alone(tmp_path: Path) -> None:
    import fcntl

    busy = _temp_file(tmp_path / "out.png", age=60)
    with open(busy, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # as a concurrent writer holds it
        assert images.remove_stale_temp_files(tmp_path / "out.png") == []
    assert images.remove_stale_temp_files(tmp_path / "out.png") == [busy]


def test_a_full_disk_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        images.save_png(Image.new("RGB", (8, 8)), tmp_path / "out.png")
    assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(tmp_path / "out.png"))
    assert list(tmp_path.iterdir()) == []  # no temporary file left


# ---------------------------------------------------------------------------------------------- info


HOSTILE = "red \x1b]0;owned\x07 fox \x1b[2J\x9b31m\u202egnp.exe\r\x00 done"


def test_info_shows_control_characters_as_escapes(tmp_path: Path) -> None:
    settings = {"prompt": HOSTILE, "steps": 4, "input": "my photos/it's here;rm -rf ~.png"}
    path = png_with_text(tmp_path / "in \x1b[31m.png", parameters=HOSTILE + "\nSteps: 4",
                         **{"mlx-img2img": json.dumps(settings)})
    result = cli("info", path)
    assert result.exit_code == 0, result.output
    assert not [c for c in result.output if (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) < 0xA0 or c == "\u202e"]
    assert "red \\x1b]0;owned\\x07 fox \\x1b[2J\\x9b31m\\u202egnp.exe\\r\\x00 done" in result.output
    rerun = next(line for line in result.output.splitlines() if line.startswith("Re-run: "))
    args = shlex.split(rerun.removeprefix("Re-run: "))  # the shell reads back each path whole
    assert args == ["mlx-img2img", "run", settings["input"], "--from", str(path).replace("\x1b", "\\x1b"),
                    "-o", "NEW.png"]

    as_json = cli("info", "--json", path)
    assert not [c for c in as_json.output if (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) < 0xA0]
    assert json.loads(as_json.output)["prompt"] == HOSTILE  # escaped the JSON way: the same text


def test_info_of_a_bomb_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(cli("info", raw_png(tmp_path / "bomb.png", 20_000, 20_000, 8, 2)), 1, "over the limit")


# ------------------------------------------------------------------------------------------- signals


def test_sigterm_during_a_save_cleans_up_like_ctrl_c(tiny_sd15: Path, tmp_path: Path) -> None:
    """A real process, killed with SIGTERM while it writes its PNG: exit 143, no temporary file left."""
    noise_image(tmp_path / "in.png")
    ready = tmp_path / "saving"
    script = f"""
import time
from PIL import Image
from mlx_img2img.cli import main

def slow_png(im, fp, filename, *args, **kwargs):  # half a file written, then a long wait
    fp.write(b"\\x89PNG half")
    fp.flush()
    open({str(ready)!r}, "w").close()
    time.sleep(60)

Image.init()
Image.SAVE["PNG"] = slow_png
main(["run", "in.png", "-m", {str(tiny_sd15)!r}, "-p", "x", "--steps", "2", "--dtype", "float32", "-o", "out.png"],
     prog_name="mlx-img2img")
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), proc.stderr.read() if proc.poll() is not None else "no save began"
        assert [p.name for p in tmp_path.glob(".out.png.*.tmp")]  # the temporary file, mid-write
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "Terminated; every file written so far is complete" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "saving"]


# -------------------------------------------------------------------------------------- broken models


@pytest.fixture
def model_copy(tiny_sd15: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_sd15, tmp_path / "model"))


def test_a_true_false_field_must_be_true_or_false(model_copy: Path) -> None:
    _set(model_copy / "model_index.json", "requires_aesthetics_score", "false")  # the text "false" is true to bool()
    with pytest.raises(ModelFormatError, match='model_index.json: requires_aesthetics_score must be true or false'):
        Img2ImgPipeline.from_pretrained(model_copy)


def _set(path: Path, key: str, value: object) -> None:
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(("file", "key", "value", "expected"), [
    ("unet/config.json", "layers_per_block", "2", "layers_per_block must be an integer from 1 to 1,000,000 or a"),
    ("unet/config.json", "block_out_channels", "[32, 64]", "block_out_channels must be a list of (an integer"),
    ("unet/config.json", "attention_head_dim", [2] * 7, "attention_head_dim has 7 entries, not one per block"),
    ("text_encoder/config.json", "hidden_size", "32", 'hidden_size must be an integer from 1 to 1,000,000, not "32"'),
    ("text_encoder/config.json", "hidden_size", 10**10, "hidden_size must be an integer from 1 to 1,000,000, not 1000"),
    ("vae/config.json", "scaling_factor", "0.18215", 'scaling_factor must be a number, not "0.18215"'),
    ("scheduler/scheduler_config.json", "num_train_timesteps", 0, "num_train_timesteps must be an integer from 1 to"),
    ("scheduler/scheduler_config.json", "num_train_timesteps", "1000", "num_train_timesteps must be an integer"),
])
def test_a_config_value_of_the_wrong_kind_names_file_and_field(model_copy: Path, file: str, key: str,
                                                                value: object, expected: str) -> None:
    _set(model_copy / file, key, value)
    with pytest.raises(ModelFormatError) as e:
        Img2ImgPipeline.from_pretrained(model_copy)
    assert str(e.value).startswith(f"{model_copy / file}: ") and expected in str(e.value)


@pytest.mark.parametrize("file", ["unet/config.json", "model_index.json", "tokenizer/tokenizer_config.json"])
def test_a_config_that_is_a_list(model_copy: Path, file: str) -> None:
    (model_copy / file).write_text("[1, 2]")
    with pytest.raises(ModelFormatError, match="expected a JSON object"):
        Img2ImgPipeline.from_pretrained(model_copy)


# -------------------------------------------------------------------------------------------- limits


@pytest.mark.parametrize("value", ["inf", "nan", "1e300"])
def test_memory_limit_must_be_finite(tmp_path: Path, value: str) -> None:
    result = cli("run", noise_image(tmp_path / "in.png"), "-p", "x", "--memory-limit", value)
    assert_one_line_error(result, 2, "--memory-limit")


def test_a_full_disk_stops_a_series_with_its_summary(tiny_sd15: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    noise_image(folder / "a.png", seed=1)
    noise_image(folder / "b.png", seed=2)
    synced = []

    def fsync(fd: int) -> None:  # the second image finds the disk full
        synced.append(fd)
        if len(synced) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    result = run(tiny_sd15, folder, "-p", "x", "--seed", 1, "-o", tmp_path / "out")
    assert_one_line_error(result, 1, f"{tmp_path / 'out' / 'b.png'}: No space left on device")
    assert "Stopped: 1 written, 0 input(s) failed." in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png"]


# ---------------------------------------------------------------------------------- offline-first start


@pytest.fixture
def no_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Online mode (no HF_HUB_OFFLINE) with the hub at a closed local port, and an empty cache (returned)."""
    import huggingface_hub.constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_cached_model_starts_at_once_without_network(tiny_sd15: Path, no_network: Path,
                                                       capfd: pytest.CaptureFixture) -> None:
    _fake_cache(tiny_sd15, no_network)
    start = time.perf_counter()
    folder = weights.resolve_model("someone/tiny-sd", dtype="float32")
    assert time.perf_counter() - start < 2 and (folder / "model_index.json").exists()
    assert capfd.readouterr().err == ""


def test_an_uncached_model_without_network_is_one_quick_line(no_network: Path, capfd: pytest.CaptureFixture) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError, match="not in the local Hugging Face cache and the hub could not be"):
        weights.resolve_model("someone/not-cached")
    assert time.perf_counter() - start < 2
    assert capfd.readouterr().err == ""  # no retry messages


def test_float32_asks_the_hub_when_only_fp16_files_are_cached(tiny_sd15: Path, no_network: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """What `run` loads matches what `download` fetched: fp16 files serve a float16 run; a float32 run wants
    the full-precision ones (and, the hub unreachable, makes do with the cached fp16 ones)."""
    _fake_cache(tiny_sd15, no_network)
    unet = next(no_network.glob("models--someone--tiny-sd/snapshots/*/unet"))
    weights_file = unet / "diffusion_pytorch_model.safetensors"
    weights_file.rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    asked = []
    from huggingface_hub import HfApi

    def model_info(self: HfApi, repo: str, **kwargs: object) -> None:
        asked.append(repo)
        raise ConnectionError("no network")

    monkeypatch.setattr(HfApi, "model_info", model_info)
    weights.resolve_model("someone/tiny-sd", dtype="float16")
    assert asked == []
    with pytest.warns(UserWarning, match="could not be reached .*: using the copy of someone/tiny-sd in the"):
        weights.resolve_model("someone/tiny-sd", dtype="float32")
    assert asked == ["someone/tiny-sd"]


def test_download_without_network_says_it_did_not_update(tiny_sd15: Path, no_network: Path) -> None:
    _fake_cache(tiny_sd15, no_network)
    result = cli("download", "someone/tiny-sd")
    assert result.exit_code == 0, result.output
    assert "warning: the hub could not be reached (ConnectError: [Errno 111] Connection refused): using the copy" \
        in result.stderr


# ------------------------------------------------------------------------------------------ download


def test_download_fetches_what_run_uses_here(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []
    monkeypatch.setattr(weights, "download", lambda name, dtype=None, update=False, single_component=False:
                        calls.append(dtype) or tmp_path)
    assert cli("download", "sd15").exit_code == 0
    assert calls == [weights.default_dtype()]  # float32 on this CPU, as `run --dtype` defaults to


@pytest.mark.parametrize(("name", "expected"), [
    ("typo", "no such model folder, preset or hub repo id: 'typo'"),
    ("./models/my model", "no such model folder, preset or hub repo id: './models/my model'"),
    ("some one/bad name", "no such model folder, preset or hub repo id"),
])
def test_download_checks_names_as_run_does(name: str, expected: str) -> None:
    start = time.perf_counter()
    assert_one_line_error(cli("download", name), 1, expected)
    assert time.perf_counter() - start < 2


def test_download_of_a_local_folder(tiny_sd15: Path) -> None:
    assert_one_line_error(cli("download", tiny_sd15), 1, "is a local model folder, not a hub repo id")


# --------------------------------------------------------------------------------------- small things


def _tool(*args: str, **kwargs: object) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "mlx_img2img", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_python_m_runs_and_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    version = _tool("--version")
    out, _ = version.communicate(timeout=60)
    assert version.returncode == 0 and out.startswith("mlx-img2img")

    models = _tool("models", cwd=tmp_path)  # as `mlx-img2img models | head -0`: the reader is gone
    models.stdout.close()
    err = models.stderr.read()
    models.wait(timeout=60)
    assert (models.returncode, err) == (141, "")


def test_models_shows_the_default_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(weights, "cached_models", lambda: [])
    monkeypatch.setenv("MLX_IMG2IMG_MODEL", "sd-turbo")
    lines = cli("models").output.splitlines()
    assert [line.split()[0] for line in lines if "(default" in line] == ["sd-turbo"]
    assert "(default, from MLX_IMG2IMG_MODEL)" in next(line for line in lines if "sd-turbo" in line)
    monkeypatch.setenv("MLX_IMG2IMG_MODEL", str(tmp_path))
    assert f"Default model (MLX_IMG2IMG_MODEL): {tmp_path}" in cli("models").output


def test_integer_weights_are_refused(model_copy: Path) -> None:
    from safetensors.numpy import load_file, save_file

    path = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    tensors["conv_in.weight"] = (tensors["conv_in.weight"] * 100).astype("int8")  # as a quantized checkpoint
    save_file(tensors, path)
    with pytest.raises(ModelFormatError, match="weight conv_in.weight is int8, not floating point: integer-quantized"):
        Img2ImgPipeline.from_pretrained(model_copy)
