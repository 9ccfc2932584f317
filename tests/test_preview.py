"""Live previews: the tiny autoencoder's decoder against diffusers' AutoencoderTiny on tiny random weights."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

from mlx_img2img.models.taesd import load_tiny_decoder
from mlx_img2img.preview import Pacer, make_previewer

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def test_tiny_decoder_matches_diffusers_autoencoder_tiny(tmp_path: Path):
    torch.manual_seed(0)
    reference = diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8),
                                          decoder_block_out_channels=(12, 12, 12, 12),
                                          num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(2, 1, 1, 1))
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(1.5)  # well-conditioned: every layer moves the output
    reference.save_pretrained(tmp_path / "taesd")
    latents = torch.randn(2, 4, 8, 6) * 2  # beyond the soft clamp's knee too
    with torch.no_grad():
        expected = reference.decode(latents).sample.numpy()
    decoder = load_tiny_decoder(tmp_path / "taesd")
    ours = np.array(decoder(mx.array(latents.numpy().transpose(0, 2, 3, 1)))).transpose(0, 3, 1, 2)
    assert ours.shape == expected.shape == (2, 3, 64, 48)
    assert expected.std() > 0.1 and np.abs(ours - expected).max() < 1e-4

    preview = make_previewer("taesd", False, 4, decoder)(mx.array(latents.numpy().transpose(0, 2, 3, 1)))
    assert preview.size == (48, 64)  # full size, the first image
    pixels = np.asarray(preview).astype(np.float32) / 255 * 2 - 1
    assert np.abs(pixels - np.clip(expected[0].transpose(1, 2, 0), -1, 1)).max() < 2.5 / 255
    cheap = make_previewer("taesd", False, 4, None)(mx.zeros((1, 8, 6, 4)))  # not cached: the cheap one
    assert cheap.size == (6, 8)


def test_pacer_interval_and_budget(monkeypatch: pytest.MonkeyPatch):
    every = Pacer(3)
    assert [k for k in range(1, 11) if every.due(k, 10)] == [3, 6, 9, 10]
    now = [0.0]
    monkeypatch.setattr("mlx_img2img.preview.time.perf_counter", lambda: now[0])
    paced = Pacer(budget=0.1)  # steps of 1 s, previews of 2 s: one every ~20 steps keeps to 10% of the time

    def preview(x0: object) -> str:
        now[0] += 2.0
        return "preview"

    made = []
    for k in range(1, 101):
        now[0] += 1.0
        if paced.due(k, 100):
            made.append(k)
            paced.make(preview, None)
    assert made[0] == 1  # at once
    assert 4 <= len(made) <= 6 and paced.spent / now[0] <= 0.1 + 2.0 / now[0]


def test_run_writes_the_preview_of_every_nth_step(tiny_sd15: Path, tmp_path: Path):
    """`run --preview-every 2 DIR`: steps 2 and 4 of 4 as cheap previews (an eighth of the size); an existing
    preview is kept without --overwrite."""
    from tests.test_cli import run

    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)).save(source)
    previews = tmp_path / "previews"
    previews.mkdir()
    (previews / "out.step002.png").write_bytes(b"mine")
    result = run(tiny_sd15, source, "-p", "a cat", "-s", 1.0, "--seed", 1, "-o", tmp_path / "out.png",
                 "--preview-every", 2, previews)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in previews.iterdir()) == ["out.step002.png", "out.step004.png"]
    assert (previews / "out.step002.png").read_bytes() == b"mine" and "1 previews existed" in result.output
    with Image.open(previews / "out.step004.png") as im:
        assert max(im.size) == 8  # the latents' size
