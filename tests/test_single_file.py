"""Single-file checkpoints: tiny diffusers models written back in the original LDM layout (by an
independent diffusers -> original converter below), then loaded by us and by diffusers' from_single_file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mlx_img2img import Img2ImgPipeline
from mlx_img2img.errors import ModelFormatError
from mlx_img2img.loading.single_file import SingleFileSource, detect_family, read_safetensors
from tests.test_pipeline import assert_matches_diffusers, sketch_image

# ---------------------------------------------------------------------------------------------- diffusers -> LDM

UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
RESNET_PARTS = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _component(folder: Path, name: str) -> dict[str, torch.Tensor]:
    (file,) = (folder / name).glob("*.safetensors")
    return load_file(file)


def _resnet_tail(tail: str) -> str:
    head, _, rest = tail.partition(".")
    return f"{RESNET_PARTS[head]}.{rest}"


def unet_to_original(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    per = config["layers_per_block"] + 1  # input blocks per level: the resnets, then a downsampler
    attention_up = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    out = {}
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        if module in UNET_TOP:
            name = UNET_TOP[module] + "." + param
        elif m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            name = f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.0.{_resnet_tail(m[3])}"
        elif m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            name = f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            name = f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
        elif m := re.match(r"mid_block\.resnets\.(\d)\.(.+)", key):
            name = f"middle_block.{2 * int(m[1])}.{_resnet_tail(m[2])}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            name = f"middle_block.1.{m[1]}"
        elif m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            name = f"output_blocks.{int(m[1]) * (per) + int(m[2])}.0.{_resnet_tail(m[3])}"
        elif m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
            name = f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            b = int(m[1])
            name = f"output_blocks.{b * per + per - 1}.{2 if attention_up[b] else 1}.conv.{m[2]}"
        else:
            raise AssertionError(f"unmapped UNet key {key}")
        out["model.diffusion_model." + name] = value
    return out


def vae_to_original(sd: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    levels = len(config["block_out_channels"])
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for key, value in sd.items():
        name = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        if m := re.match(r"encoder\.down_blocks\.(\d+)\.(.+)", name):
            name = f"encoder.down.{m[1]}." + m[2].replace("resnets.", "block.").replace("downsamplers.0", "downsample")
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.(.+)", name):
            name = f"decoder.up.{levels - 1 - int(m[1])}." + m[2].replace("resnets.", "block.").replace(
                "upsamplers.0", "upsample")
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", name):
            name = f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", name):
            name = f"{m[1]}.mid.attn_1.{attention[m[2]]}.{m[3]}"
            if value.ndim == 2:  # the original attention is made of 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + name] = value
    return out


def clip_to_original(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in sd.items()}


def open_clip_to_original(sd: dict[str, torch.Tensor], prefix: str, extra_layer: bool) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    width = sd["embeddings.token_embedding.weight"].shape[1]
    out = {"token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": sd.pop("final_layer_norm.weight"), "ln_final.bias": sd.pop("final_layer_norm.bias"),
           "logit_scale": torch.tensor(4.6)}
    gen = torch.Generator().manual_seed(5)
    projection = sd.pop("text_projection.weight", None)
    # SD 2.x files carry OpenCLIP's projection although diffusers' CLIPTextModel has none.
    out["text_projection"] = (projection.T.contiguous() if projection is not None
                              else torch.randn(width, width, generator=gen))
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        p = f"encoder.layers.{i}."
        r = f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[r + f"attn.in_proj_{kind}"] = torch.cat([sd.pop(p + f"self_attn.{n}_proj.{kind}") for n in "qkv"])
            for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                 ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                out[r + f"{theirs}.{kind}"] = sd.pop(p + f"{ours}.{kind}")
    if extra_layer:  # as in real SD 2.x files: one more layer than the model uses
        last = f"transformer.resblocks.{layers[-1]}."
        for key in [k for k in out if k.startswith(last)]:
            out[key.replace(last, f"transformer.resblocks.{layers[-1] + 1}.")] = torch.randn(
                out[key].shape, generator=gen)
    assert not sd, f"unmapped OpenCLIP keys {sorted(sd)[:3]}"
    return {prefix + k: v for k, v in out.items()}


TEXT_PREFIXES = {  # (diffusers folder, original prefix, OpenCLIP layout) per tiny model
    "sd15": [("text_encoder", "cond_stage_model.transformer.", False)],
    "sd2v": [("text_encoder", "cond_stage_model.model.", True)],
    "sdxl": [("text_encoder", "conditioner.embedders.0.transformer.", False),
             ("text_encoder_2", "conditioner.embedders.1.model.", True)],
    "sdxl_refiner": [("text_encoder_2", "conditioner.embedders.0.model.", True)],
}


def write_single_file(folder: Path, variant: str, path: Path, dtype: torch.dtype = torch.float32,
                      parts: tuple[str, ...] = ("unet", "vae", "text")) -> Path:
    """The tiny diffusers model of `folder` as one original-layout file, with an EMA leftover."""
    out = {}
    if "unet" in parts:
        out.update(unet_to_original(_component(folder, "unet"), json.loads((folder / "unet/config.json").read_text())))
    if "vae" in parts:
        out.update(vae_to_original(_component(folder, "vae"), json.loads((folder / "vae/config.json").read_text())))
    if "text" in parts:
        for name, prefix, open_clip in TEXT_PREFIXES[variant]:
            sd = _component(folder, name)
            out.update(open_clip_to_original(sd, prefix, extra_layer=variant == "sd2v") if open_clip
                       else clip_to_original(sd, prefix))
    out["model_ema.decay"] = torch.tensor(0.9999)
    out["model_ema.diffusion_modelconv_inweight"] = torch.zeros(3)
    out["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    save_file({k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}, str(path))
    return path


VARIANTS = {"sd15": "tiny_sd15", "sd2v": "tiny_sd2v", "sdxl": "tiny_sdxl", "sdxl_refiner": "tiny_sdxl_refiner"}
FAMILIES = {"sd15": "sd1", "sd2v": "sd2", "sdxl": "sdxl", "sdxl_refiner": "sdxl-refiner"}


@pytest.fixture(scope="module")
def single_files(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """variant -> (diffusers folder, single file), written once per module."""
    made = {}

    def get(variant: str) -> tuple[Path, Path]:
        if variant not in made:
            folder = request.getfixturevalue(VARIANTS[variant])
            path = tmp_path_factory.mktemp("single") / f"{variant}.safetensors"
            made[variant] = folder, write_single_file(folder, variant, path)
        return made[variant]

    return get


def _folder_tensors(folder: Path, component: str) -> dict[str, np.ndarray]:
    sd = _component(folder, component)
    if component.startswith("text_encoder"):
        sd = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in sd.items()}
    return {k: v.float().numpy() for k, v in sd.items() if not k.endswith("position_ids")}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_conversion_gives_the_folder_tensors_exactly(variant: str, single_files) -> None:
    folder, path = single_files(variant)
    with pytest.warns(UserWarning, match=r"ignored 1 weight no component uses: model_ema"):
        source = SingleFileSource(path, config=folder)
        components = [c for c in ("unet", "vae", "text_encoder", "text_encoder_2") if source.has(c)]
        got = {c: source.tensors(c, mx.float32) for c in components}
    assert source.family == FAMILIES[variant]
    for component in components:
        expected = _folder_tensors(folder, component)
        converted = got[component]
        assert set(converted) == set(expected), component
        for key, value in expected.items():
            np.testing.assert_array_equal(np.asarray(converted[key]).reshape(value.shape), value, err_msg=key)
            assert converted[key].shape == value.shape, key


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_family_is_detected_from_the_keys(variant: str, single_files) -> None:
    _, path = single_files(variant)
    assert detect_family(read_safetensors(path)) == FAMILIES[variant]


def test_half_precision_file_and_missing_parts(tiny_sd15: Path, tmp_path: Path) -> None:
    half = write_single_file(tiny_sd15, "sd15", tmp_path / "half.safetensors", dtype=torch.float16)
    with pytest.warns(UserWarning, match="ignored"):
        unet = SingleFileSource(half, config=tiny_sd15).tensors("unet", mx.float32)
    expected = _folder_tensors(tiny_sd15, "unet")
    key = "down_blocks.0.attentions.0.proj_in.weight"
    np.testing.assert_array_equal(np.asarray(unet[key]), expected[key].astype(np.float16).astype(np.float32))

    no_vae = write_single_file(tiny_sd15, "sd15", tmp_path / "no_vae.safetensors", parts=("unet", "text"))
    source = SingleFileSource(no_vae)
    assert source.family == "sd1"
    with pytest.raises(ModelFormatError, match=r"no VAE weights \(first_stage_model\.\*\) \(pass vae="):
        source.tensors("vae", mx.float32)
    # A config folder with weights fills in what the file lacks.
    vae = SingleFileSource(no_vae, config=tiny_sd15).tensors("vae", mx.float32)
    assert set(vae) == set(_folder_tensors(tiny_sd15, "vae"))


def test_refusals_say_why(tmp_path: Path) -> None:
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x02")
    with pytest.raises(ModelFormatError, match="pickles, which can run arbitrary code"):
        SingleFileSource(pickle)
    other = tmp_path / "other.safetensors"
    save_file({"transformer.h.0.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ModelFormatError, match=r"not a Stable Diffusion .* cond_stage_model\.model\.\*"):
        SingleFileSource(other)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(other.read_bytes()[:-4])
    with pytest.raises(ModelFormatError, match="truncated"):
        SingleFileSource(truncated)


def diffusers_from_single_file(path: Path, folder: Path, variant: str):
    import diffusers
    from transformers import CLIPTextModelWithProjection

    if variant.startswith("sdxl"):
        extra = {}
        if variant == "sdxl":
            # diffusers picks SDXL's second encoder by width; both tiny encoders are 32 wide, so it would load
            # the first one in its place. Its second encoder comes from the folder the file was made from.
            extra["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline.from_single_file(
            str(path), config=str(folder), local_files_only=True, **extra)
    else:
        pipe = diffusers.StableDiffusionImg2ImgPipeline.from_single_file(
            str(path), config=str(folder), local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_single_file_images_match_diffusers_from_single_file(variant: str, single_files) -> None:
    folder, path = single_files(variant)
    ref = diffusers_from_single_file(path, folder, variant)
    with pytest.warns(UserWarning, match="ignored"):
        ours = Img2ImgPipeline.from_single_file(path, config=folder)
    assert ours.model_name == variant
    assert_matches_diffusers(variant, ours, ref, 3, prompt="a lighthouse at dawn, oil painting",
                             image=sketch_image(64, 64), strength=0.7, num_inference_steps=5, guidance_scale=5.0,
                             negative_prompt="blurry")


# ---------------------------------------------------------------------------------------------- vae=

@pytest.fixture(scope="module")
def other_vae(tiny_sd15: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Another VAE for the tiny SD 1.5 model (same architecture, other weights): as a diffusers folder and
    as one original-layout file, the way AUTOMATIC1111 keeps VAEs (no first_stage_model. prefix)."""
    import diffusers

    from tests.tiny_models import _scale_weights

    root = tmp_path_factory.mktemp("vae")
    vae = diffusers.AutoencoderKL.from_pretrained(tiny_sd15 / "vae")
    _scale_weights(vae, 1.2, seed=77)
    vae.save_pretrained(root / "folder", safe_serialization=True)
    original = vae_to_original(vae.state_dict(), vae.config)
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in original.items()},
              str(root / "ft.safetensors"))
    return root / "folder", root / "ft.safetensors"


