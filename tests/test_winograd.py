"""Winograd's F(2x2, 3x3) convolution (models.layers): against torch's conv2d, and end to end against diffusers."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_img2img.models import layers

from .test_pipeline import assert_matches_diffusers, pipelines, sketch_image


@pytest.mark.parametrize("h,w,c,co,padding", [
    (7, 5, 3, 6, ((1, 1), (1, 1))),  # odd sizes: the last blocks stick out
    (6, 8, 4, 4, ((0, 1), (1, 0))),  # a band's asymmetric padding
    (9, 4, 5, 2, ((0, 0), (0, 0))),
    (3, 3, 2, 3, ((1, 1), (1, 1))),  # one block
])
def test_winograd_matches_torch_conv2d(h: int, w: int, c: int, co: int, padding: layers.Padding) -> None:
    rng = np.random.default_rng(h * w + c)
    x = rng.standard_normal((2, h, w, c)).astype(np.float32)
    weight = rng.standard_normal((co, 3, 3, c)).astype(np.float32)
    (top, bottom), (left, right) = padding
    xt = torch.nn.functional.pad(torch.from_numpy(x).permute(0, 3, 1, 2), (left, right, top, bottom))
    expected = torch.nn.functional.conv2d(xt, torch.from_numpy(weight).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    got = layers.winograd_conv3x3(mx.array(x), layers.winograd_kernel(mx.array(weight)), padding)
    assert got.shape == tuple(expected.shape)
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), rtol=0, atol=2e-5 * float(expected.abs().max()))


def test_winograd_kernel_follows_a_new_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kept transform is the current weight's: a merged LoRA or a reload replaces the array."""
    monkeypatch.setattr(layers, "WINOGRAD_MIN_PIXELS", 1)
    conv = layers.Conv2d(32, 8, 3, padding=1)
    conv.eager = True
    x = mx.random.normal((1, 6, 6, 32))
    assert conv.winograd_fits(32, 36, mx.float32)
    for _ in range(2):
        direct = mx.conv_general(x, conv.weight, 1, ([1, 1], [1, 1])) + conv.bias
        assert mx.allclose(conv(x), direct, atol=1e-5).item()
        conv.update({"weight": conv.weight * 2})
    assert "_winograd" not in conv.parameters()
    assert not conv.winograd_fits(32, 36, mx.float16)


def test_pipeline_with_winograd_everywhere_matches_diffusers(tiny_sd15: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every 3x3 stride-1 convolution of UNet and VAE through Winograd (the tiny model is below the sizes
    where it is chosen, and the UNet is not eager): the image stays within the parity tolerance of diffusers'."""
    calls = []
    original = layers.winograd_conv3x3
    monkeypatch.setattr(layers, "winograd_conv3x3", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(layers, "WINOGRAD_MIN_PIXELS", 1)
    monkeypatch.setattr(layers, "WINOGRAD_MIN_CHANNELS", 1)
    monkeypatch.setattr(layers.Conv2d, "eager", True)  # the UNet's too
    ours, ref = pipelines(tiny_sd15, "euler")
    assert_matches_diffusers("tiny_sd15 winograd", ours, ref, 3, scheduler="euler",
                             prompt="a watercolour painting of a house, golden hour", image=sketch_image(64, 64),
                             strength=0.75, num_inference_steps=8, guidance_scale=7.5)
    assert len(calls) > 50


def test_low_memory_keeps_no_kernel_transforms_and_gives_the_same_pixels(tiny_sd15: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from mlx_img2img import Img2ImgPipeline

    monkeypatch.setattr(layers, "WINOGRAD_MIN_PIXELS", 1)
    monkeypatch.setattr(layers, "WINOGRAD_MIN_CHANNELS", 1)
    images = []
    for low_memory in (False, True):
        pipe = Img2ImgPipeline.from_pretrained(tiny_sd15, low_memory=low_memory)
        images.append(np.asarray(pipe("a house", sketch_image(64, 64), strength=0.5, num_inference_steps=2,
                                      seed=0).images[0]))
        kept = [m for _, m in pipe.vae.named_modules() if "_winograd" in m.__dict__]
        assert bool(kept) != low_memory
    assert np.array_equal(*images)  # one tile: low memory changes what is kept, not the pixels
