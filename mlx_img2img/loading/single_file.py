"""Single-file checkpoints (AUTOMATIC1111, ComfyUI, CivitAI) as a component source.

A single file holds the whole model in the original (LDM / Stability) key layout:

    model.diffusion_model.*                  UNet
    first_stage_model.*                      VAE (mid-block attention as 1x1 convolutions)
    cond_stage_model.transformer.*           SD 1.x text encoder (transformers' CLIP)
    cond_stage_model.model.*                 SD 2.x text encoder (OpenCLIP: fused in_proj, text_projection)
    conditioner.embedders.0.transformer.*    SDXL base text encoder 1 (CLIP ViT-L)
    conditioner.embedders.1.model.*          SDXL base text encoder 2 (OpenCLIP ViT-bigG)
    conditioner.embedders.0.model.*          SDXL refiner's only text encoder (OpenCLIP ViT-bigG)

This module renames those keys to the diffusers/transformers names of a diffusers folder (torch layouts
kept: the loading chain converts layouts) and supplies the configs, tokenizers and scheduler settings
that a diffusers folder would carry: shipped ones per family, or those of a `config` folder.
Only safetensors are read: a pickled .ckpt/.pt file can run code when it is opened.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import mlx.core as mx

from ..errors import ModelFormatError, ModelNotFoundError
from ..models.unet import _per_block
from ..weights import check_safetensors, read_json, resolve_model
from .folder import load_weights

CONFIGS = Path(__file__).parent / "configs"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
WEIGHT_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
# Buffers of the original training code, derived from the scheduler config: nothing to load.
SCHEDULE_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "model_ema.decay",
                    "model_ema.num_updates", "lvlb_weights"}


@dataclass(frozen=True)
class TextEncoderKeys:
    prefix: str
    open_clip: bool  # OpenCLIP's own layout (resblocks, fused in_proj), else transformers' CLIP layout


# Each family's text encoders by key prefix. SDXL's two encoders are told apart by prefix, never by width.
TEXT_ENCODERS: dict[str, dict[str, TextEncoderKeys]] = {
    "sd1": {"text_encoder": TextEncoderKeys("cond_stage_model.transformer.", False)},
    "sd2": {"text_encoder": TextEncoderKeys("cond_stage_model.model.", True)},
    "sdxl": {"text_encoder": TextEncoderKeys("conditioner.embedders.0.transformer.", False),
             "text_encoder_2": TextEncoderKeys("conditioner.embedders.1.model.", True)},
    "sdxl-refiner": {"text_encoder_2": TextEncoderKeys("conditioner.embedders.0.model.", True)},
}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL base", "sdxl-refiner": "SDXL refiner"}
# Without text-encoder keys, the UNet's cross-attention width names the family.
FAMILY_BY_CONTEXT_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}


def is_single_file(name_or_path: str | os.PathLike) -> bool:
    """A checkpoint file (or what is named like one), as opposed to a folder, preset or repo id."""
    path = Path(name_or_path).expanduser()
    return path.is_file() or path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES)


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelFormatError(
            f"{path.name}: {path.suffix} checkpoints are Python pickles, which can run arbitrary code when "
            "opened; only .safetensors files are loaded (convert it once, or download the .safetensors version)")


def read_safetensors(path: Path) -> dict[str, mx.array]:
    """All tensors of a safetensors file (MLX reads them lazily), after checking the file is whole."""
    refuse_pickle(path)
    if not path.is_file():
        raise ModelNotFoundError(f"no such file: {path}")
    check_safetensors(path)
    try:
        return mx.load(str(path))
    except Exception as e:
        raise ModelFormatError(f"cannot read {path}: {e}") from None


def cast(tensors: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    return {k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and v.dtype != dtype else v
            for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------------- family

def _has_prefix(keys: set[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def detect_family(tensors: dict[str, mx.array], where: str = "the file") -> str:
    """"sd1", "sd2", "sdxl" or "sdxl-refiner", from the text encoders' key prefixes, else from the UNet."""
    keys = set(tensors)
    for family in ("sdxl", "sdxl-refiner", "sd2", "sd1"):  # most specific first: SDXL base also has embedders.0
        if all(_has_prefix(keys, k.prefix) for k in TEXT_ENCODERS[family].values()):
            return family
    to_k = UNET_PREFIX + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    if to_k in tensors and tensors[to_k].shape[-1] in FAMILY_BY_CONTEXT_WIDTH:
        return FAMILY_BY_CONTEXT_WIDTH[tensors[to_k].shape[-1]]
    looked_for = sorted({k.prefix for family in TEXT_ENCODERS.values() for k in family.values()})
    raise ModelFormatError(
        f"{where} is not a Stable Diffusion 1.x/2.x/SDXL checkpoint in the original layout: none of the keys "
        f"{', '.join(p + '*' for p in looked_for)} nor {to_k} with a known width; keys found start with "
        f"{', '.join(sorted({k.split('.')[0] for k in keys})[:6])}")


