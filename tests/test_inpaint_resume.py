"""Masks in resume and --from: an existing output is this run's only when its mask is (by content, not by
path, with the same mask settings), and --from re-uses a stored mask file only when it is the one the image
was made with (its SHA-256)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mlx_img2img.images import read_metadata, save_png
from tests.test_inpaint import box_mask, cli_run
from tests.test_pipeline import sketch_image


def other_mask(width: int, height: int) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((width // 2, 4, width - 4, height - 4), fill=255)
    return mask


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_a_series_resumes_only_over_outputs_of_the_same_mask(tiny_sd15: Path, tmp_path: Path) -> None:
    inputs, masks, out = tmp_path / "in", tmp_path / "masks", tmp_path / "out"
    inputs.mkdir()
    masks.mkdir()
    for name in ("a.png", "b.png"):
        sketch_image(64, 48).save(inputs / name)
        box_mask(64, 48).save(masks / name)
    made = cli_run(tiny_sd15, inputs, "--mask", masks, "-o", out, "-s", 0.5)
    assert made.exit_code == 0, made.output
    before = mtimes(out)

    moved = tmp_path / "moved-masks"
    masks.rename(moved)  # the same masks elsewhere: compared by content, so the outputs are kept
    same = cli_run(tiny_sd15, inputs, "--mask", moved, "-o", out, "-s", 0.5)
    assert same.exit_code == 0, same.output
    assert "2 already there" in same.stderr and "Loading" not in same.stderr and mtimes(out) == before
    unused = cli_run(tiny_sd15, inputs, "--mask", moved, "-o", out, "-s", 0.5, "--padding", 8)
    assert unused.exit_code == 0 and "2 already there" in unused.stderr, unused.output  # used with --only-masked only

    for args, what in ((["--mask", moved, "--invert-mask"], "invert_mask"), (["--mask", moved, "--mask-blur", 1],
                       "mask_blur"), (["--mask", moved, "--only-masked"], "only_masked"), ([], "mask")):
        refused = cli_run(tiny_sd15, inputs, *args, "-o", out, "-s", 0.5)
        assert refused.exit_code == 1 and f"another run made it (its {what} differs)" in refused.output, args
        assert "Loading" not in refused.stderr

    other_mask(64, 48).save(moved / "b.png")  # b's mask file, same name, other content
    refused = cli_run(tiny_sd15, inputs, "--mask", moved, "-o", out, "-s", 0.5)
    assert refused.exit_code == 1, refused.output
    assert f"{out / 'b.png'} exists but another run made it (its mask differs)" in refused.output
    assert "--overwrite" in refused.output and "Loading" not in refused.stderr and mtimes(out) == before
    again = cli_run(tiny_sd15, inputs, "--mask", moved, "-o", out, "-s", 0.5, "--overwrite")
    assert again.exit_code == 0, again.output
    assert all(mtimes(out)[name] != before[name] for name in before)
    hashes = {name: read_metadata(out / name)[1]["mask_sha256"] for name in ("a.png", "b.png")}
    assert hashes == {name: hashlib.sha256((moved / name).read_bytes()).hexdigest() for name in hashes}


def test_from_reuses_a_stored_mask_only_if_its_content_is_the_same(tiny_sd15: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    sketch_image(64, 48).save(image)
    box_mask(64, 48).save(mask)
    assert cli_run(tiny_sd15, image, "--mask", mask, "-s", 0.5, "-o", "first.png").exit_code == 0
    again = cli_run(tiny_sd15, image, "--from", "first.png", "-o", "again.png")
    assert again.exit_code == 0, again.output
    assert np.array_equal(np.asarray(Image.open("again.png")), np.asarray(Image.open("first.png")))

    other_mask(64, 48).save(mask)
    refused = cli_run(tiny_sd15, image, "--from", "first.png", "-o", "refused.png")
    assert refused.exit_code == 1 and len(refused.output.strip().splitlines()) == 1, refused.output
    assert f"the mask '{mask}' has the hash" in refused.output and "its content differs" in refused.output
    assert "give --mask FILE" in refused.output and not Path("refused.png").exists()
    chosen = cli_run(tiny_sd15, image, "--from", "first.png", "--mask", mask, "-o", "chosen.png")  # meant
    assert chosen.exit_code == 0, chosen.output
    assert read_metadata(Path("chosen.png"))[1]["mask_sha256"] != read_metadata(Path("first.png"))[1]["mask_sha256"]

    mask.unlink()
    gone = cli_run(tiny_sd15, image, "--from", "first.png", "-o", "gone.png")
    assert gone.exit_code == 1 and "which is not there: give --mask FILE" in gone.output

    # as the server stores an image inpainted with a mask sent as pixels: the inpainting settings, no mask file
    stored = {k: v for k, v in read_metadata(Path("first.png"))[1].items() if k not in ("mask", "mask_sha256")}
    save_png(Image.open("first.png"), "served.png", stored)
    unmasked = cli_run(tiny_sd15, image, "--from", "served.png", "-o", "unmasked.png")
    assert unmasked.exit_code == 0 and "served.png was inpainted with a mask it does not store" in unmasked.stderr
    assert "give --mask FILE to inpaint again" in unmasked.stderr


def test_a_series_masked_by_its_transparency_or_outpainted_resumes(tiny_sd15: Path, tmp_path: Path) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    rgba = np.dstack([np.asarray(sketch_image(64, 48)), np.full((48, 64), 255, np.uint8)])
    rgba[8:24, 8:30, 3] = 0  # erased in an image editor: the mask
    Image.fromarray(rgba).save(inputs / "erased.png")
    assert cli_run(tiny_sd15, inputs, "-o", out, "-s", 0.5).exit_code == 0
    same = cli_run(tiny_sd15, inputs, "-o", out, "-s", 0.5)
    assert same.exit_code == 0 and "1 already there" in same.stderr and "Loading" not in same.stderr
    other = cli_run(tiny_sd15, inputs, "-o", out, "-s", 0.5, "--inpaint-fill", "fill")
    assert other.exit_code == 1 and "(its inpaint_fill differs)" in other.output
    wide = tmp_path / "wide"
    assert cli_run(tiny_sd15, inputs, "-o", wide, "-s", 1, "--outpaint", "0,16,0,0").exit_code == 0
    same = cli_run(tiny_sd15, inputs, "-o", wide, "-s", 1, "--outpaint", "0,16,0,0")
    assert same.exit_code == 0 and "1 already there" in same.stderr and "Loading" not in same.stderr
    other = cli_run(tiny_sd15, inputs, "-o", wide, "-s", 1, "--outpaint", "0,24,0,0")
    assert other.exit_code == 1 and "(its outpaint differs)" in other.output
