"""LoRA files (kohya and diffusers/PEFT, written here for the tiny models) against diffusers'
load_lora_weights + fuse_lora(lora_scale=) / set_adapters, and AUTOMATIC1111's formula where they differ."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten
from safetensors.torch import load_file, save_file

from mlx_img2img import Img2ImgPipeline
from mlx_img2img.errors import ModelFormatError
from tests.test_pipeline import assert_matches_diffusers, sketch_image
from tests.test_single_file import unet_to_original

UNET_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
               "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def _weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    (file,) = (folder / component).glob("*.safetensors")
    return load_file(file)


def _targets(folder: Path, component: str, conv: bool) -> dict[str, torch.Tensor]:
    """Layer -> torch weight for the layers a LoRA of this component patches (LoCon: resnet convolutions)."""
    names = UNET_LAYERS if component == "unet" else TEXT_LAYERS
    out = {}
    for key, value in _weights(folder, component).items():
        layer = key.removesuffix(".weight")
        if key.endswith(".weight") and (layer.endswith(names) or (conv and layer.endswith((".conv1", ".conv2"))
                                                                  and ".resnets." in layer)):
            out[layer] = value
    return out


def _pair(weight: torch.Tensor, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """down (rank, in[, kh, kw]) and up (out, rank[, 1, 1]), large enough to move the tiny model's image."""
    out_dim, in_dim = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    down = torch.randn(rank, in_dim, *kernel, generator=gen) / (in_dim * max(1, np.prod(kernel))) ** 0.5
    up = torch.randn(out_dim, rank, *([1] * len(kernel)), generator=gen) * 0.5 / rank**0.5
    return down, up


def write_kohya(folder: Path, path: Path, components: dict[str, str], seed: int, rank: int = 4,
                alpha: float = 2.0, original_unet: bool = False, conv: bool = True,
                text_layers: tuple[str, ...] = TEXT_LAYERS) -> Path:
    """kohya/AUTOMATIC1111 names: lora_unet_<layer with _>, lora_te*_<layer>, lora_down/lora_up/alpha.
    `original_unet`: the UNet named in the original layout (input_blocks_4_1_...), as kohya's SDXL LoRAs."""
    import json

    gen = torch.Generator().manual_seed(seed)
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    out = {}
    for component, prefix in components.items():
        for layer, weight in _targets(folder, component, conv and component == "unet").items():
            if component != "unet" and not layer.endswith(text_layers):
                continue
            name = layer.removeprefix("text_model.")
            name = "text_model." + name if component != "unet" else name
            if original_unet and component == "unet":
                (ldm,) = unet_to_original({name + ".weight": weight}, unet_config)
                name = ldm.removeprefix("model.diffusion_model.").removesuffix(".weight")
            down, up = _pair(weight, rank, gen)
            base = prefix + name.replace(".", "_")
            out.update({f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up,
                        f"{base}.alpha": torch.tensor(alpha)})
    save_file(out, str(path))
    return path


