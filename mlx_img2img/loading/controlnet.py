"""ControlNets: a diffusers ControlNetModel folder (config.json and safetensors weights), a hub repo of
one (a preset or repo id, through the hub cache), or a single .safetensors file in the original layout
(ControlNet 1.0/1.1's `control_v11p_sd15_scribble.safetensors`: keys under `control_model.` or none),
loaded through the same chain as a pipeline's parts.

A single file's down path and mid block have the UNet's original key layout (single_file's conversion);
its own parts are the hint block (`input_hint_block.*`: the conditioning embedding's convolutions, SiLUs
between them), the zero convolutions (`zero_convs.N.0`) and the mid block's (`middle_block_out.0`). Its
config is what the weights tell (input and hint channels, the embedding's widths, transformer depths)
over its family's UNet config (shipped, the family told by the text width), or a given ControlNet folder's.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlx.core as mx

from ..errors import ModelFormatError
from ..models.controlnet import ControlNetConfig, ControlNetModel
from ..weights import CONTROLNET_PRESETS, DTYPES, download, read_json
from . import LoadOptions, load_component
from .folder import load_weights
from .single_file import (
    CONFIGS,
    FAMILY_BY_CONTEXT_WIDTH,
    FAMILY_NAMES,
    cast,
    convert_unet,
    is_single_file,
    read_safetensors,
    rename_modules,
)

CONTROLNET = "controlnet"  # the component's name (a pipeline folder's subfolder, and in messages)


class ComponentFolder:
    """One component's folder (config.json + weights) as a component source."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = folder, name

    def config(self, component: str) -> dict:
        return read_json(self.folder / "config.json")

    def tensors(self, component: str, dtype: mx.Dtype) -> dict[str, mx.array]:
        return load_weights(self.folder, dtype)