@pytest.mark.parametrize("form", ["file", "folder"])
def test_vae_from_elsewhere_matches_diffusers(form: str, tiny_sd15: Path, other_vae: tuple[Path, Path]) -> None:
    import diffusers

    folder, file = other_vae
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        tiny_sd15, vae=diffusers.AutoencoderKL.from_pretrained(folder), safety_checker=None,
        requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ours = Img2ImgPipeline.from_pretrained(tiny_sd15, vae=file if form == "file" else folder)
    assert_matches_diffusers(f"vae-{form}", ours, ref, 4, prompt="a red barn", image=sketch_image(64, 64),
                             strength=0.6, num_inference_steps=4, guidance_scale=5.0)


def test_vae_of_another_family_is_refused(tiny_sd15: Path, tmp_path: Path) -> None:
    from mlx_img2img.loading import open_source
    from mlx_img2img.loading.vae_file import WithVAE

    path = tmp_path / "sd3_vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(32, 16, 3, 3)}, str(path))
    with pytest.raises(ModelFormatError, match="another model family .16 latent channels"):
        WithVAE(open_source(tiny_sd15), path)
    with pytest.raises(ModelFormatError, match="pickles"):
        Img2ImgPipeline.from_pretrained(tiny_sd15, vae=tmp_path / "vae.pt")
    with pytest.raises(ValueError, match="for single-file checkpoints"):
        Img2ImgPipeline.from_pretrained(tiny_sd15, config=tiny_sd15)


