"""Memory features: tiled VAE with blended seams, quantized weights, low-memory mode, prompt reuse."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_img2img import Img2ImgPipeline
from mlx_img2img.tiling import map_tiles
from tests.test_pipeline import sketch_image


@pytest.mark.parametrize("scale,align", [(1, 1), (8, 1), (1 / 8, 8)])
def test_tiles_of_a_local_function_blend_back_exactly(scale: float, align: int) -> None:
    x = mx.array(np.random.default_rng(0).standard_normal((1, 200, 136, 3)).astype(np.float32))

    def fn(t: mx.array) -> mx.array:  # per-pixel, resampled by `scale`
        y = t * 2.0 + 1.0
        if scale > 1:
            return mx.repeat(mx.repeat(y, int(scale), axis=1), int(scale), axis=2)
        if scale < 1:
            step = int(1 / scale)
            return y[:, ::step, ::step]
        return y

    whole = fn(x)
    tiled = map_tiles(fn, x, tile=64, overlap=16, scale=scale, align=align)
    assert tiled.shape == whole.shape
    np.testing.assert_allclose(np.array(tiled), np.array(whole), atol=1e-5)


def test_tiled_vae_leaves_no_seams(tiny_sd15: Path) -> None:
    pipe = Img2ImgPipeline.from_pretrained(tiny_sd15)
    latents = pipe.encode_image(pipe.prepare_image(sketch_image(192, 128)), posterior="mean")
    whole = np.asarray(pipe.decode(latents)[0], np.float32)
    pipe.vae_tile_size = 64
    tiled_latents = pipe.encode_image(pipe.prepare_image(sketch_image(192, 128)), posterior="mean")
    tiled = np.asarray(pipe.decode(tiled_latents)[0], np.float32)
    assert tiled.shape == whole.shape
    # The VAE's group norms and mid-block attention see the whole image, so tiles are not bit-exact
    # (on this random tiny VAE they differ a lot; map_tiles itself is exact, see above). What tiling
    # must not do is leave seams: steps between neighbouring columns and rows at tile borders are no
    # larger than the steps elsewhere in the image.
    assert not np.array_equal(tiled, whole)
    for axis in (0, 1):
        jumps = np.abs(np.diff(tiled, axis=axis)).mean(axis=(1 - axis, 2))
        assert jumps.max() < 3 * np.median(jumps), (axis, jumps.max(), np.median(jumps))


@pytest.mark.parametrize("bits,tolerance", [(8, 0.06), (4, 0.5)])
def test_quantized_models_stay_close_to_float(tiny_sd15: Path, bits: int, tolerance: float) -> None:
    """One UNet call and the prompt encoding, relative to the float model. (Whole images are compared
    on full-size architectures by the benchmark: this tiny random model amplifies any change.)"""
    full = Img2ImgPipeline.from_pretrained(tiny_sd15)
    pipe = Img2ImgPipeline.from_pretrained(tiny_sd15, quantize=bits)
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in pipe.unet.named_modules())
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in pipe.text_encoders[0].named_modules())
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((1, 8, 8, 4)).astype(np.float32))
    context = full.encode_prompt("a house", guidance_scale=1.0).context
    t = mx.array([500.0])
    a, b = full.unet(x, t, context), pipe.unet(x, t, context)
    assert float(mx.abs(a - b).max() / mx.abs(a).max()) < tolerance
    a, b = context, pipe.encode_prompt("a house", guidance_scale=1.0).context
    assert float(mx.abs(a - b).max() / mx.abs(a).max()) < tolerance
    result = pipe(prompt="a house", image=sketch_image(64, 64), strength=0.5, num_inference_steps=4, seed=3)
    assert bool(mx.all(mx.isfinite(result.latents)).item())


def test_low_memory_mode_frees_text_encoders_and_matches(tiny_sd15: Path) -> None:
    kwargs = dict(image=sketch_image(64, 64), strength=0.5, num_inference_steps=4, seed=3)
    normal = Img2ImgPipeline.from_pretrained(tiny_sd15)
    frugal = Img2ImgPipeline.from_pretrained(tiny_sd15, low_memory=True)
    assert frugal.text_encoders == []
    for prompt in ("a house", "a house", "a castle"):  # the repeat reuses the encoding, the new one reloads
        a, b = normal(prompt=prompt, **kwargs), frugal(prompt=prompt, **kwargs)
        assert frugal.text_encoders == []
        assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_one_prompt_encoding_per_series(tiny_sd15: Path) -> None:
    pipe = Img2ImgPipeline.from_pretrained(tiny_sd15)
    calls = []
    encoder = pipe.text_encoders[0]
    pipe.text_encoders = [lambda ids: calls.append(ids.shape[0]) or encoder(ids)]
    for seed in range(3):
        pipe(prompt="a house", image=sketch_image(64, 64), strength=0.5, num_inference_steps=2, seed=seed)
    assert sum(calls) == 2  # the negative and the positive prompt, once (on a CPU as parts on two streams)
