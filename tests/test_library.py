"""The models folder (AUTOMATIC1111's and ComfyUI's layouts, families from headers only), -m NAME, and LoRAs and
embeddings from the command line (--lora, <lora:NAME:WEIGHT>, --embedding, the folders): the same images as
the Python API's load_lora_weights / load_textual_inversion (themselves checked against diffusers), re-run by
--from, with AUTOMATIC1111's hashes (recomputed here from its definition)."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from mlx_img2img import Img2ImgPipeline, images
from mlx_img2img import library as lib
from mlx_img2img.generation import ModelInfo, plan_extras
from mlx_img2img.request import Request
from tests.test_cli import assert_one_line_error, cli, pixels, stored
from tests.test_lora import write_kohya


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLX_IMG2IMG_MODEL", raising=False)
    monkeypatch.setenv(lib.ENV_VAR, str(tmp_path / "no-models-folder"))
    return tmp_path


def _header_only(path: Path, shapes: dict[str, tuple[int, ...]], metadata: dict | None = None) -> Path:
    """A safetensors file with these (float16, zero) tensors, written with the safetensors library."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_numpy({k: np.zeros(s, np.float16) for k, s in shapes.items()}, str(path), metadata=metadata)
    return path


SD1_CHECKPOINT = {"model.diffusion_model.input_blocks.0.0.weight": (8, 9, 3, 3),
                  "cond_stage_model.transformer.text_model.final_layer_norm.weight": (8,)}
SDXL_CHECKPOINT = {"model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
                   "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (8,),
                   "conditioner.embedders.1.model.ln_final.weight": (8,)}
SDXL_LORA = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": (4, 2048),
             "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": (640, 4)}
SD2_LORA = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, 1024),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": (1024, 4)}


