"""images.py: every kind of input file, the size rules, atomic saving, metadata, contact sheets."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, PngImagePlugin

from mlx_img2img import images
from mlx_img2img.errors import ImageInputError


def raw_png(path: Path, width: int, height: int, bit_depth: int, colour_type: int, rows: bytes = b"\0") -> Path:
    """A PNG written byte by byte: 16-bit RGB (which Pillow cannot write) or a header-only bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def pixel(img: Image.Image, xy: tuple[int, int] = (0, 0)) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(img)[xy[1], xy[0]])


# ------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp", "tiff", "bmp", "gif"])
def test_common_formats_load_as_rgb(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"in.{fmt}"
    Image.new("RGB", (40, 24), (200, 40, 40)).save(path, format=fmt.upper())
    img = images.load_image(path)
    assert img.mode == "RGB" and img.size == (40, 24)
    assert np.abs(np.asarray(img, dtype=int) - (200, 40, 40)).max() < 40  # lossy and palette formats


def test_exif_orientation_is_honoured(tmp_path: Path) -> None:
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = 255  # the left half white
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    img = images.load_image(tmp_path / "rot.jpg")
    assert img.size == (20, 40)
    assert pixel(img, (10, 2))[0] > 200 and pixel(img, (10, 37))[0] < 50  # white went to the top


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 128))
    rgba.save(tmp_path / "a.png")
    img = images.load_image(tmp_path / "a.png")
    assert pixel(img, (0, 0)) == (255, 0, 0)
    assert pixel(img, (2, 2)) == (255, 255, 255)
    assert pixel(img, (1, 0)) in {(127, 127, 255), (128, 128, 255)}


def test_grey_palette_and_bilevel_modes(tmp_path: Path) -> None:
    Image.new("L", (4, 4), 100).save(tmp_path / "g.png")
    Image.new("LA", (4, 4), (0, 0)).save(tmp_path / "la.png")
    Image.new("1", (4, 4), 1).save(tmp_path / "b.png")
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30])
    pal.save(tmp_path / "p.png")
    pal.save(tmp_path / "pt.png", transparency=1)
    assert pixel(images.load_image(tmp_path / "g.png")) == (100, 100, 100)
    assert pixel(images.load_image(tmp_path / "la.png")) == (255, 255, 255)
    assert pixel(images.load_image(tmp_path / "b.png")) == (255, 255, 255)
    assert pixel(images.load_image(tmp_path / "p.png")) == (10, 20, 30)
    assert pixel(images.load_image(tmp_path / "pt.png")) == (255, 255, 255)  # transparent index


