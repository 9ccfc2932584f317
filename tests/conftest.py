"""Shared fixtures: tiny random-weight models in the diffusers layout, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import mlx_img2img  # noqa: F401  (before any test imports mlx: MLX then runs on OpenBLAS, as the command does)

# Tests never touch the network; a hub lookup must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _build(tmp_path_factory: pytest.TempPathFactory, variant: str) -> Path:
    from tests.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp(f"tiny_{variant}"), variant)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD 1.x-like: quick_gelu CLIP, int attention_head_dim, conv projections, PNDM, epsilon."""
    return _build(tmp_path_factory, "sd15")


@pytest.fixture(scope="session")
def tiny_sd2v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD 2.x-like: gelu CLIP, per-block heads, linear projections, upcast attention, DDIM, v_prediction."""
    return _build(tmp_path_factory, "sd2v")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SDXL base-like: two text encoders (penultimate states, pooled projection), text_time embedding."""
    return _build(tmp_path_factory, "sdxl")


@pytest.fixture(scope="session")
def tiny_sdxl_refiner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SDXL refiner-like: text_encoder_2 only, aesthetic-score micro-conditioning."""
    return _build(tmp_path_factory, "sdxl_refiner")


@pytest.fixture(scope="session")
def tiny_lcm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LCM-distilled SD 1.x-like: LCMScheduler, guidance embedded through time_cond_proj_dim."""
    return _build(tmp_path_factory, "lcm")


@pytest.fixture(scope="session")
def tiny_sd15_inpaint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dedicated SD 1.x inpainting model: a 9-channel UNet (latents, mask, masked-image latents)."""
    return _build(tmp_path_factory, "sd15_inpaint")


@pytest.fixture(scope="session")
def tiny_sdxl_inpaint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SDXL with a 9-channel inpainting UNet."""
    return _build(tmp_path_factory, "sdxl_inpaint")
