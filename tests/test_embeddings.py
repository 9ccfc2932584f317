"""Textual-inversion embeddings (written here for the tiny models) against diffusers' load_textual_inversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mlx_img2img import Img2ImgPipeline
from mlx_img2img.errors import ModelFormatError
from tests.test_pipeline import assert_matches_diffusers, sketch_image
from tests.test_sdxl import diffusers_sdxl

CALL = dict(image=sketch_image(64, 64), strength=0.6, num_inference_steps=4, guidance_scale=5.0)


def _vectors(count: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed)) * 1.5


def test_automatic1111_and_diffusers_embeddings_match_diffusers(tiny_sd15: Path, tmp_path: Path) -> None:
    import diffusers

    a1111 = tmp_path / "MyStyle.safetensors"
    save_file({"emb_params": _vectors(3, 32, 1)}, str(a1111))
    single = tmp_path / "cat.safetensors"
    save_file({"<cat-toy>": _vectors(1, 32, 2)[0]}, str(single))
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(tiny_sd15, safety_checker=None,
                                                                   requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.load_textual_inversion(str(a1111), token="mystyle")
    ref.load_textual_inversion(str(single))
    ours = Img2ImgPipeline.from_pretrained(tiny_sd15)
    # Lower case: diffusers matches the token case-insensitively but puts its other vectors in only where the
    # prompt spells it as loaded; ours (and AUTOMATIC1111) always put all of them in.
    prompt = "a <cat-toy> on a sofa, in the style of mystyle"
    before = ours(prompt=prompt, **CALL, seed=0).images[0]
    assert ours.load_textual_inversion(a1111) == ["MyStyle"]  # AUTOMATIC1111 names it after the file
    assert ours.load_textual_inversion(single) == ["<cat-toy>"]
    got = assert_matches_diffusers("embeddings", ours, ref, 0, prompt=prompt, **CALL)
    assert np.abs(np.asarray(got[0], np.int16) - np.asarray(before, np.int16)).mean() > 2
    with pytest.raises(ValueError, match="already in the vocabulary"):
        ours.load_textual_inversion(single)


def test_sdxl_pair_goes_to_each_encoder_by_name(tiny_sdxl: Path, tmp_path: Path) -> None:
    """Both tiny SDXL encoders are 32 wide: the tables are told apart by clip_l/clip_g, never by width."""
    path = tmp_path / "xlstyle.safetensors"
    tables = {"clip_l": _vectors(2, 32, 3), "clip_g": _vectors(2, 32, 4)}
    save_file(tables, str(path))
    ref = diffusers_sdxl(tiny_sdxl, "euler")
    ref.load_textual_inversion(tables["clip_l"], token="xlstyle", text_encoder=ref.text_encoder,
                               tokenizer=ref.tokenizer)
    ref.load_textual_inversion(tables["clip_g"], token="xlstyle", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    ours = Img2ImgPipeline.from_pretrained(tiny_sdxl)
    ours.load_textual_inversion(path)
    assert_matches_diffusers("embeddings-sdxl", ours, ref, 1, prompt="a castle, xlstyle", **CALL)


def test_embedding_of_another_family_is_refused(tiny_sd15: Path, tmp_path: Path) -> None:
    ours = Img2ImgPipeline.from_pretrained(tiny_sd15)
    wide = tmp_path / "sd2style.safetensors"
    save_file({"emb_params": torch.zeros(2, 1024)}, str(wide))
    with pytest.raises(ModelFormatError, match="1024-wide vectors, this model's text_encoder is 32 wide"):
        ours.load_textual_inversion(wide)
    pair = tmp_path / "xl.safetensors"
    save_file({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 32)}, str(pair))
    with pytest.raises(ModelFormatError, match="is an SDXL embedding"):
        ours.load_textual_inversion(pair)


def test_low_memory_reload_keeps_loras_and_embeddings(tiny_sd15: Path, tmp_path: Path) -> None:
    """Low memory frees the text encoders after each prompt and loads them again from the source: the
    embedding rows and the LoRA deltas go back in, so both pipelines encode alike."""
    from tests.test_lora import write_kohya

    embedding = tmp_path / "mystyle.safetensors"
    save_file({"emb_params": _vectors(2, 32, 5)}, str(embedding))
    lora = write_kohya(tiny_sd15, tmp_path / "te.safetensors", {"text_encoder": "lora_te_"}, seed=8)
    pipes = [Img2ImgPipeline.from_pretrained(tiny_sd15, low_memory=low) for low in (False, True)]
    for pipe in pipes:
        pipe.load_textual_inversion(embedding)
        pipe.load_lora_weights(lora)
    for prompt in ("a mystyle house", "a mystyle boat"):  # the second one reloads the released encoders
        full, low = (np.array(p.encode_prompt(prompt, guidance_scale=1.0).context) for p in pipes)
        np.testing.assert_array_equal(full, low)
    assert pipes[1].text_encoders == []
