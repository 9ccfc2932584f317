"""Finding and loading models: local folders, the real huggingface_hub cache offline, and clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mlx_img2img import Img2ImgPipeline, ModelFormatError, ModelNotFoundError
from mlx_img2img.weights import needed_files, select_weight_files


@pytest.fixture
def model_copy(tiny_sd15: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_sd15, tmp_path / "model"))


def _fake_cache(tiny_sd15: Path, cache: Path) -> None:
    """Lay the model out as huggingface_hub caches a repo: refs/main -> snapshots/<commit>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / "models--someone--tiny-sd"
    shutil.copytree(tiny_sd15, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)


def test_loads_local_folder(tiny_sd15: Path) -> None:
    pipe = Img2ImgPipeline.from_pretrained(tiny_sd15)
    assert pipe.default_scheduler == "pndm"
    assert pipe.model_name == tiny_sd15.name


def test_no_such_folder_or_repo(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such model folder"):
        Img2ImgPipeline.from_pretrained(tmp_path / "nowhere" / "model")


def test_a_file_is_read_as_a_single_file_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelFormatError, match="not a valid safetensors file"):
        Img2ImgPipeline.from_pretrained(tmp_path / "model.safetensors")


def test_uncached_repo_offline_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="offline"):
        Img2ImgPipeline.from_pretrained("sd15", offline=True)


def test_repo_id_from_real_hub_cache_offline(tiny_sd15: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A repo laid out as huggingface_hub caches it (refs/main -> snapshots/<commit>) loads offline."""
    _fake_cache(tiny_sd15, tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    pipe = Img2ImgPipeline.from_pretrained("someone/tiny-sd", offline=True)
    assert pipe.model_name == "someone/tiny-sd"


def test_missing_component(model_copy: Path) -> None:
    shutil.rmtree(model_copy / "vae")
    with pytest.raises(ModelFormatError, match="no vae folder"):
        Img2ImgPipeline.from_pretrained(model_copy)


def test_only_pickled_weights(model_copy: Path) -> None:
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(ModelFormatError, match="no .safetensors weights"):
        Img2ImgPipeline.from_pretrained(model_copy)


def test_truncated_weights(model_copy: Path) -> None:
    weights = model_copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="truncated"):
        Img2ImgPipeline.from_pretrained(model_copy)


def test_corrupt_weights(model_copy: Path) -> None:
    (model_copy / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"<html>not found</html>" * 10)
    with pytest.raises(ModelFormatError, match="not a valid safetensors"):
        Img2ImgPipeline.from_pretrained(model_copy)


def test_weights_that_do_not_match_config(model_copy: Path) -> None:
    config = model_copy / "unet" / "config.json"
    config.write_text(config.read_text().replace('"layers_per_block": 2', '"layers_per_block": 1'))
    with pytest.raises(ModelFormatError, match=r"unexpected \d+ weights: down_blocks"):
        Img2ImgPipeline.from_pretrained(model_copy)


def test_broken_config(model_copy: Path) -> None:
    (model_copy / "vae" / "config.json").write_text("{ not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        Img2ImgPipeline.from_pretrained(model_copy)


REPO_FILES = [
    "model_index.json", "README.md", "v1-5-pruned.ckpt", "safety_checker/model.safetensors",
    "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder/model.fp16.safetensors", "text_encoder/pytorch_model.bin", "tokenizer/vocab.json",
    "tokenizer/merges.txt", "tokenizer/tokenizer_config.json", "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]


def test_download_selection_half_takes_fp16_variant() -> None:
    files = needed_files(REPO_FILES, half=True)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in files
    assert "unet/diffusion_pytorch_model.safetensors" not in files
    assert "vae/diffusion_pytorch_model.safetensors" in files  # no fp16 variant: the full one
    assert not [f for f in files if f.endswith((".bin", ".ckpt")) or f.startswith("safety_checker")]
    assert not [f for f in files if "non_ema" in f]


def test_download_selection_float32_takes_full_weights() -> None:
    assert select_weight_files(REPO_FILES, "unet", half=False) == ["unet/diffusion_pytorch_model.safetensors"]
    assert select_weight_files(REPO_FILES, "text_encoder", half=False) == ["text_encoder/model.safetensors"]


def test_unreachable_hub_falls_back_to_the_cache(tiny_sd15: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Online mode without a network: the cached copy is used; an uncached repo gets a clear error."""
    _fake_cache(tiny_sd15, tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    class ConnectError(Exception):  # what httpx raises when DNS fails
        pass

    def unreachable(*args, **kwargs):
        raise ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", unreachable)
    assert Img2ImgPipeline.from_pretrained("someone/tiny-sd").model_name == "someone/tiny-sd"
    with pytest.raises(ModelNotFoundError, match="hub could not be reached"):
        Img2ImgPipeline.from_pretrained("someone/not-cached")