def controlnet_folder(name_or_path: str | os.PathLike, dtype: str = "float32", offline: bool | None = None) -> Path:
    """The folder of a ControlNet: a local folder (or a pipeline folder's controlnet/), else a preset
    (weights.CONTROLNET_PRESETS) or hub repo id through the hub cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        folder = path / CONTROLNET if (path / CONTROLNET).is_dir() else path
        if not (folder / "config.json").is_file():
            raise ModelFormatError(f"{path} is not a ControlNet folder: it has no config.json")
        return folder
    return download(str(name_or_path), dtype=dtype, offline=offline, single_component=True)


def load_controlnet(name_or_path: str | os.PathLike, options: LoadOptions, offline: bool | None = None,
                    config: str | os.PathLike | None = None) -> ControlNetModel:
    """A ControlNet through the loading chain (strict load, patches, quantization as the UNet's). `config`
    (a ControlNet folder or cached hub repo, never downloaded) is for a single file: its config.json
    replaces the one the file's weights and family give."""
    if is_single_file(name_or_path):
        source = ControlNetFile(name_or_path, config)
    elif config is not None:
        raise ValueError("config is for single-file ControlNets; a ControlNet folder carries its own config.json")
    else:
        dtype_name = next(name for name, dtype in DTYPES.items() if dtype == options.dtype)  # which files to fetch
        folder = controlnet_folder(name_or_path, dtype_name, offline)
        source = ComponentFolder(folder, _display_name(name_or_path, folder))
    config = source.config(CONTROLNET)
    kind = config.get("_class_name")
    if kind not in (None, "ControlNetModel"):
        raise ModelFormatError(f"{source.name}: a {kind}, not a ControlNetModel (SD 1.x/2.x and SDXL ControlNets)")
    model = ControlNetModel(ControlNetConfig.from_dict(config))
    return load_component(source, CONTROLNET, model, options)


def _display_name(name_or_path: str | os.PathLike, folder: Path) -> str:
    path = Path(name_or_path).expanduser()
    return path.resolve().name if path.is_dir() else str(name_or_path)


# ---------------------------------------------------------------------------------------------- single files

CONTROL_PREFIX = "control_model."  # ControlNet 1.0/1.1 files; some others (thibaud's SD 2.1 ones) have none
HINT = "input_hint_block."
# The mid block's first transformer's cross-attention key projection: its input width is the text's.
CONTEXT_KEY = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"


class ControlNetFile:
    """A single-file ControlNet (original or diffusers key layout) as a component source."""

    def __init__(self, path: str | os.PathLike, config: str | os.PathLike | None = None):
        self.path = Path(path).expanduser()
        self.name = self.path.name
        tensors = read_safetensors(self.path)
        under_prefix = {k[len(CONTROL_PREFIX):]: v for k, v in tensors.items() if k.startswith(CONTROL_PREFIX)}
        tensors = under_prefix or tensors
        original = "time_embed.0.weight" in tensors
        if not original and "time_embedding.linear_1.weight" not in tensors:
            raise ModelFormatError(
                f"{self.name} is not a ControlNet file: it has none of the keys {CONTROL_PREFIX}time_embed.0.weight, "
                f"time_embed.0.weight (the original layout) or time_embedding.linear_1.weight (diffusers')")
        if "controlnet_cond_embedding.conv_in.weight" not in tensors and HINT + "0.weight" not in tensors:
            raise ModelFormatError(f"{self.name} has a UNet's keys but no ControlNet hint block ({HINT}0.weight): "
                                   "give a ControlNet file (a model checkpoint goes to --model)")
        given = read_json(controlnet_folder(config, offline=True) / "config.json") if config is not None else None
        if original:
            width = tensors.get("middle_block.1.transformer_blocks.0.attn2.to_k.weight")
        else:
            width = tensors.get(CONTEXT_KEY)
        base = given if given is not None else family_unet_config(width, self.name)
        self.tensors_in_file = convert_controlnet(tensors, base, self.name) if original else tensors
        self._config = given if given is not None else controlnet_config_from_weights(self.tensors_in_file, base)

    def config(self, component: str) -> dict:
        return self._config

    def tensors(self, component: str, dtype: mx.Dtype) -> dict[str, mx.array]:
        return cast(self.tensors_in_file, dtype)


def family_unet_config(to_k: mx.array | None, where: str) -> dict:
    """The shipped UNet config of the family whose text width the cross-attention projection `to_k` takes."""
    family = FAMILY_BY_CONTEXT_WIDTH.get(to_k.shape[-1]) if to_k is not None else None
    if family not in ("sd1", "sd2", "sdxl"):  # (the SDXL refiner has no ControlNets)
        widths = ", ".join(f"{w} ({FAMILY_NAMES[f]})" for w, f in FAMILY_BY_CONTEXT_WIDTH.items()
                           if f != "sdxl-refiner")
        found = "no mid-block cross-attention" if to_k is None else f"text width {to_k.shape[-1]}"
        raise ModelFormatError(f"{where}: {found}, not one of the ControlNet families' ({widths}); give the "
                               "ControlNet's diffusers folder as its config")
    return read_json(CONFIGS / f"{family}.json")["unet"]


def convert_controlnet(tensors: dict[str, mx.array], config: dict, where: str) -> dict[str, mx.array]:
    """Original ControlNet keys (prefix stripped) -> diffusers keys, for a ControlNet (or UNet) config."""
    hint = sorted({int(k.split(".")[1]) for k in tensors if k.startswith(HINT)})
    names = {f"{HINT}{hint[0]}": "controlnet_cond_embedding.conv_in",
             f"{HINT}{hint[-1]}": "controlnet_cond_embedding.conv_out",
             "middle_block_out.0": "controlnet_mid_block"}
    names.update({f"{HINT}{i}": f"controlnet_cond_embedding.blocks.{k}" for k, i in enumerate(hint[1:-1])})
    zeros = {int(k.split(".")[1]) for k in tensors if k.startswith("zero_convs.")}
    names.update({f"zero_convs.{i}.0": f"controlnet_down_blocks.{i}" for i in zeros})
    out, rest = rename_modules(tensors, names)
    # The down path and mid block are the UNet's; a ControlNet has no up path (no output_blocks keys to
    # name), but the UNet's naming wants one up block type per block.
    n = len(config["block_out_channels"])
    unet, unmatched = convert_unet({k: tensors[k] for k in rest}, {**config, "up_block_types": ["UpBlock2D"] * n})
    if unmatched:
        raise ModelFormatError(f"{where}: {len(unmatched)} weights do not fit the ControlNet layout, e.g. "
                               f"{', '.join(sorted(unmatched)[:4])}")
    return {**out, **unet}


def controlnet_config_from_weights(tensors: dict[str, mx.array], unet: dict) -> dict:
    """A ControlNet config for these (diffusers-named) weights: the family's UNet config `unet` for what
    weights cannot tell (attention heads, projections, norms), the weights for the rest."""
    config = {k: v for k, v in unet.items() if k not in ("up_block_types", "out_channels", "sample_size")}
    config["_class_name"] = "ControlNetModel"
    embedding = "controlnet_cond_embedding."
    conv_in = tensors[embedding + "conv_in.weight"]
    blocks = sum(1 for k in tensors if k.startswith(embedding + "blocks.") and k.endswith(".weight"))
    config["in_channels"] = tensors["conv_in.weight"].shape[1]
    config["conditioning_channels"] = conv_in.shape[1]
    # The embedding's widths: conv_in's, then each pair's second (strided) convolution's.
    config["conditioning_embedding_out_channels"] = [conv_in.shape[0]] + [
        tensors[f"{embedding}blocks.{k}.weight"].shape[0] for k in range(1, blocks, 2)]
    n = len(config["block_out_channels"])
    kinds, depths = [], []
    for b in range(n):
        attention = f"down_blocks.{b}.attentions.0."
        cross = any(k.startswith(attention) for k in tensors)
        kinds.append("CrossAttnDownBlock2D" if cross else "DownBlock2D")
        depths.append(_transformer_depth(tensors, attention) if cross else 1)
    depths[-1] = _transformer_depth(tensors, "mid_block.attentions.0.")  # the mid block takes the last entry
    config["down_block_types"] = kinds
    config["transformer_layers_per_block"] = depths[0] if len(set(depths)) == 1 else depths
    if "add_embedding.linear_1.weight" in tensors:
        config["projection_class_embeddings_input_dim"] = tensors["add_embedding.linear_1.weight"].shape[1]
    if CONTEXT_KEY in tensors:
        config["cross_attention_dim"] = tensors[CONTEXT_KEY].shape[-1]
    return config


def _transformer_depth(tensors: dict[str, mx.array], attention: str) -> int:
    """How many transformer blocks the attention module under `attention` has."""
    stem = attention + "transformer_blocks."
    return len({k[len(stem):].split(".")[0] for k in tensors if k.startswith(stem)})


# ---------------------------------------------------------------------------------------------- presets


def is_controlnet_preset(name: str) -> bool:
    """A ControlNet preset's name or repo id (weights.CONTROLNET_PRESETS)."""
    return name in CONTROLNET_PRESETS or name in CONTROLNET_PRESETS.values()


def cached_controlnets() -> dict[str, Path]:
    """The ControlNet presets in the local Hugging Face cache: repo id -> snapshot folder (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = {}
    for repo in CONTROLNET_PRESETS.values():
        config = try_to_load_from_cache(repo, "config.json")
        if isinstance(config, str):  # (else None, or the marker of a file known to be missing)
            found[repo] = Path(config).parent
    return found