def test_cli_vae_is_used_stored_and_not_reloaded_by_from(tiny_sd15: Path, other_vae: tuple[Path, Path],
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from mlx_img2img import images
    from tests.test_cli import cli

    monkeypatch.chdir(tmp_path)
    sketch_image(64, 64).save("in.png")
    args = ["run", "in.png", "-m", tiny_sd15, "--steps", 4, "--dtype", "float32", "-p", "a barn", "--seed", 3]
    _, file = other_vae
    with_vae = cli(*args, "--vae", file, "-o", "vae.png")
    assert with_vae.exit_code == 0, with_vae.output
    assert cli(*args, "-o", "own.png").exit_code == 0
    a, b = (np.asarray(Image.open(name), np.int16) for name in ("vae.png", "own.png"))
    assert np.abs(a - b).mean() > 3
    text, settings = images.read_metadata(Path("vae.png"))
    assert settings["vae"] == str(file) and "VAE: ft.safetensors" in text
    rerun = cli("run", "in.png", "--from", "vae.png", "-m", tiny_sd15, "-o", "again.png")
    assert rerun.exit_code == 0, rerun.output
    assert "not loading the vae" in rerun.output


# ---------------------------------------------------------------------------------------------- SD 2.x prediction type

def torch_probe(folder: Path, shift: float = 0.0) -> float:
    """AUTOMATIC1111's SD 2.x test (modules/sd_models_config.py) run by diffusers' UNet: mean(unet(x) - x) at
    t=999 for x = 0.5 (1x4x8x8) and a two-token context of 0.5; below -1 means v-prediction. `shift` is added
    to conv_out's bias, which moves that mean by exactly `shift`."""
    import diffusers

    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    with torch.no_grad():
        unet.conv_out.bias += shift
        x = torch.full((1, 4, 8, 8), 0.5)
        context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5)
        return float((unet(x, torch.tensor([999]), encoder_hidden_states=context).sample - x).mean())