PREDICTION_TYPES = ("epsilon", "v_prediction")
# SD 2.x's shipped UNet config is the 768-pixel model's (sample_size 96); the 512-pixel models are epsilon.
SD2_SAMPLE_SIZE = {"v_prediction": 96, "epsilon": 64}


def unet_probe(unet) -> float:
    """AUTOMATIC1111's test for SD 2.x checkpoints, whose keys do not tell a 512-pixel epsilon model from a
    768-pixel v-prediction one: the UNet at the last training timestep (999) on a constant latent (0.5, 8x8)
    and a constant two-token context (0.5); the mean of output minus input. There the input is nearly pure
    noise, which an epsilon model predicts (about 0); a v-prediction model answers far below it. Run in
    float32, as AUTOMATIC1111 runs it: float32 inputs promote every layer (half-precision weights are cast
    one layer at a time; half-precision products are slow on the CPU)."""
    x = mx.full((1, 8, 8, unet.config.in_channels), 0.5, dtype=mx.float32)
    context = mx.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=mx.float32)
    return (unet(x, mx.array([999.0]), context) - x).mean().item()


def detect_prediction_type(unet) -> str:
    """"v_prediction" where the probe falls below -1 (AUTOMATIC1111's threshold), else "epsilon"."""
    return "v_prediction" if unet_probe(unet) < -1 else "epsilon"


# ---------------------------------------------------------------------------------------------- UNet

RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
          "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def unet_module_names(config: dict) -> dict[str, str]:
    """LDM module path -> diffusers module path for a UNet of this config (resnet sub-layers included)."""
    n = len(config["block_out_channels"])
    layers = _per_block(config.get("layers_per_block", 2), n)
    names = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
             "middle_block.1": "mid_block.attentions.0"}

    def resnet(ldm: str, ours: str) -> None:
        names.update({f"{ldm}.{a}": f"{ours}.{b}" for a, b in RESNET.items()})

    resnet("middle_block.0", "mid_block.resnets.0")
    resnet("middle_block.2", "mid_block.resnets.1")
    index = 1
    for block in range(n):
        for layer in range(layers[block]):
            resnet(f"input_blocks.{index}.0", f"down_blocks.{block}.resnets.{layer}")
            names[f"input_blocks.{index}.1"] = f"down_blocks.{block}.attentions.{layer}"
            index += 1
        if block < n - 1:
            names[f"input_blocks.{index}.0.op"] = f"down_blocks.{block}.downsamplers.0.conv"
            index += 1
    index = 0
    for block, (block_type, count) in enumerate(zip(config["up_block_types"], layers[::-1], strict=True)):
        attention = block_type.startswith("CrossAttn")
        for layer in range(count + 1):
            resnet(f"output_blocks.{index}.0", f"up_blocks.{block}.resnets.{layer}")
            if attention:
                names[f"output_blocks.{index}.1"] = f"up_blocks.{block}.attentions.{layer}"
            if layer == count and block < n - 1:
                names[f"output_blocks.{index}.{2 if attention else 1}.conv"] = f"up_blocks.{block}.upsamplers.0.conv"
            index += 1
    return names


def rename_modules(tensors: dict[str, mx.array], names: dict[str, str]) -> tuple[dict[str, mx.array], list[str]]:
    """Rename each key by the longest module path of `names` it starts with; also the keys no path matched."""
    out, unmatched = {}, []
    for key, value in tensors.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            if module in names:
                out[names[module] + "." + ".".join(parts[cut:])] = value
                break
        else:
            unmatched.append(key)
    return out, unmatched


def convert_unet(tensors: dict[str, mx.array], config: dict) -> tuple[dict[str, mx.array], list[str]]:
    """Original UNet keys (without their prefix) -> diffusers keys; also the keys that fit nowhere."""
    out, unmatched = rename_modules(tensors, unet_module_names(config))
    linear = config.get("use_linear_projection", False)
    for key, value in out.items():
        # SD 1.x projects in and out of the transformer with 1x1 convolutions, SD 2.x/SDXL with linear
        # layers; fine-tunes sometimes store the other shape. The config decides.
        if key.endswith(("proj_in.weight", "proj_out.weight")) and ".attentions." in key:
            if linear and value.ndim == 4:
                out[key] = value.reshape(value.shape[:2])
            elif not linear and value.ndim == 2:
                out[key] = value.reshape(*value.shape, 1, 1)
    return out, unmatched


