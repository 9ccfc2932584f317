"""The eager VAE's memory bounds (models.layers.Conv2d.eager): the same values bit for bit, fewer full-size maps."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_img2img.loading import load_module
from mlx_img2img.loading.folder import load_weights
from mlx_img2img.models import layers
from mlx_img2img.models.vae import AutoencoderKL, VAEConfig
from mlx_img2img.weights import read_json


def _set_eager(module, eager: bool) -> None:
    for _, m in module.named_modules():
        if isinstance(m, layers.Conv2d):
            m.eager = eager


@pytest.mark.parametrize("chunk", [layers.CONV_CHUNK_BYTES, 4096])  # 4096: every 3x3 convolution in bands
def test_eager_vae_computes_the_lazy_values_bit_for_bit(tiny_sd15: Path, chunk: int,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-band norms and upsampling, in-place bands, 1x1 kernels as a product: only what is alive at once
    changes, not one bit of the result (diffusers parity itself is tests/test_components.py::test_vae).
    Bands on parallel streams (their BLAS threads move the last bits) are the next test's."""
    monkeypatch.setattr(layers, "CONV_CHUNK_BYTES", chunk)
    monkeypatch.setattr(layers, "BAND_SPLIT_MIN_PIXELS", 1 << 30)
    results = _eager_and_lazy(tiny_sd15)
    for a, b in zip(results[True], results[False], strict=True):
        assert mx.array_equal(a, b).item()


def _eager_and_lazy(model: Path) -> dict[bool, tuple[mx.array, ...]]:
    """The tiny VAE's posterior (mean, std) and decoded mean, eagerly and lazily."""
    folder = model / "vae"
    vae = load_module(AutoencoderKL(VAEConfig.from_dict(read_json(folder / "config.json"))),
                      load_weights(folder, mx.float32), str(folder), "")
    image = mx.array(np.random.default_rng(0).uniform(-1, 1, (1, 48, 40, 3)).astype(np.float32))
    results = {}
    for eager in (True, False):
        _set_eager(vae, eager)
        mean, std = vae.encode(image)
        results[eager] = (mean, std, vae.decode(mean))
    return results


def test_parallel_bands_give_the_same_image(tiny_sd15: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bands on parallel streams (every map, here: the tiny VAE is below the size where they are cut)
    give the lazy VAE's values up to rounding: their BLAS threads and band edges differ."""
    monkeypatch.setattr(layers, "BAND_SPLIT_MIN_PIXELS", 1)
    groups = []
    original = layers.parallel.evaluate_in_parts
    monkeypatch.setattr(layers.parallel, "evaluate_in_parts", lambda ps: groups.append(len(ps)) or original(ps))
    results = _eager_and_lazy(tiny_sd15)
    assert max(groups) == min(2, os.cpu_count() or 1)
    for a, b in zip(results[True], results[False], strict=True):
        assert mx.allclose(a, b, rtol=1e-5, atol=1e-5).item()


def _peak_above(fn, x: mx.array) -> tuple[int, mx.array]:
    mx.eval(x)
    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    y = fn(x)
    mx.eval(y)
    return mx.get_peak_memory() - base, y


def test_eager_blocks_hold_no_extra_full_size_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    """A channel-halving resnet block holds its input, its statistics' temporary and its own maps, not a
    normalised copy, joined bands or a 1x1 convolution's copies; a 2x upsample block holds its output, not
    the doubled input beside it (lazily both blocks held about three times this)."""
    monkeypatch.setattr(layers, "CONV_CHUNK_BYTES", 1 << 18)
    rng = np.random.default_rng(0)
    resnet = layers.ResnetBlock2D(64, 32, 8, 1e-6)
    upsample = layers.Upsample2D(32)
    for block in (resnet, upsample):
        _set_eager(block, True)
        mx.eval(block.parameters())
    x = mx.array(rng.standard_normal((1, 128, 128, 64)).astype(np.float32))  # 4 MiB; the block's maps 2 MiB
    peak, _ = _peak_above(resnet, x)
    assert peak < 1.5 * x.nbytes, peak
    x = mx.array(rng.standard_normal((1, 96, 96, 32)).astype(np.float32))
    peak, y = _peak_above(upsample, x)
    assert y.shape == (1, 192, 192, 32)
    assert peak < 1.25 * y.nbytes, peak
