"""Each MLX component against its diffusers/transformers twin on the same tiny random weights."""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_img2img.loading import load_module
from mlx_img2img.loading.folder import load_weights
from mlx_img2img.models import layers
from mlx_img2img.models.clip import CLIPTextConfig, CLIPTextModel
from mlx_img2img.models.unet import UNet2DConditionModel, UNetConfig
from mlx_img2img.models.vae import AutoencoderKL, VAEConfig
from mlx_img2img.parallel import cpu_parts, map_batch
from mlx_img2img.weights import read_json

MODELS = ["tiny_sd15", "tiny_sd2v"]


def _ours(cls, config_cls, folder: Path, prefix: str = ""):
    module = cls(config_cls.from_dict(read_json(folder / "config.json")))
    return load_module(module, load_weights(folder, mx.float32), str(folder), prefix)


def _nhwc(x: np.ndarray) -> mx.array:
    return mx.array(x.transpose(0, 2, 3, 1))


def _nchw(x: mx.array) -> np.ndarray:
    return np.array(x).transpose(0, 3, 1, 2)


def _close(ours: np.ndarray, ref: np.ndarray, tol: float = 1e-4) -> None:
    scale = max(float(np.abs(ref).max()), 1.0)
    assert np.abs(ours - ref).max() <= tol * scale, f"max diff {np.abs(ours - ref).max()} (scale {scale})"


@pytest.mark.parametrize("model", MODELS)
def test_text_encoder(model: str, request: pytest.FixtureRequest) -> None:
    from transformers import CLIPTextModel as TorchCLIP

    folder = request.getfixturevalue(model) / "text_encoder"
    ref_model = TorchCLIP.from_pretrained(folder).eval()
    ours = _ours(CLIPTextModel, CLIPTextConfig, folder, "text_model.")
    ids = np.full((2, 77), 49407)
    ids[0, :7] = [49406, 320, 1125, 539, 320, 2368, 49407]
    ids[1, :3] = [49406, 539, 49407]
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(ids), output_hidden_states=True)
    out = ours(mx.array(ids))
    _close(np.array(out.last_hidden_state), ref.last_hidden_state.numpy())
    _close(np.array(out.penultimate_hidden_state), ref.hidden_states[-2].numpy())
    _close(np.array(out.pooled), ref.pooler_output.numpy())


@pytest.fixture(params=["whole", "in_pieces"])
def pieces(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Also run with tiny memory budgets, so that every 3x3 convolution runs in bands of rows and
    every attention in chunks of queries (on the CPU in blocks of heads and queries), as large images do."""
    if request.param == "in_pieces":
        monkeypatch.setattr(layers, "CONV_CHUNK_BYTES", 4096)
        monkeypatch.setattr(layers, "ATTENTION_CHUNK_BYTES", 4096)
        monkeypatch.setattr(layers, "CPU_ATTENTION_BLOCK_BYTES", 4096)
    return request.param


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("size", [(8, 8), (12, 8), (9, 7)])  # 9x7 latents need upsampling to the skip's size
def test_unet(model: str, size: tuple[int, int], pieces: str, request: pytest.FixtureRequest) -> None:
    from diffusers import UNet2DConditionModel as TorchUNet

    folder = request.getfixturevalue(model) / "unet"
    ref_model = TorchUNet.from_pretrained(folder).eval()
    ours = _ours(UNet2DConditionModel, UNetConfig, folder)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, *size)).astype(np.float32)
    context = rng.standard_normal((2, 77, ours.config.cross_attention_dim)).astype(np.float32)
    for t in (1.0, 501.0, 999.0):
        with torch.no_grad():
            ref = ref_model(torch.from_numpy(x), torch.tensor(t), torch.from_numpy(context)).sample.numpy()
        out = _nchw(ours(_nhwc(x), mx.array([t]), mx.array(context)))
        assert np.abs(ref).mean() > 0.1  # the tiny model's output is not trivially small
        _close(out, ref)


def test_unet_batch_in_parts_on_cpu_streams(tiny_sd15: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU a batch runs as one part per core on parallel streams; an uneven split (3 samples over
    2 parts) must still match diffusers' single batched call, sample for sample."""
    from diffusers import UNet2DConditionModel as TorchUNet

    from mlx_img2img import parallel

    monkeypatch.setattr(parallel, "SPLIT_MAPS", True)  # the maps split as a batch of sequences does
    assert cpu_parts(3, maps=True) == min(3, os.cpu_count() or 1)  # the tests run on MLX's CPU backend
    folder = tiny_sd15 / "unet"
    ours = _ours(UNet2DConditionModel, UNetConfig, folder)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    context = rng.standard_normal((3, 77, ours.config.cross_attention_dim)).astype(np.float32)
    with torch.no_grad():
        ref = TorchUNet.from_pretrained(folder).eval()(torch.from_numpy(x), torch.tensor(301.0),
                                                        torch.from_numpy(context)).sample.numpy()
    out = map_batch(ours, 3, _nhwc(x), mx.array([301.0]), mx.array(context))
    _close(_nchw(out), ref)


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_vae(tiny_sd15: Path, size: tuple[int, int], pieces: str) -> None:
    from diffusers import AutoencoderKL as TorchVAE

    folder = tiny_sd15 / "vae"
    ref_model = TorchVAE.from_pretrained(folder).eval()
    ours = _ours(AutoencoderKL, VAEConfig, folder)
    image = np.random.default_rng(1).uniform(-1, 1, (1, 3, *size)).astype(np.float32)
    with torch.no_grad():
        dist = ref_model.encode(torch.from_numpy(image)).latent_dist
        decoded = ref_model.decode(dist.mean).sample.numpy()
    mean, std = ours.encode(_nhwc(image))
    _close(_nchw(mean), dist.mean.numpy())
    _close(_nchw(std), dist.std.numpy())
    _close(_nchw(ours.decode(mean)), decoded)