def _a1111_and_comfyui(root: Path) -> tuple[Path, Path]:
    a1111, comfy = root / "stable-diffusion-webui", root / "ComfyUI" / "models"
    _header_only(a1111 / "models" / "Stable-diffusion" / "sd15" / "dream-inpainting.safetensors", SD1_CHECKPOINT)
    _header_only(a1111 / "models" / "VAE" / "vae-ft-mse.safetensors", {"decoder.conv_in.weight": (8, 4, 3, 3)})
    _header_only(a1111 / "models" / "Lora" / "xl-detail.safetensors", SDXL_LORA, {"ss_output_name": "detail"})
    _header_only(a1111 / "embeddings" / "EasyNegative.safetensors", {"emb_params": (8, 768)})
    _header_only(a1111 / "models" / "ControlNet" / "control_v11p_sd15_canny.safetensors",
                 {"control_model.input_hint_block.0.weight": (16, 3, 3, 3),
                  "control_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)})
    _header_only(comfy / "controlnet" / "xl-canny.safetensors",
                 {"controlnet_cond_embedding.conv_in.weight": (16, 3, 3, 3),
                  "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": (640, 2048)})
    (a1111 / "models" / "Lora" / "old.ckpt").write_bytes(b"pickle")  # not listed: only .safetensors
    _header_only(comfy / "checkpoints" / "juggernaut-xl.safetensors", SDXL_CHECKPOINT)
    _header_only(comfy / "loras" / "sd2-style.safetensors", SD2_LORA)
    _header_only(comfy / "embeddings" / "xl-neg.safetensors", {"clip_l": (2, 768), "clip_g": (2, 1280)})
    for name, config in (("sd15-depth", {"_class_name": "ControlNetModel", "cross_attention_dim": 768}),
                         ("not-a-net", {"_class_name": "AutoencoderKL"})):  # diffusers folders
        _header_only(comfy / "controlnet" / name / "diffusion_pytorch_model.safetensors", {"w": (1,)})
        (comfy / "controlnet" / name / "config.json").write_text(json.dumps(config))
    broken = _header_only(comfy / "loras" / "half.safetensors", SD2_LORA)
    broken.write_bytes(broken.read_bytes()[:-100])
    # a 3 GB tensor in a sparse file: listing it must not read it
    big = _header_only(comfy / "checkpoints" / "huge.safetensors", {**SDXL_CHECKPOINT})
    header = big.read_bytes()
    (length,) = struct.unpack("<Q", header[:8])
    entries = json.loads(header[8:8 + length])
    entries["model.diffusion_model.big"] = {"dtype": "F16", "shape": [1536, 2**20], "data_offsets": [0, 3 * 2**30]}
    text = json.dumps(entries).encode()
    with open(big, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + 3 * 2**30)
    return a1111, comfy


def test_models_lists_a1111_and_comfyui_folders_with_families_from_headers(tmp_path: Path) -> None:
    import time

    a1111, comfy = _a1111_and_comfyui(tmp_path)
    start = time.perf_counter()

    def listing(folder: Path, expected: list[tuple[str, str]]) -> str:
        result = cli("models", "--models-dir", folder)
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        for name, family in expected:
            assert any(name in ln and family in ln for ln in lines), (name, family, result.output)
        return result.output

    output = listing(a1111, [("dream-inpainting", "SD 1.x, inpainting"),
                             ("vae-ft-mse", "SD 1.x/2.x/SDXL, 4 latent channels"),
                             ("xl-detail", "SDXL base, text width 2048"), ("EasyNegative", "SD 1.x, 8 x 768"),
                             ("control_v11p_sd15_canny", "SD 1.x, text width 768")])
    assert "ControlNets (--controlnet NAME): 1" in output
    assert "old.ckpt" not in output and "Presets" in output  # the presets are still listed
    listing(comfy, [("juggernaut-xl", "SDXL base"), ("huge", "SDXL base"), ("sd2-style", "SD 2.x, text width 1024"),
                    ("half", "problem: half.safetensors is truncated"), ("xl-neg", "SDXL base"),
                    ("xl-canny", "SDXL base, text width 2048"), ("sd15-depth", "SD 1.x, diffusers folder"),
                    ("not-a-net", "problem: not a ControlNetModel folder (its config says AutoencoderKL)")])
    assert time.perf_counter() - start < 5  # the 3 GB file's tensor was never read
    folder = lib.ModelsFolder(a1111)
    assert folder.find("lora", "xl-detail").alias == "detail"  # AUTOMATIC1111's alias (ss_output_name)
    assert folder.find("lora", "detail").name == "xl-detail"  # found by it too, as AUTOMATIC1111 does
    assert folder.resolve_controlnet("control_v11p_sd15_canny").endswith("control_v11p_sd15_canny.safetensors")
    assert folder.resolve_controlnet("canny") == "canny"  # a preset stays one
    with pytest.raises(lib.ModelsFolderError, match="no such ControlNet .*: 'cany' .*near names: canny"):
        folder.resolve_controlnet("cany")


def test_family_mismatch_truncated_pickle_and_unknown_names_are_one_line_errors(tmp_path: Path) -> None:
    a1111, comfy = _a1111_and_comfyui(tmp_path)
    sd15 = ModelInfo("dream", {}, False, (4, 0.18215), 768)

    def plan(folder: Path, prompt: str, **values: object) -> None:
        request = Request.from_values({"prompt": prompt, **values})
        plan_extras(prompt, request.negative_prompt, request, lib.ModelsFolder(folder), sd15)

    with pytest.raises(lib.ModelsFolderError, match=r"<lora:xl-detail>: xl-detail.safetensors is for SDXL base "
                       r"models \(text width 2048: lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"):
        plan(a1111, "a fox <lora:xl-detail:0.5>")
    with pytest.raises(lib.ModelsFolderError, match=r"<lora:xl-detal>: no lora named 'xl-detal' in .*Lora.*near "
                       "names: xl-detail"):
        plan(a1111, "a fox <lora:xl-detal>")
    with pytest.raises(lib.ModelsFolderError, match="half.safetensors is truncated"):
        plan(comfy, "a fox <lora:half>")
    with pytest.raises(lib.ModelsFolderError, match=r"\.ckpt checkpoints are Python pickles"):
        plan(comfy, "a fox", lora=[str(a1111 / "models" / "Lora" / "old.ckpt")])
    with pytest.raises(lib.ModelsFolderError, match="a prompt names a LoRA by name"):
        plan(comfy, "a fox <lora:/etc/passwd:1>")
    with pytest.raises(lib.ModelsFolderError, match="the embedding 'xl-neg': xl-neg.safetensors is for SDXL base"):
        plan(comfy, "a fox", negative_prompt="xl-neg")
    with pytest.raises(lib.ModelsFolderError, match="separate text-encoder and UNet weights are not supported"):
        plan(comfy, "a fox <lora:sd2-style:0.5:1>")
    # the folder's embeddings are used only where their name is a word of a prompt
    request = Request.from_values({"prompt": "a fox, easynegative"})
    extras = plan_extras(request.prompt, None, request, lib.ModelsFolder(a1111), sd15)
    assert [e.name for e in extras.embeddings] == ["EasyNegative"]
    assert not plan_extras("a fox, easynegatives", None, request, lib.ModelsFolder(a1111), sd15).embeddings
    # an embedding named like a CLIP word cannot have its own vectors: the folder's is left out, a flag's refused
    word = _header_only(a1111 / "embeddings" / "cat.safetensors", {"emb_params": (1, 768)})
    with pytest.warns(UserWarning, match="'cat' .* is named like a word of CLIP's vocabulary"):
        assert not plan_extras("a cat", None, request, lib.ModelsFolder(a1111), sd15).embeddings
    with pytest.raises(lib.ModelsFolderError, match="named like a word of CLIP's vocabulary"):
        plan(a1111, "a cat", embedding=[str(word)])


@pytest.fixture
def loras(tiny_sd15: Path, tmp_path: Path) -> Path:
    """A models folder with a kohya LoRA and a diffusers-layout checkpoint (a link to the tiny model)."""
    root = tmp_path / "models"
    (root / "Lora").mkdir(parents=True)
    write_kohya(tiny_sd15, root / "Lora" / "style.safetensors", {"unet": "lora_unet_", "text_encoder": "lora_te_"},
                seed=1, conv=False)
    (root / "Stable-diffusion").mkdir()
    (root / "Stable-diffusion" / "tiny").symlink_to(tiny_sd15, target_is_directory=True)
    return root


def _input(path: Path) -> Path:
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


ARGS = ("--steps", 4, "-s", 0.6, "--seed", 5, "--dtype", "float32")


def test_lora_flag_and_prompt_tag_give_the_api_image_and_from_reruns_it(tiny_sd15: Path, loras: Path,
                                                                         tmp_path: Path) -> None:
    sketch = _input(tmp_path / "in.png")
    lora = loras / "Lora" / "style.safetensors"
    api = Img2ImgPipeline.from_pretrained(tiny_sd15)
    plain = np.asarray(api(prompt="a fox ", image=Image.open(sketch), strength=0.6, num_inference_steps=4,
                           guidance_scale=7.5, seed=5).images[0])
    api.load_lora_weights(lora, scale=0.7)
    want = np.asarray(api(prompt="a fox ", image=Image.open(sketch), strength=0.6, num_inference_steps=4,
                          guidance_scale=7.5, seed=5).images[0])
    assert np.abs(want.astype(int) - plain).mean() > 3  # the LoRA changes the image

    # -m NAME finds the checkpoint in the models folder; <lora:NAME:W> the LoRA in its Lora/
    tagged = cli("run", sketch, "-m", "tiny", "--models-dir", loras, "-p", "a fox <lora:style:0.7>", *ARGS,
                 "-o", "tag.png")
    assert tagged.exit_code == 0, tagged.output
    np.testing.assert_array_equal(pixels(tmp_path / "tag.png"), want)
    flagged = cli("run", sketch, "-m", tiny_sd15, "--lora", f"{lora}:0.7", "-p", "a fox ", *ARGS, "-o", "flag.png")
    assert flagged.exit_code == 0, flagged.output
    np.testing.assert_array_equal(pixels(tmp_path / "flag.png"), want)

    # AUTOMATIC1111's hash: the SHA-256 of the tensor data after the header, 12 digits
    data = lora.read_bytes()
    addnet = hashlib.sha256(data[8 + struct.unpack("<Q", data[:8])[0]:]).hexdigest()
    for name in ("tag.png", "flag.png"):
        text, settings = images.read_metadata(tmp_path / name)
        assert f"Lora hashes: \"style: {addnet[:12]}\"" in text and settings["lora_hashes"] == {"style": addnet}
    assert stored(tmp_path / "flag.png")["lora"] == ["style:0.7"]  # by name, never the path

    # --from: the flag LoRA is found again by name in the LoRA folder, the tag through the stored prompt
    for name in ("tag.png", "flag.png"):
        again = cli("run", sketch, "-m", tiny_sd15, "--models-dir", loras, "--from", tmp_path / name,
                    "-o", f"again-{name}")
        assert again.exit_code == 0, again.output
        np.testing.assert_array_equal(pixels(tmp_path / f"again-{name}"), want)
    # another file under the same name is refused, never used silently
    write_kohya(tiny_sd15, lora, {"unet": "lora_unet_"}, seed=2, conv=False)
    refused = cli("run", sketch, "-m", tiny_sd15, "--models-dir", loras, "--from", tmp_path / "tag.png",
                  "-o", "other.png")
    assert_one_line_error(refused, 1, f"the image was made with a LoRA of that name hashed {addnet[:12]}: another "
                                      "file")
    assert not (tmp_path / "other.png").exists()

    # AUTOMATIC1111's own images: their Lora hashes are checked the same way
    data = lora.read_bytes()
    new_hash = hashlib.sha256(data[8 + struct.unpack("<Q", data[:8])[0]:]).hexdigest()[:12]
    for name, short in (("old.png", addnet[:12]), ("new.png", new_hash)):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", "a fox <lora:style:0.7>\nSteps: 4, Sampler: Euler a, CFG scale: 7.5, Seed: 5, "
                      f'Size: 64x64, Denoising strength: 0.6, Lora hashes: "style: {short}", Version: v1.10.1')
        Image.new("RGB", (8, 8)).save(tmp_path / name, pnginfo=info)
    refused = cli("run", sketch, "-m", "tiny", "--models-dir", loras, "--from", tmp_path / "old.png", "-o", "a.png")
    assert_one_line_error(refused, 1, f"hashed {addnet[:12]}: another file")
    taken = cli("run", sketch, "-m", "tiny", "--models-dir", loras, "--from", tmp_path / "new.png", "-o", "b.png")
    assert taken.exit_code == 0, taken.output
    assert stored(tmp_path / "b.png")["lora_hashes"]["style"].startswith(new_hash)


def test_a_series_switches_loras_between_passes_and_unloads_them(tiny_sd15: Path, loras: Path,
                                                                  tmp_path: Path) -> None:
    """A pass prompt adds a LoRA: the second pass has both, each pass's image is the one of a pipeline with
    exactly its LoRAs; the pipeline keeps a set that does not change and unloads one that does."""
    from mlx_img2img.generation import Planner, apply_extras

    write_kohya(tiny_sd15, loras / "Lora" / "more.safetensors", {"unet": "lora_unet_"}, seed=3, conv=False)
    sketch = _input(tmp_path / "in.png")
    result = cli("run", sketch, "-m", tiny_sd15, "--models-dir", loras, "-p", "a fox <lora:style:0.5>",
                 "--passes", "0.6,0.5", "--pass-prompt", "<lora:more:1.2>", "--steps", 4, "--seed", 5,
                 "--dtype", "float32", "-o", "fox.png")
    assert result.exit_code == 0, result.output
    api = Img2ImgPipeline.from_pretrained(tiny_sd15)
    api.load_lora_weights(loras / "Lora" / "style.safetensors", scale=0.5)
    first = api(prompt="a fox ", image=Image.open(sketch), strength=0.6, num_inference_steps=4, seed=5).images[0]
    np.testing.assert_array_equal(pixels(tmp_path / "fox-pass1.png"), np.asarray(first))
    api.unload_lora_weights()  # as the run does when its set changes: both merged together, in one product
    api.load_lora_weights(loras / "Lora" / "style.safetensors", scale=0.5)
    api.load_lora_weights(loras / "Lora" / "more.safetensors", scale=1.2)
    second = api(prompt="a fox , ", image=first, strength=0.5, num_inference_steps=4, seed=5).images[0]
    np.testing.assert_array_equal(pixels(tmp_path / "fox.png"), np.asarray(second))
    assert set(stored(tmp_path / "fox.png")["lora_hashes"]) == {"style", "more"}

    planner = Planner(Request.from_values({"prompt": "a <lora:more:1.2>", "models_dir": str(loras)}),
                      ModelInfo.of_pipeline(api))
    apply_extras(api, planner.extras("a <lora:more:1.2>"))
    assert [(n.split("@")[0], s) for n, s, _ in api.loras.applied] == [("more", 1.2)]
    kept = api.loras.applied[0]
    apply_extras(api, planner.extras("a <lora:more:1.2>"))
    assert api.loras.applied[0] is kept  # the same set: not loaded again
    apply_extras(api, planner.extras("a"))
    assert api.loras.applied == []


def test_embedding_flag_and_folder_give_the_api_image(tiny_sd15: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "embeddings").mkdir(parents=True)
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(1)) * 1.5
    save_file({"emb_params": vectors}, str(root / "embeddings" / "MyStyle.safetensors"))
    save_file({"emb_params": vectors * 0}, str(root / "embeddings" / "unused.safetensors"))
    outside = tmp_path / "elsewhere" / "qzcat.safetensors"
    outside.parent.mkdir()
    save_file({"<qzcat>": vectors[0] * -1}, str(outside))
    sketch = _input(tmp_path / "in.png")
    api = Img2ImgPipeline.from_pretrained(tiny_sd15)
    api.load_textual_inversion(root / "embeddings" / "MyStyle.safetensors")
    api.load_textual_inversion(outside, token="qzcat")
    prompt = "a qzcat on a sofa, mystyle"
    want = np.asarray(api(prompt=prompt, image=Image.open(sketch), strength=0.6, num_inference_steps=4,
                          seed=5).images[0])
    result = cli("run", sketch, "-m", tiny_sd15, "--models-dir", root, "--embedding", outside, "-p", prompt, *ARGS,
                 "-o", "out.png")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(pixels(tmp_path / "out.png"), want)
    text, settings = images.read_metadata(tmp_path / "out.png")
    full = hashlib.sha256((root / "embeddings" / "MyStyle.safetensors").read_bytes()).hexdigest()
    assert settings["embedding_hashes"]["MyStyle"] == full and f"MyStyle: {full[:12]}" in text
    assert "unused" not in settings["embedding_hashes"]  # not in the prompt: not loaded
    # --from without the embedding at hand says which one is missing
    missing = cli("run", sketch, "-m", tiny_sd15, "--models-dir", root, "--from", tmp_path / "out.png", "-o", "x.png")
    assert_one_line_error(missing, 1, "the image used the embedding 'qzcat'")