def write_peft(folder: Path, path: Path, components: tuple[str, ...], seed: int, rank: int = 4) -> Path:
    """diffusers/PEFT names: <component>.<layer>.lora_A.weight / lora_B.weight, no alphas (alpha = rank)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for component in components:
        for layer, weight in _targets(folder, component, conv=False).items():
            down, up = _pair(weight, rank, gen)
            if component != "unet" and not layer.startswith("text_model."):
                layer = "text_model." + layer
            out.update({f"{component}.{layer}.lora_A.weight": down, f"{component}.{layer}.lora_B.weight": up})
    save_file(out, str(path))
    return path


def diffusers_sd(folder: Path):
    import diffusers

    pipe = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None,
                                                                    requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CALL = dict(prompt="a watercolour fox in the snow", image=sketch_image(64, 64), strength=0.5,
            num_inference_steps=4, guidance_scale=5.0)


def _parameters(pipe: Img2ImgPipeline) -> dict[str, np.ndarray]:
    modules = {"unet": pipe.unet, **{f"te{i}": e for i, e in enumerate(pipe.text_encoders)}}
    return {f"{c}.{k}": np.array(v) for c, m in modules.items() for k, v in tree_flatten(m.parameters())}


def test_kohya_lora_with_locon_matches_diffusers_fuse_lora(tiny_sd15: Path, tmp_path: Path) -> None:
    scale = 1.4
    path = write_kohya(tiny_sd15, tmp_path / "style.safetensors", {"unet": "lora_unet_", "text_encoder": "lora_te_"},
                       seed=1)
    ref = diffusers_sd(tiny_sd15)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=scale)
    ours = Img2ImgPipeline.from_pretrained(tiny_sd15)
    base = ours(**CALL, seed=0).images[0]
    assert ours.load_lora_weights(path, scale=scale) == "style"
    got = assert_matches_diffusers("lora-kohya", ours, ref, 0, **CALL)
    assert np.abs(np.asarray(got[0], np.int16) - np.asarray(base, np.int16)).mean() > 3  # the LoRA matters


def test_two_loras_with_their_scales_then_unload_gives_the_base_back(tiny_sd15: Path, tmp_path: Path) -> None:
    kohya = write_kohya(tiny_sd15, tmp_path / "a.safetensors", {"unet": "lora_unet_", "text_encoder": "lora_te_"},
                        seed=2, conv=False)
    peft = write_peft(tiny_sd15, tmp_path / "b.safetensors", ("unet", "text_encoder"), seed=3)
    ref = diffusers_sd(tiny_sd15)
    ref.load_lora_weights(str(kohya), adapter_name="a")
    ref.load_lora_weights(str(peft), adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.7, 1.3])
    ours = Img2ImgPipeline.from_pretrained(tiny_sd15)
    before = _parameters(ours)
    ours.load_lora_weights(kohya, scale=0.7)
    ours.load_lora_weights(peft, scale=1.3, adapter_name="b")
    assert ours.loras.names() == ["a", "b"]
    assert_matches_diffusers("lora-two", ours, ref, 1, **CALL)
    ours.unload_lora_weights("a")
    ours.unload_lora_weights()
    after = _parameters(ours)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_sdxl_kohya_lora_in_the_original_layout_matches_diffusers(tiny_sdxl: Path, tmp_path: Path) -> None:
    import diffusers

    path = write_kohya(tiny_sdxl, tmp_path / "xl.safetensors",
                       {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
                       seed=4, original_unet=True, conv=False)
    ref = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(tiny_sdxl)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(path))
    ref.fuse_lora(lora_scale=0.8)
    ours = Img2ImgPipeline.from_pretrained(tiny_sdxl)
    ours.load_lora_weights(path, scale=0.8)
    assert_matches_diffusers("lora-sdxl", ours, ref, 2, **CALL)


def test_text_encoder_pairs_without_out_proj_follow_automatic1111(tiny_sd15: Path, tmp_path: Path) -> None:
    """diffusers drops q/k/v pairs of a kohya text-encoder LoRA that has no out_proj pair; AUTOMATIC1111
    applies every pair: W + scale * alpha / rank * up @ down."""
    path = write_kohya(tiny_sd15, tmp_path / "qk.safetensors", {"text_encoder": "lora_te_"}, seed=5, rank=2,
                       alpha=3.0, text_layers=("self_attn.q_proj", "self_attn.k_proj"))
    pairs = load_file(path)
    ours = Img2ImgPipeline.from_pretrained(tiny_sd15)
    ours.load_lora_weights(path, scale=0.5)
    base = _weights(tiny_sd15, "text_encoder")
    for layer in ("q_proj", "k_proj"):
        stem = f"lora_te_text_model_encoder_layers_1_self_attn_{layer}"
        key = f"text_model.encoder.layers.1.self_attn.{layer}.weight"
        weight = base.get(key, base.get(key.removeprefix("text_model.")))
        expected = weight + 0.5 * 3.0 / 2 * pairs[f"{stem}.lora_up.weight"] @ pairs[f"{stem}.lora_down.weight"]
        got = getattr(ours.text_encoders[0].text_model.encoder.layers[1].self_attn, layer).weight
        np.testing.assert_allclose(np.array(got), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_lora_for_another_family_is_refused_naming_keys(tiny_sd15: Path, tiny_sdxl: Path, tmp_path: Path) -> None:
    path = write_kohya(tiny_sdxl, tmp_path / "xl.safetensors", {"unet": "lora_unet_"}, seed=6,
                       original_unet=True, conv=False)
    ours = Img2ImgPipeline.from_pretrained(tiny_sd15)
    before = _parameters(ours)
    with pytest.raises(ModelFormatError, match=r"xl.safetensors does not fit this model.*another model family"):
        ours.load_lora_weights(path)
    assert all(np.array_equal(before[k], v) for k, v in _parameters(ours).items())  # nothing half-merged
    with pytest.raises(ModelFormatError, match="is not a LoRA file"):
        ours.load_lora_weights(_not_a_lora(tmp_path))


def _not_a_lora(tmp_path: Path) -> Path:
    path = tmp_path / "other.safetensors"
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(1)}, str(path))
    return path


def test_lora_on_a_quantized_pipeline(tiny_sd15: Path, tmp_path: Path) -> None:
    """A quantized layer is dequantized, patched and quantized again; unloading restores it exactly."""
    path = write_kohya(tiny_sd15, tmp_path / "q.safetensors", {"unet": "lora_unet_"}, seed=7, conv=False)
    ours = Img2ImgPipeline.from_pretrained(tiny_sd15, quantize=8)
    before = _parameters(ours)
    ours.load_lora_weights(path)
    changed = [k for k, v in _parameters(ours).items() if not np.array_equal(before[k], v)]
    assert any("to_q.weight" in k for k in changed) and any("to_q.scales" in k for k in changed)
    ours.unload_lora_weights()
    assert all(np.array_equal(before[k], v) for k, v in _parameters(ours).items())


def test_merge_at_load_matches_merging_after_and_quantizes_closer(tiny_sd15: Path, tmp_path: Path) -> None:
    """The chain's LoRA slot merges before quantization: the same weights as load_lora_weights in float,
    and with 8 bits closer to the float merge than patching already quantized layers."""
    from mlx_img2img.loading import open_source
    from mlx_img2img.loading.lora import merge_at_load

    path = write_kohya(tiny_sd15, tmp_path / "m.safetensors", {"unet": "lora_unet_", "text_encoder": "lora_te_"},
                       seed=9, conv=False)

    def load(quantize: int | None, at_load: bool) -> Img2ImgPipeline:
        patches = [merge_at_load([(path, 0.8)])] if at_load else []
        pipe = Img2ImgPipeline.from_source(open_source(tiny_sd15), quantize=quantize, patches=patches)
        if not at_load:
            pipe.load_lora_weights(path, scale=0.8)
        return pipe

    exact = _parameters(load(None, False))
    np.testing.assert_allclose(np.stack([exact[k].ravel()[:4] for k in exact if k.endswith("to_q.weight")]),
                               np.stack([v.ravel()[:4] for k, v in _parameters(load(None, True)).items()
                                         if k.endswith("to_q.weight")]), rtol=1e-6, atol=1e-7)
    errors = {}
    for at_load in (True, False):
        pipe = load(8, at_load)
        layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
        w = np.array(mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits))
        want = exact["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
        errors[at_load] = float(np.abs(w - want).mean())
    assert errors[True] < errors[False]


def test_loras_loaded_together_are_one_product_per_layer(tiny_sd15: Path, tmp_path: Path) -> None:
    """LoRAs loaded before the weights are next used are merged from the base weights in one product per
    layer (LoCon convolutions too); one loaded after that is added to the merged weights: the same weights
    within float32 rounding. Encoding a prompt computes what is pending."""
    a = write_kohya(tiny_sd15, tmp_path / "a.safetensors", {"unet": "lora_unet_", "text_encoder": "lora_te_"}, seed=10)
    b = write_peft(tiny_sd15, tmp_path / "b.safetensors", ("unet", "text_encoder"), seed=11)
    pipe = Img2ImgPipeline.from_pretrained(tiny_sd15)
    base = _parameters(pipe)
    pipe.load_lora_weights(a, scale=0.7)
    pipe.load_lora_weights(b, scale=1.3)
    assert pipe.loras.pending
    pipe.loras.flush()
    assert not pipe.loras.pending
    together = _parameters(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(a, scale=0.7)
    pipe.encode_prompt("a fox")
    assert not pipe.loras.pending
    pipe.load_lora_weights(b, scale=1.3)
    apart = _parameters(pipe)
    changed = [k for k in base if not np.array_equal(base[k], together[k])]
    assert any("resnets.0.conv1.weight" in k for k in changed) and any("to_q.weight" in k for k in changed)
    for key in changed:
        np.testing.assert_allclose(apart[key], together[key], rtol=1e-5, atol=1e-6, err_msg=key)