# ---------------------------------------------------------------------------------------------- VAE

VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_module_names(config: dict) -> dict[str, str]:
    n = len(config["block_out_channels"])
    layers = config.get("layers_per_block", 2)
    names = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        names.update({f"{part}.conv_in": f"{part}.conv_in", f"{part}.conv_out": f"{part}.conv_out",
                      f"{part}.norm_out": f"{part}.conv_norm_out",
                      f"{part}.mid.block_1": f"{part}.mid_block.resnets.0",
                      f"{part}.mid.block_2": f"{part}.mid_block.resnets.1"})
        names.update({f"{part}.mid.attn_1.{a}": f"{part}.mid_block.attentions.0.{b}" for a, b in VAE_ATTENTION.items()})
        for i in range(n):
            # The decoder's original blocks run from the smallest size up, diffusers' from the input side.
            ours = f"encoder.down_blocks.{i}" if part == "encoder" else f"decoder.up_blocks.{n - 1 - i}"
            ldm = f"encoder.down.{i}" if part == "encoder" else f"decoder.up.{i}"
            count = layers if part == "encoder" else layers + 1
            for j in range(count):
                names[f"{ldm}.block.{j}"] = f"{ours}.resnets.{j}"
                names[f"{ldm}.block.{j}.nin_shortcut"] = f"{ours}.resnets.{j}.conv_shortcut"
            names[f"{ldm}.downsample.conv" if part == "encoder" else f"{ldm}.upsample.conv"] = (
                f"{ours}.downsamplers.0.conv" if part == "encoder" else f"{ours}.upsamplers.0.conv")
    for part in ("encoder", "decoder"):
        names[f"{part}.mid.block_1.nin_shortcut"] = f"{part}.mid_block.resnets.0.conv_shortcut"
        names[f"{part}.mid.block_2.nin_shortcut"] = f"{part}.mid_block.resnets.1.conv_shortcut"
    return names


def is_original_vae(tensors: dict[str, mx.array]) -> bool:
    return any(k.startswith("encoder.down.") or k.startswith("decoder.up.") for k in tensors)


def convert_vae(tensors: dict[str, mx.array], config: dict) -> tuple[dict[str, mx.array], list[str]]:
    """Original VAE keys (without their prefix) -> diffusers keys; the mid-block attention's 1x1
    convolutions become the linear weights diffusers has."""
    out, unmatched = rename_modules(tensors, vae_module_names(config))
    for key, value in out.items():
        if ".mid_block.attentions.0.to_" in key and value.ndim == 4:
            out[key] = value.reshape(value.shape[:2])
    return out, unmatched


# ---------------------------------------------------------------------------------------------- text encoders

OPEN_CLIP_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                 "positional_embedding": "text_model.embeddings.position_embedding.weight",
                 "ln_final.weight": "text_model.final_layer_norm.weight",
                 "ln_final.bias": "text_model.final_layer_norm.bias"}
OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
OPEN_CLIP_IGNORED = ("logit_scale", "attn_mask")
RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
IN_PROJ = re.compile(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def convert_clip(tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    """transformers' CLIP under a prefix (already stripped): the names are diffusers' already, some older
    files lack the "text_model." level."""
    return {k if k.startswith("text_model.") else "text_model." + k: v
            for k, v in tensors.items() if not k.endswith("position_ids")}


def convert_open_clip(tensors: dict[str, mx.array], config: dict) -> tuple[dict[str, mx.array], list[str]]:
    """OpenCLIP's text tower -> transformers' CLIPTextModel(WithProjection) keys. Layers beyond the
    config's num_hidden_layers are dropped (SD 2.x files carry all 24, the model uses 23), as is the
    text projection when the config has none."""
    keep = config["num_hidden_layers"]
    with_projection = "CLIPTextModelWithProjection" in config.get("architectures", [])
    out, unmatched = {}, []
    for key, value in tensors.items():
        layer = RESBLOCK.match(key) or IN_PROJ.match(key)
        if key in OPEN_CLIP_TOP:
            out[OPEN_CLIP_TOP[key]] = value
        elif key == "text_projection":
            if with_projection:  # OpenCLIP multiplies x @ P; a linear layer stores P transposed
                out["text_projection.weight"] = value.T
        elif key in OPEN_CLIP_IGNORED:
            continue
        elif layer is None:
            unmatched.append(key)
        elif int(layer.group(1)) >= keep:
            continue
        elif IN_PROJ.match(key):
            stem = f"text_model.encoder.layers.{layer.group(1)}.self_attn"
            for name, part in zip(("q_proj", "k_proj", "v_proj"), mx.split(value, 3, axis=0), strict=True):
                out[f"{stem}.{name}.{layer.group(2)}"] = part
        elif layer.group(2) in OPEN_CLIP_LAYER:
            name = OPEN_CLIP_LAYER[layer.group(2)]
            out[f"text_model.encoder.layers.{layer.group(1)}.{name}.{layer.group(3)}"] = value
        else:
            unmatched.append(key)
    return out, unmatched


# ---------------------------------------------------------------------------------------------- the source

def _strip(tensors: dict[str, mx.array], prefix: str) -> dict[str, mx.array]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _ignored_note(keys: list[str]) -> str:
    groups: dict[str, int] = {}
    for key in keys:
        group = "model_ema.*" if key.startswith("model_ema.") else ".".join(key.split(".")[:2]) + ".*"
        groups[group] = groups.get(group, 0) + 1
    return ", ".join(f"{g} ({n})" for g, n in sorted(groups.items(), key=lambda x: -x[1])[:5])


_tokenizer_folders: dict[str, Path] = {}


def shipped_tokenizer_folder(pad_token: str) -> Path:
    """A tokenizer folder with the shipped CLIP vocabulary and this pad token (the vocabulary is the same
    for every family; only the pad token differs), made once per process in a temporary folder that is
    removed when the process exits."""
    if pad_token not in _tokenizer_folders:
        folder = Path(tempfile.mkdtemp(prefix="mlx-img2img-tokenizer-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        for name in ("vocab.json", "merges.txt"):
            try:
                (folder / name).symlink_to(CONFIGS / "clip" / name)
            except OSError:  # no symlinks on this file system
                (folder / name).write_bytes((CONFIGS / "clip" / name).read_bytes())
        config = {"model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                  "unk_token": "<|endoftext|>", "pad_token": pad_token, "do_lower_case": True}
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        _tokenizer_folders[pad_token] = folder
    return _tokenizer_folders[pad_token]


class SingleFileSource:
    """The components of one single-file checkpoint, named and shaped as a diffusers folder has them.

    `config`: a diffusers folder (or a cached hub model, never downloaded) whose configs, tokenizers and
    scheduler replace the shipped ones, and whose weights fill in components the file lacks.
    `prediction_type`: the scheduler's, in place of the config folder's or the detected one. The keys of an
    SD 2.x file do not tell a 512-pixel "epsilon" model from a 768-pixel "v_prediction" one: without either,
    the loaded UNet decides (`settle`, AUTOMATIC1111's test), and the shipped UNet config's sample size
    follows (64 or 96 latent pixels). An SD 2.x inpainting file (9 input channels) is epsilon, as its
    original config says.
    """

    def __init__(self, path: str | Path, config: str | Path | None = None, prediction_type: str | None = None):
        self.path = Path(path).expanduser()
        self.name = self.path.stem
        self.tensors_in_file = read_safetensors(self.path)
        self.config_folder = resolve_model(config, offline=True) if config is not None else None
        if prediction_type not in (None, *PREDICTION_TYPES):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")
        self.prediction_type = prediction_type
        self.family = detect_family(self.tensors_in_file, self.path.name)
        self.detected_prediction_type: str | None = None  # set by settle where the UNet decided it
        if prediction_type is None and self.family == "sd2" and self.config_folder is None and self._in_channels == 9:
            self.prediction_type = "epsilon"
        self._noted = False

    @property
    def _in_channels(self) -> int | None:
        conv_in = self.tensors_in_file.get(UNET_PREFIX + "input_blocks.0.0.weight")
        return conv_in.shape[1] if conv_in is not None and conv_in.ndim == 4 else None

    def settle(self, unet) -> None:
        """An SD 2.x file loaded without a prediction type (given or from a config folder): the UNet's answer
        to AUTOMATIC1111's probe decides, and a note says so (a fine-tune can answer either way)."""
        if self.family != "sd2" or self.prediction_type is not None or self.config_folder is not None:
            return
        self.detected_prediction_type = detect_prediction_type(unet)
        what = {"v_prediction": "a 768-pixel v-prediction", "epsilon": "a 512-pixel epsilon"}
        warnings.warn(f"{self.path.name}: an SD 2.x checkpoint, loaded as {what[self.detected_prediction_type]} "
                      "model (its UNet's answer to AUTOMATIC1111's test); if that is wrong, pass --prediction-type "
                      "(prediction_type=)", stacklevel=3)

    def _prediction_type(self) -> str | None:
        return self.prediction_type or self.detected_prediction_type

    # -- what the file holds

    @cached_property
    def shipped(self) -> dict:
        return read_json(CONFIGS / f"{self.family}.json")

    def _file_part(self, component: str) -> tuple[str, dict[str, mx.array]]:
        """(prefix, tensors under it without the prefix) of a weight component in the file."""
        if component == "unet":
            prefix = UNET_PREFIX
        elif component == "vae":
            prefix = VAE_PREFIX
        else:
            keys = TEXT_ENCODERS[self.family].get(component)
            if keys is None:
                return "", {}
            prefix = keys.prefix
        return prefix, _strip(self.tensors_in_file, prefix)

    def _folder_has(self, component: str) -> bool:
        return self.config_folder is not None and (self.config_folder / component).is_dir()

    def has(self, component: str) -> bool:
        if self.config_folder is not None:
            return self._folder_has(component)
        return component in self.shipped

    # -- configs

    def config(self, component: str) -> dict:
        if self.config_folder is not None:
            name = "scheduler_config.json" if component == "scheduler" else "config.json"
            config = read_json(self.config_folder / component / name)
        elif component in self.shipped:
            config = dict(self.shipped[component])
        else:
            raise ModelFormatError(f"a {FAMILY_NAMES[self.family]} checkpoint has no {component}")
        if component == "unet" and self.config_folder is None:
            if self._in_channels is not None:  # 9 for inpainting models (latents, mask, masked-image latents)
                config["in_channels"] = self._in_channels
            if self.family == "sd2" and self._prediction_type() is not None:
                config["sample_size"] = SD2_SAMPLE_SIZE[self._prediction_type()]
        if component == "scheduler" and self._prediction_type() is not None:
            config["prediction_type"] = self._prediction_type()
        return config

    def pipeline_config(self) -> dict:
        if self.config_folder is not None:
            index = self.config_folder / "model_index.json"
            return read_json(index) if index.exists() else {}
        return dict(self.shipped["pipeline"])

    def tokenizer_folder(self, component: str) -> Path:
        if self.config_folder is not None:
            return self.config_folder / component
        if component not in self.shipped:
            raise ModelFormatError(f"a {FAMILY_NAMES[self.family]} checkpoint has no {component}")
        return shipped_tokenizer_folder(self.shipped[component]["pad_token"])

    # -- weights

    def tensors(self, component: str, dtype: mx.Dtype) -> dict[str, mx.array]:
        """The component's weights under diffusers names, in torch layouts, floating ones cast to dtype."""
        prefix, part = self._file_part(component)
        if not part:
            if self._folder_has(component) and any(self.config_folder.glob(f"{component}/*.safetensors")):
                return load_weights(self.config_folder / component, dtype)
            what = {"vae": "VAE", "unet": "UNet"}.get(component, "text encoder " + component)
            hint = " (pass vae=... / --vae)" if component == "vae" else " (pass config=FOLDER with its weights)"
            raise ModelFormatError(
                f"{self.path.name} has no {what} weights ({prefix or 'no known prefix'}*){hint}")
        config = self.config(component)
        if component == "unet":
            converted, unmatched = convert_unet(part, config)
        elif component == "vae":
            converted, unmatched = convert_vae(part, config)
        elif TEXT_ENCODERS[self.family][component].open_clip:
            converted, unmatched = convert_open_clip(part, config)
        else:
            converted, unmatched = convert_clip(part), []
        if unmatched:
            raise ModelFormatError(
                f"{self.path.name}: {len(unmatched)} {component} weights do not fit the "
                f"{FAMILY_NAMES[self.family]} layout, e.g. {', '.join(sorted(prefix + k for k in unmatched)[:4])}")
        self._note_ignored()
        return cast(converted, dtype)

    def _note_ignored(self) -> None:
        """Say once which keys of the file no component takes (EMA copies, training leftovers)."""
        if self._noted:
            return
        self._noted = True
        prefixes = [UNET_PREFIX, VAE_PREFIX] + [k.prefix for k in TEXT_ENCODERS[self.family].values()]
        ignored = [k for k in self.tensors_in_file
                   if not k.startswith(tuple(prefixes)) and k not in SCHEDULE_BUFFERS]
        if ignored:
            plural = "s" if len(ignored) != 1 else ""
            warnings.warn(f"{self.path.name}: ignored {len(ignored)} weight{plural} no component uses: "
                          f"{_ignored_note(ignored)}", stacklevel=3)