def test_model_names_in_the_folder_ambiguous_and_unknown(tiny_sd15: Path, loras: Path, tmp_path: Path) -> None:
    sketch = _input(tmp_path / "in.png")
    assert_one_line_error(cli("run", sketch, "-m", "tiyn", "--models-dir", loras, "-p", "x", *ARGS), 1,
                          "no such model folder, preset or hub repo id: 'tiyn'")
    result = cli("run", sketch, "-m", "tiyn", "--models-dir", loras, "-p", "x", *ARGS)
    assert "near names: tiny" in result.stderr
    (loras / "checkpoints" / "more").mkdir(parents=True)
    shutil.copytree(tiny_sd15, loras / "checkpoints" / "more" / "tiny", symlinks=True)
    assert_one_line_error(cli("run", sketch, "-m", "tiny", "--models-dir", loras, "-p", "x", *ARGS), 1,
                          "'tiny' names 2 checkpoints")
    # LoRA errors are one line too, before anything loads
    (tmp_path / "old.ckpt").write_bytes(b"pickle")
    for lora, expected in (("stlye:0.5", "--lora stlye: no lora named 'stlye' in"), ("old.ckpt", "are Python pickles"),
                           ("style:x", "no lora named 'style:x'")):
        result = cli("run", sketch, "-m", tiny_sd15, "--models-dir", loras, "--lora", lora, "-p", "x", *ARGS)
        assert result.exit_code in (1, 2) and expected in result.stderr and "Traceback" not in result.output, \
            result.output


