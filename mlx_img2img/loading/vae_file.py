"""A VAE from elsewhere in place of a model's own (the "ft-mse" VAE on SD 1.5, the fp16-fix VAE on SDXL).

Accepted: a diffusers VAE folder (config.json + safetensors), a diffusers model folder (its vae/), or one
.safetensors file in the original layout (encoder.down.0.block.0..., as AUTOMATIC1111 keeps VAEs) or the
diffusers layout, bare or under a full checkpoint's "first_stage_model." prefix. A file carries no config:
it takes the base model's VAE config, after checking that its shapes are that family's.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from ..errors import ModelFormatError, ModelNotFoundError
from ..weights import read_json
from .folder import load_weights
from .single_file import VAE_PREFIX, cast, convert_vae, is_original_vae, read_safetensors


class WithVAE:
    """`base` (any component source) with its VAE taken from `vae` (a folder or a .safetensors file)."""

    def __init__(self, base, vae: str | Path):
        self.base = base
        self.name = base.name
        self.path = Path(vae).expanduser()
        if self.path.is_dir():
            self.folder = self.path / "vae" if (self.path / "vae").is_dir() else self.path
            if not (self.folder / "config.json").is_file():
                raise ModelFormatError(f"{self.path} is not a VAE folder: it has no config.json (nor vae/config.json)")
            self._config = read_json(self.folder / "config.json")
            self._file_tensors = None
        elif self.path.exists() or self.path.suffix:
            self.folder = None
            self._config = base.config("vae")
            self._file_tensors = _vae_part(read_safetensors(self.path), self.path.name)
            _check_family(self._file_tensors, self._config, self.path.name)
        else:
            raise ModelNotFoundError(f"no such VAE file or folder: {self.path}")

    def has(self, component: str) -> bool:
        return component == "vae" or self.base.has(component)

    def config(self, component: str) -> dict:
        return dict(self._config) if component == "vae" else self.base.config(component)

    def tensors(self, component: str, dtype: mx.Dtype) -> dict[str, mx.array]:
        if component != "vae":
            return self.base.tensors(component, dtype)
        if self.folder is not None:
            return load_weights(self.folder, dtype)
        tensors = self._file_tensors
        if is_original_vae(tensors):
            tensors, unmatched = convert_vae(tensors, self._config)
            if unmatched:
                raise ModelFormatError(f"{self.path.name}: {len(unmatched)} weights are not a VAE's, "
                                       f"e.g. {', '.join(sorted(unmatched)[:4])}")
        return cast(tensors, dtype)

    def tokenizer_folder(self, component: str) -> Path:
        return self.base.tokenizer_folder(component)

    def pipeline_config(self) -> dict:
        return self.base.pipeline_config()

    def settle(self, unet) -> None:
        self.base.settle(unet)


def _vae_part(tensors: dict[str, mx.array], where: str) -> dict[str, mx.array]:
    """The VAE's tensors without any prefix; training leftovers (EMA copies, the loss's discriminator) dropped."""
    for prefix in (VAE_PREFIX, "vae.", ""):
        part = {k[len(prefix):]: v for k, v in tensors.items()
                if k.startswith(prefix) and k[len(prefix):].startswith(("encoder.", "decoder.", "quant_conv.",
                                                                          "post_quant_conv."))}
        if part:
            return part
    raise ModelFormatError(f"{where} is not a VAE: no encoder.*/decoder.* weights (nor first_stage_model.*)")


def _check_family(tensors: dict[str, mx.array], config: dict, where: str) -> None:
    """A VAE of another family (another latent width, other channel counts) cannot stand in for this one."""
    conv_in = tensors.get("decoder.conv_in.weight")
    if conv_in is None:
        raise ModelFormatError(f"{where} is not a whole VAE: it has no decoder.conv_in.weight")
    latent, width = conv_in.shape[1], conv_in.shape[0]
    want_latent, want_width = config.get("latent_channels", 4), config["block_out_channels"][-1]
    if (latent, width) != (want_latent, want_width):
        raise ModelFormatError(
            f"{where} is a VAE for another model family ({latent} latent channels, {width} wide); this model's "
            f"VAE has {want_latent} latent channels, {want_width} wide")
