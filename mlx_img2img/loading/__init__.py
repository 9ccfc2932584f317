"""Loading a model: a chain over a component source.

    source (a diffusers folder today; a single-file checkpoint next) yields, per component, its config
    and its tensors under diffusers key names in torch layouts
      -> rename_key (legacy attention names, transformers' optional "text_model." prefix)
      -> to_mlx_layout (the one torch-to-MLX layout conversion)
      -> load_strict (every weight present, none left over, shapes checked)
      -> weight patches (the LoRA slot: deltas merged into the loaded weights)
      -> quantize (linear layers in 8 or 4 bits)

`load_components` runs the chain for every part of a pipeline and returns them; the pipeline is then
constructed from its components and options, and nothing is set on it from outside afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import ModelFormatError
from ..models.clip import CLIPTextConfig, CLIPTextModel
from ..models.unet import UNet2DConditionModel, UNetConfig
from ..models.vae import AutoencoderKL, VAEConfig
from ..tokenizer import CLIPTokenizer
from ..weights import parse_dtype, resolve_model

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # SD 1.x/2.x and SDXL base: the 1st; SDXL: the 2nd


class ComponentSource(Protocol):
    """Where a pipeline's parts come from. Tensors use diffusers/transformers key names, torch layouts."""

    name: str  # shown in messages; the pipeline's model_name

    def has(self, component: str) -> bool: ...

    def config(self, component: str) -> dict: ...

    def tensors(self, component: str, dtype: mx.Dtype) -> dict[str, mx.array]: ...

    def tokenizer_folder(self, component: str) -> Path: ...

    def pipeline_config(self) -> dict: ...

    def settle(self, unet: UNet2DConditionModel) -> None:
        """Called once the UNet is loaded: what only its weights can tell (a single file's prediction type)."""


# A weight patch (the LoRA slot): called with the component's name, its module and its loaded weights
# (our parameter names) before quantization; returns the weights to use.
WeightPatch = Callable[[str, nn.Module, dict[str, mx.array]], dict[str, mx.array]]


def open_source(name_or_path: str | os.PathLike, dtype: str = "float32", offline: bool | None = None, *,
                config: str | os.PathLike | None = None, vae: str | os.PathLike | None = None,
                prediction_type: str | None = None) -> ComponentSource:
    """The source for a preset name, a hub repo id, a local folder (through the hub cache for the first
    two) or a single-file checkpoint (never any network; `config` and `prediction_type` are for these).
    `dtype` picks which weight files a download fetches; `offline` never touches the network; `vae` (a
    folder or a file) replaces the model's VAE."""
    from .folder import DiffusersFolder
    from .single_file import SingleFileSource, is_single_file
    from .vae_file import WithVAE

    if is_single_file(name_or_path):
        source = SingleFileSource(name_or_path, config=config, prediction_type=prediction_type)
    elif config is not None or prediction_type is not None:
        raise ValueError("config and prediction_type are for single-file checkpoints; a diffusers model "
                         "carries its own configs")
    else:
        source = DiffusersFolder(resolve_model(name_or_path, dtype=dtype, offline=offline),
                                 display_name=_model_name(name_or_path))
    return WithVAE(source, vae) if vae is not None else source


def _model_name(name_or_path: str | os.PathLike) -> str:
    path = Path(name_or_path).expanduser()
    return path.resolve().name if path.is_dir() else str(name_or_path)


# ------------------------------------------------------------------------------------------ the chain

LEGACY_ATTENTION_NAMES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def rename_key(key: str, prefix: str = "") -> str:
    """Map checkpoint key spellings onto our module names."""
    for old, new in LEGACY_ATTENTION_NAMES.items():
        key = key.replace(old, new)
    if prefix and not key.startswith(prefix) and not key.startswith("text_projection"):
        key = prefix + key  # transformers 5 saves CLIP without the "text_model." prefix
    return key


def to_mlx_layout(value: mx.array, target_ndim: int) -> mx.array:
    """A torch-layout tensor in MLX's layout for a parameter of `target_ndim` dimensions."""
    if value.ndim == 4 and target_ndim == 2:  # a 1x1 convolution used as a linear layer
        return value.reshape(value.shape[:2])
    if value.ndim == 4:  # torch OIHW -> MLX OHWI, copied: a strided view slows every convolution
        return mx.contiguous(value.transpose(0, 2, 3, 1))
    return value


