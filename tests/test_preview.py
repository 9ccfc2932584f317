"""Live previews: the tiny autoencoder's decoder against diffusers' AutoencoderTiny on tiny random weights."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_img2img.models.taesd import load_tiny_decoder
from mlx_img2img.preview import make_previewer

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