@pytest.fixture
def shipped_tiny_sd2(tiny_sd2v: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped configs with the tiny SD 2.x model's in place of the real SD 2.x ones, so that a tiny file
    loads without config=, as a real one does (the only case where the prediction type is detected)."""
    from mlx_img2img.loading import single_file

    spec = {name: json.loads((tiny_sd2v / name / "config.json").read_text())
            for name in ("unet", "vae", "text_encoder")}
    spec["scheduler"] = json.loads((tiny_sd2v / "scheduler" / "scheduler_config.json").read_text())
    spec["tokenizer"] = {"pad_token": json.loads((tiny_sd2v / "tokenizer" / "tokenizer_config.json").read_text())
                         ["pad_token"]}
    spec["pipeline"] = json.loads((tiny_sd2v / "model_index.json").read_text())
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "sd2.json").write_text(json.dumps(spec))
    (configs / "clip").symlink_to(single_file.CONFIGS / "clip")
    monkeypatch.setattr(single_file, "CONFIGS", configs)


def _answering(path: Path, folder: Path, answer: str, out: Path) -> Path:
    """The single file with conv_out's bias moved so that AUTOMATIC1111's probe gives -3 (v-prediction) or 0."""
    shift = (-3.0 if answer == "v_prediction" else 0.0) - torch_probe(folder)
    tensors = load_file(path)
    tensors["model.diffusion_model.out.2.bias"] += shift
    save_file(tensors, str(out))
    return out


@pytest.mark.parametrize("answer", ["v_prediction", "epsilon"])
def test_sd2_prediction_type_is_detected_from_the_unet(answer: str, single_files, shipped_tiny_sd2,
                                                       tmp_path: Path) -> None:
    from mlx_img2img.loading.single_file import unet_probe

    folder, path = single_files("sd2v")
    file = _answering(path, folder, answer, tmp_path / f"{answer}.safetensors")
    pixels = "768" if answer == "v_prediction" else "512"
    with pytest.warns(UserWarning, match=f"an SD 2.x checkpoint, loaded as a {pixels}-pixel"):
        pipe = Img2ImgPipeline.from_single_file(file)
    assert pipe.scheduler_config["prediction_type"] == answer
    expected = -3.0 if answer == "v_prediction" else 0.0
    assert abs(unet_probe(pipe.unet) - expected) < 1e-3  # the probe as diffusers' UNet computes it
    other = {"epsilon": "v_prediction", "v_prediction": "epsilon"}[answer]
    source = SingleFileSource(file, prediction_type=other)  # given: the UNet is not asked
    with pytest.warns(UserWarning, match="ignored") as caught:
        given = Img2ImgPipeline.from_source(source)
    assert not [w for w in caught if "AUTOMATIC1111" in str(w.message)]
    assert given.scheduler_config["prediction_type"] == other
    assert source.config("unet")["sample_size"] == {"epsilon": 64, "v_prediction": 96}[other]


def test_sd2_epsilon_images_match_diffusers_with_that_prediction_type(single_files) -> None:
    """The tiny SD 2.x folder is a v-prediction model; prediction_type="epsilon" overrides it, as a scheduler
    made with that prediction type does in diffusers."""
    folder, path = single_files("sd2v")
    ref = diffusers_from_single_file(path, folder, "sd2v")
    assert ref.scheduler.config.prediction_type == "v_prediction"
    ref.scheduler = type(ref.scheduler).from_config(ref.scheduler.config, prediction_type="epsilon")
    with pytest.warns(UserWarning, match="ignored"):
        ours = Img2ImgPipeline.from_single_file(path, config=folder, prediction_type="epsilon")
    assert ours.scheduler_config["prediction_type"] == "epsilon"
    assert_matches_diffusers("sd2-epsilon", ours, ref, 3, prompt="a lighthouse at dawn, oil painting",
                             image=sketch_image(64, 64), strength=0.7, num_inference_steps=5, guidance_scale=5.0)


def test_cli_prediction_type_overrides_the_detection(single_files, shipped_tiny_sd2, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_cli import cli

    folder, path = single_files("sd2v")
    file = _answering(path, folder, "v_prediction", tmp_path / "sd21.safetensors")
    monkeypatch.chdir(tmp_path)
    sketch_image(64, 64).save("in.png")
    args = ["run", "in.png", "-m", file, "--steps", 2, "--dtype", "float32", "-p", "a barn", "--seed", 3]
    detected = cli(*args, "-o", "detected.png")  # the file answers as a v-prediction model
    assert detected.exit_code == 0, detected.output
    assert "loaded as a 768-pixel v-prediction model" in detected.output
    given = cli(*args, "--prediction-type", "epsilon", "-o", "given.png")
    assert given.exit_code == 0, given.output
    assert "AUTOMATIC1111's test" not in given.output
    again = cli("run", "in.png", "--from", "given.png", "-m", file, "-o", "again.png")  # its prediction type re-used
    assert again.exit_code == 0 and "AUTOMATIC1111's test" not in again.output, again.output
    assert np.array_equal(np.asarray(Image.open("again.png")), np.asarray(Image.open("given.png")))
    bad = cli(*args, "--prediction-type", "eps", "-o", "bad.png")
    assert bad.exit_code != 0 and "'--prediction-type': 'eps' is not one of 'epsilon', 'v_prediction'" in bad.output