def test_16_bit_images_are_scaled_not_clipped(tmp_path: Path) -> None:
    grey = np.array([[0, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")  # Pillow's own convert would clip it to white
    assert [pixel(images.load_image(tmp_path / "g16.png"), (x, 0))[0] for x in range(3)] == [0, 128, 255]
    Image.fromarray(grey).save(tmp_path / "g16.tif")
    assert [pixel(images.load_image(tmp_path / "g16.tif"), (x, 0))[0] for x in range(3)] == [0, 128, 255]
    rows = b"\0" + struct.pack(">6H", 65535, 32768, 0, 256, 512, 1024)
    rgb16 = images.load_image(raw_png(tmp_path / "rgb16.png", 2, 1, 16, 2, rows))
    assert pixel(rgb16, (0, 0)) == (255, 128, 0)
    Image.new("F", (2, 2), 0.5).save(tmp_path / "f.tif")
    assert pixel(images.load_image(tmp_path / "f.tif")) == (128, 128, 128)


def test_cmyk_and_colour_profiles(tmp_path: Path) -> None:
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = pixel(images.load_image(tmp_path / "c.jpg"))
    assert r > 200 and g < 60 and b < 60
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (2, 2), (10, 200, 30)).save(tmp_path / "icc.png", icc_profile=srgb)
    assert pixel(images.load_image(tmp_path / "icc.png")) == (10, 200, 30)
    Image.new("RGB", (2, 2), (10, 200, 30)).save(tmp_path / "bad_icc.png", icc_profile=b"garbage")
    assert pixel(images.load_image(tmp_path / "bad_icc.png")) == (10, 200, 30)


def test_bad_inputs_raise_one_clear_image_input_error(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    noise = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(good)
    (tmp_path / "text.png").write_text("not an image\n")
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:2000])
    Image.new("RGB", (64, 48)).save(tmp_path / "full.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:300])
    raw_png(tmp_path / "bomb.png", 50_000, 50_000, 8, 2)  # 2.5 gigapixels declared, a few bytes long
    raw_png(tmp_path / "big.png", 12_000, 10_000, 8, 2)  # over our limit, under Pillow's own
    cases = {
        "missing.png": "no such file",
        ".": "is a folder",
        "text.png": "not an image",
        "cut.png": "truncated",
        "cut.jpg": "truncated",
        "bomb.png": "decompression bomb",
        "big.png": "12000x10000 is 120 megapixels",
    }
    for name, expected in cases.items():
        with pytest.raises(ImageInputError, match=expected) as info:
            images.load_image(tmp_path / name)
        assert "\n" not in str(info.value)
    with pytest.raises(ImageInputError, match="3,072 pixels, over the limit of 100 pixels"):
        images.load_image(good, max_pixels=100)


def test_every_truncation_of_a_png_is_an_image_input_error(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8)).save(good)
    data = good.read_bytes()
    for n in range(0, len(data) - 12, 97):  # anywhere before the (last, optional) IEND chunk
        (tmp_path / "t.png").write_bytes(data[:n])
        with pytest.raises(ImageInputError):
            images.load_image(tmp_path / "t.png")


def test_list_images_takes_image_files_only(tmp_path: Path) -> None:
    for name in ("b.png", "a.JPG", "c.webp", ".hidden.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    assert [p.name for p in images.list_images(tmp_path)] == ["a.JPG", "b.png", "c.webp"]


# --------------------------------------------------------------------------------------------- sizes


def test_output_size_rules() -> None:
    assert images.output_size((640, 480), None, None) == (640, 480)
    assert images.output_size((640, 480), 320, None) == (320, 240)
    assert images.output_size((640, 480), None, 120, "crop") == (160, 120)
    assert images.output_size((640, 480), 512, 512, "fit") == (512, 384)
    for mode in ("crop", "pad", "stretch"):
        assert images.output_size((640, 480), 512, 512, mode) == (512, 512)
    with pytest.raises(ValueError, match="resize mode"):
        images.output_size((640, 480), 512, 512, "zoom")


def test_fit_image_modes() -> None:
    img = Image.new("RGB", (640, 480), (200, 0, 0))
    assert images.fit_image(img, None, None) is img
    assert images.fit_image(img, 512, 512, "fit").size == (512, 384)
    crop = images.fit_image(img, 512, 512, "crop")
    assert crop.size == (512, 512) and pixel(crop) == (200, 0, 0)
    pad = images.fit_image(img, 512, 512, "pad")
    assert pad.size == (512, 512) and pixel(pad) == (255, 255, 255) and pixel(pad, (256, 256)) == (200, 0, 0)
    assert images.fit_image(img, 100, 300, "stretch").size == (100, 300)


def test_model_size_is_a_capped_multiple_of_8() -> None:
    assert images.model_size((512, 384)) == (512, 384)
    assert images.model_size((513, 385)) == (512, 384)  # nearest multiple of 8
    assert images.model_size((70, 54)) == (72, 64)  # never below 64
    assert images.model_size((4032, 3024)) == (1024, 768)  # capped, aspect kept
    assert images.model_size((4032, 3024), max_side=768) == (768, 576)
    assert images.model_size((10, 1000)) == (64, 1000)
    for size in [(33, 517), (1023, 1023), (2000, 100), (8, 8)]:
        w, h = images.model_size(size)
        assert w % 8 == 0 and h % 8 == 0 and 64 <= min(w, h) and max(w, h) <= 1024


def test_resize_to() -> None:
    img = Image.new("RGB", (72, 56))
    assert images.resize_to(img, (72, 56)) is img
    assert images.resize_to(img, (70, 54)).size == (70, 54)


# ------------------------------------------------------------------------------------------ metadata

SETTINGS = {
    "prompt": "a castle, on a cliff",
    "negative_prompt": "blurry, low: quality",
    "steps": 30,
    "scheduler": "euler_a",
    "guidance": 7.5,
    "seed": 1234,
    "size": [512, 384],
    "model": "sd15",
    "model_name": "sd15",
    "strength": 0.65,
    "version": "mlx-img2img 0.1.0",
}


def test_parameters_text_is_a1111_style() -> None:
    assert images.format_parameters(SETTINGS) == (
        "a castle, on a cliff\n"
        "Negative prompt: blurry, low: quality\n"
        "Steps: 30, Sampler: Euler a, CFG scale: 7.5, Seed: 1234, Size: 512x384, Model: sd15, "
        "Denoising strength: 0.65, Version: mlx-img2img 0.1.0"
    )
    no_negative = images.format_parameters({**SETTINGS, "negative_prompt": None, "model_name": "my, model"})
    assert "Negative prompt" not in no_negative and 'Model: "my, model"' in no_negative


def test_parameters_parse_back() -> None:
    parsed = images.parse_parameters(images.format_parameters(SETTINGS))
    for key in ("prompt", "negative_prompt", "steps", "scheduler", "guidance", "seed", "strength"):
        assert parsed[key] == SETTINGS[key]
    assert (parsed["width"], parsed["height"]) == (512, 384)


def test_parse_parameters_from_automatic1111() -> None:
    text = (
        "masterpiece, castle\nsecond line\nNegative prompt: ugly\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, "
        'Model hash: abc, Model: v1-5, Denoising strength: 0.7, Lora hashes: "a: 1, b: 2", Version: v1.9.0'
    )
    parsed = images.parse_parameters(text)
    assert parsed["prompt"] == "masterpiece, castle\nsecond line"
    assert parsed["negative_prompt"] == "ugly"
    assert parsed["scheduler"] == "dpmpp_2m_karras"
    assert (parsed["steps"], parsed["guidance"], parsed["seed"], parsed["strength"]) == (20, 7.0, 42, 0.7)
    assert parsed["fields"]["Lora hashes"] == "a: 1, b: 2"
    assert images.parse_parameters("just a prompt") == {"prompt": "just a prompt", "fields": {}}
    assert images.parse_parameters("x\nSteps: 10, Sampler: PLMS, Seed: 3")["scheduler"] == "pndm"


def test_save_png_stores_parameters_and_json(tmp_path: Path) -> None:
    path = images.save_png(Image.new("RGB", (64, 48), (1, 2, 3)), tmp_path / "out.png", SETTINGS)
    with Image.open(path) as im:
        assert im.size == (64, 48)
        assert im.text["parameters"] == images.format_parameters(SETTINGS)
        assert json.loads(im.text["mlx-img2img"]) == SETTINGS
    assert images.read_metadata(path) == (images.format_parameters(SETTINGS), SETTINGS)


def test_unicode_prompt_round_trips(tmp_path: Path) -> None:
    settings = {**SETTINGS, "prompt": "城 auf dem Felsen ✨"}
    path = images.save_png(Image.new("RGB", (8, 8)), tmp_path / "u.png", settings)
    text, stored = images.read_metadata(path)
    assert text is not None and text.startswith("城 auf dem Felsen ✨\n") and stored == settings


def test_no_metadata_and_foreign_images(tmp_path: Path) -> None:
    plain = images.save_png(Image.new("RGB", (8, 8)), tmp_path / "plain.png", None)
    assert images.read_metadata(plain) == (None, None)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat\nSteps: 20, Sampler: Euler, CFG scale: 5, Seed: 9")
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=info)
    text, stored = images.read_metadata(tmp_path / "a1111.png")
    assert text is not None and text.startswith("a cat") and stored is None
    # AUTOMATIC1111 keeps them in the EXIF UserComment of JPEG and WebP files
    im = Image.new("RGB", (8, 8))
    exif = im.getexif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + "a dog\nSteps: 5, Seed: 1".encode("utf-16-be")
    im.save(tmp_path / "a1111.jpg", exif=exif)
    assert images.read_metadata(tmp_path / "a1111.jpg")[0] == "a dog\nSteps: 5, Seed: 1"


# ------------------------------------------------------------------------------------------- saving


def test_save_png_never_overwrites_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "out.png"
    images.save_png(Image.new("RGB", (8, 8), (1, 1, 1)), path)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        images.save_png(Image.new("RGB", (8, 8), (9, 9, 9)), path)
    assert path.read_bytes() == before
    images.save_png(Image.new("RGB", (8, 8), (9, 9, 9)), path, overwrite=True)
    assert pixel(Image.open(path)) == (9, 9, 9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temporary files left


def test_save_png_gets_ordinary_permissions(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = images.save_png(Image.new("RGB", (8, 8)), tmp_path / "out.png")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_interrupted_save_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original_save = Image.Image.save

    def save_then_interrupt(self: Image.Image, fp, *args, **kwargs) -> None:  # noqa: ANN001
        original_save(self, fp, *args, **kwargs)
        fp.truncate(10)  # half-written...
        raise KeyboardInterrupt  # ...and then Ctrl-C

    monkeypatch.setattr(Image.Image, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        images.save_png(Image.new("RGB", (8, 8)), tmp_path / "out.png", SETTINGS)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ contact sheet


def test_contact_sheet_lays_out_labelled_tiles() -> None:
    tiles = [Image.new("RGB", (64, 48), (50 * i, 0, 0)) for i in range(4)]
    labels = ["input", "strength 0.3", "strength 0.5", "strength 0.7"]
    sheet = images.contact_sheet(tiles, labels)
    assert sheet.mode == "RGB" and sheet.width > 4 * 64 and 48 < sheet.height < 2 * 48 + 40
    assert pixel(sheet, (8 + 32, 8 + 24)) == (0, 0, 0)  # the first tile
    assert pixel(sheet, (8 + 64 + 8 + 32, 8 + 24)) == (50, 0, 0)  # the second
    label_strip = np.asarray(sheet)[8 + 48 :, 8 : 8 + 64]
    assert label_strip.min() < 128  # some text was drawn under the first tile
    seven = images.contact_sheet([Image.new("RGB", (600, 400))] * 7, [f"{i}" for i in range(7)])
    assert seven.width < 5 * 520 and seven.height > 2 * 340  # tiles shrunk to 512, two rows
    with pytest.raises(ValueError):
        images.contact_sheet(tiles, labels[:2])