def test_server_lists_loras_and_embeddings_and_applies_prompt_tags(tiny_sd15: Path, loras: Path,
                                                                   tmp_path: Path) -> None:
    """AUTOMATIC1111's /sdapi/v1/loras and /embeddings from the models folder; <lora:NAME:W> in a request's
    prompt gives the Python API's image with that LoRA; a LoRA by path is never taken from a body."""
    import base64
    import io

    from starlette.testclient import TestClient

    from mlx_img2img.server import Limits, ServerOptions, build

    (loras / "embeddings").mkdir()
    save_file({"emb_params": torch.zeros(2, 32)}, str(loras / "embeddings" / "tinyemb.safetensors"))
    save_file({"emb_params": torch.zeros(2, 768)}, str(loras / "embeddings" / "sd15emb.safetensors"))
    engine, app = build(ServerOptions(model=str(tiny_sd15), models_dir=loras, limits=Limits(max_pixels=256 * 256)))
    sketch = Image.open(_input(tmp_path / "in.png"))
    api = Img2ImgPipeline.from_pretrained(tiny_sd15)
    api.load_lora_weights(loras / "Lora" / "style.safetensors", scale=0.7)
    want = np.asarray(api(prompt="a fox ", image=sketch, strength=0.6, num_inference_steps=4, guidance_scale=7.5,
                          seed=5).images[0])
    buffer = io.BytesIO()
    sketch.save(buffer, format="PNG")
    body = {"init_images": [base64.b64encode(buffer.getvalue()).decode()], "prompt": "a fox <lora:style:0.7>",
            "denoising_strength": 0.6, "steps": 4, "cfg_scale": 7.5, "seed": 5, "width": 64, "height": 64}
    try:
        with TestClient(app) as client:
            listed = client.get("/sdapi/v1/loras").json()
            assert [(x["name"], x["alias"], x["path"]) for x in listed] == [
                ("style", "style", str(loras / "Lora" / "style.safetensors"))]
            embeddings = client.get("/sdapi/v1/embeddings").json()
            assert set(embeddings["loaded"]) == {"tinyemb"} and embeddings["loaded"]["tinyemb"]["shape"] == 32
            assert set(embeddings["skipped"]) == {"sd15emb"}  # 768 wide: not for this model
            answer = client.post("/sdapi/v1/img2img", json=body)
            assert answer.status_code == 200, answer.text
            got = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
            np.testing.assert_array_equal(np.asarray(got.convert("RGB")), want)
            unknown = client.post("/sdapi/v1/img2img", json={**body, "prompt": "a fox <lora:stlye>"})
            assert unknown.status_code == 400 and "near names: style" in unknown.json()["detail"]
            by_path = client.post("/v1/jobs", json={"image": body["init_images"][0], "prompt": "a fox",
                                                    "lora": [str(loras / "Lora" / "style.safetensors")]})
            assert by_path.status_code == 400 and "set when the server starts" in by_path.json()["detail"]
    finally:
        engine.shutdown()


def test_quantized_run_merges_its_loras_before_quantizing(tiny_sd15: Path, loras: Path, tmp_path: Path) -> None:
    """With --quantize and one LoRA set for the whole run, the LoRAs go in as the weights load (the loading
    chain's slot), so each layer is quantized once with its LoRA: the API's pipeline built that way."""
    from mlx_img2img.loading import open_source
    from mlx_img2img.loading.lora import merge_at_load

    sketch = _input(tmp_path / "in.png")
    lora = loras / "Lora" / "style.safetensors"
    api = Img2ImgPipeline.from_source(open_source(tiny_sd15), quantize=8, patches=[merge_at_load([(lora, 0.7)])])
    want = np.asarray(api(prompt="a fox ", image=Image.open(sketch), strength=0.6, num_inference_steps=4,
                          seed=5).images[0])
    result = cli("run", sketch, "-m", tiny_sd15, "--models-dir", loras, "--quantize", 8, "-p",
                 "a fox <lora:style:0.7>", *ARGS, "-o", "q.png")
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(pixels(tmp_path / "q.png"), want)