def _few(keys: Iterable[str], n: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_strict(module: nn.Module, weights: dict[str, mx.array], where: str, prefix: str = "") -> dict[str, mx.array]:
    """The checkpoint tensors renamed and converted for `module`, every one checked against it; clear errors
    on any mismatch. Returns them under our parameter names (not yet set on the module)."""
    expected = dict(tree_flatten(module.parameters()))
    given = {rename_key(k, prefix): v for k, v in weights.items() if not k.endswith("position_ids")}
    missing, unexpected = expected.keys() - given.keys(), given.keys() - expected.keys()
    if missing or unexpected:
        parts = [f"missing {len(missing)} weights: {_few(missing)}" if missing else "",
                 f"unexpected {len(unexpected)} weights: {_few(unexpected)}" if unexpected else ""]
        raise ModelFormatError(f"{where} does not match its config.json: " + "; ".join(p for p in parts if p))
    loaded = {}
    for key, target in expected.items():
        value = to_mlx_layout(given[key], target.ndim)
        if value.shape != target.shape:
            raise ModelFormatError(f"{where}: weight {key} has shape {value.shape}, the config needs {target.shape}")
        if not mx.issubdtype(value.dtype, mx.floating):
            # An integer tensor is a quantized checkpoint's (bitsandbytes, quanto): its scales live elsewhere,
            # so casting it would give noise. Refused, not converted.
            raise ModelFormatError(f"{where}: weight {key} is {str(value.dtype).removeprefix('mlx.core.')}, not "
                                   "floating point: integer-quantized checkpoints are refused; load a float16 "
                                   "or float32 one (--quantize quantizes it here)")
        loaded[key] = value
    return loaded


def load_module(module: nn.Module, weights: dict[str, mx.array], where: str, prefix: str = "") -> nn.Module:
    """Load checkpoint tensors into `module` (renamed, converted, checked)."""
    module.update(tree_unflatten(list(load_strict(module, weights, where, prefix).items())))
    return module


def quantize_linear_layers(module: nn.Module, bits: int) -> None:
    """Store linear layers in `bits`-bit groups (MLX quantized matmul); convolutions stay as they are."""
    def group(m: nn.Module) -> int | None:
        dims = m.weight.shape[-1]
        return next((g for g in (64, 32) if dims % g == 0), None)

    nn.quantize(module, bits=bits,
                class_predicate=lambda _, m: isinstance(m, nn.Linear) and group(m) is not None and (
                    {"group_size": group(m), "bits": bits}))


@dataclass
class LoadOptions:
    """How the chain loads a model: precision, quantization, and the weight patches (LoRA) to merge."""

    dtype: mx.Dtype = mx.float32
    quantize: int | None = None  # 8 or 4 bits for the UNet's and text encoders' linear layers
    patches: list[WeightPatch] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dtype = parse_dtype(self.dtype)
        if self.quantize not in (None, 4, 8):
            raise ValueError(f"quantize must be 4 or 8 bits, not {self.quantize}")


def load_component(source: ComponentSource, component: str, module: nn.Module, options: LoadOptions,
                   dtype: mx.Dtype | None = None, prefix: str = "", quantize: bool = True) -> nn.Module:
    """One component through the whole chain: tensors -> renames -> layout -> strict load -> patches -> quantize."""
    dtype = dtype or options.dtype
    where = f"{source.name}/{component}"
    weights = load_strict(module, source.tensors(component, dtype), where, prefix)
    for patch in options.patches:
        weights = patch(component, module, weights)
    module.update(tree_unflatten(list(weights.items())))
    if quantize and options.quantize:
        quantize_linear_layers(module, options.quantize)
    module.eval()
    return module


@dataclass
class Components:
    """A pipeline's parts, loaded. `load_text_encoders` loads the text encoders (again) from the source."""

    name: str
    tokenizers: list[CLIPTokenizer]
    text_encoders: list[CLIPTextModel]
    load_text_encoders: Callable[[], list[CLIPTextModel]]
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict
    pipeline_config: dict
    dtype: mx.Dtype


def load_components(source: ComponentSource, options: LoadOptions, text_encoders: bool = True) -> Components:
    """Every part of a pipeline from `source`; with `text_encoders` off they are left for later (low memory)."""
    encoder_names = [n for n in TEXT_ENCODERS if source.has(n)]
    unet = UNet2DConditionModel(UNetConfig.from_dict(source.config("unet")))
    vae = AutoencoderKL(VAEConfig.from_dict(source.config("vae")))
    # As diffusers: the SDXL VAE overflows in half precision and asks for an upcast (force_upcast),
    # which its SDXL pipelines honour; SD 1.x/2.x pipelines run the VAE in the model's dtype.
    vae_dtype = mx.float32 if vae.config.force_upcast and unet.config.is_sdxl else options.dtype
    load_component(source, "unet", unet, options)
    source.settle(unet)
    load_component(source, "vae", vae, options, dtype=vae_dtype, quantize=False)

    def load_text_encoders() -> list[CLIPTextModel]:
        return [load_component(source, n, CLIPTextModel(CLIPTextConfig.from_dict(source.config(n))), options,
                               prefix="text_model.") for n in encoder_names]

    tokenizers = [CLIPTokenizer.from_folder(source.tokenizer_folder(n.replace("text_encoder", "tokenizer")))
                  for n in encoder_names]
    return Components(name=source.name, tokenizers=tokenizers,
                      text_encoders=load_text_encoders() if text_encoders else [],
                      load_text_encoders=load_text_encoders, unet=unet, vae=vae,
                      scheduler_config=source.config("scheduler"), pipeline_config=source.pipeline_config(),
                      dtype=options.dtype)
